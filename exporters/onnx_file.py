"""Reading and running ONNX files with onnxruntime and numpy only (no torch; the ``onnx`` package
only where a file is parsed), so a device that has only onnxruntime can check and time the file that
ships (``exporters.latency``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

from ccpurify.errors import ExportError

if TYPE_CHECKING:
    import onnx

MAX_ONNX_BYTES = 2 << 30  # refuse to parse larger files (protobuf limit; hostile input)


def check_onnx_size(path: str | os.PathLike) -> int:
    """The file's size in bytes, refused above ``MAX_ONNX_BYTES`` before any parser sees it."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if size > MAX_ONNX_BYTES:
        raise ExportError(f"{path}: {size} bytes is over the {MAX_ONNX_BYTES} byte limit for ONNX files")
    return size


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file with a size limit (files may come from elsewhere)."""
    import onnx

    check_onnx_size(path)
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ExportError(f"{path}: not a readable ONNX file ({exc})") from exc


def ort_session(path: str | os.PathLike, threads: int = 1, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """An onnxruntime session with fixed threads and quiet logs; an unusable file is an ``ExportError``."""
    import onnxruntime as ort

    check_onnx_size(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from exc


def run_onnx(path: str | os.PathLike, x: np.ndarray, session=None) -> np.ndarray:
    session = session or ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@contextlib.contextmanager
def quiet():
    """The exporter prints progress and logs torchvision-op notices; keep the caller's output clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the exporter logs errors it recovers from, pages of them
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
