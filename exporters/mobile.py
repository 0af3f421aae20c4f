"""ONNX Runtime Mobile: will an exported file run well on a phone's accelerators, and its ``.ort`` form.

Both use onnxruntime's own tools (``onnxruntime.tools``), so the verdicts are the ones its mobile
documentation gives: ``check_mobile`` runs the usability checker (which operators and shapes the
NNAPI and CoreML execution providers take, as is and with fixed input shapes), ``convert_to_ort``
writes the ORT format that minimal mobile builds load, with the operator list such a build needs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass

from ccpurify.atomic import atomic_path
from ccpurify.errors import ExportError
from exporters.onnx_file import check_onnx_size, quiet

_VERDICT = re.compile(
    r"Model should perform well with (.+?) (as is|if modified to have fixed input shapes): (YES|NO|MAYBE)"
)


@dataclass
class MobileCheck:
    """The usability checker's verdicts: execution provider -> YES / NO / MAYBE, as the file is
    and if its dynamic input shapes were fixed (``python -m onnxruntime.tools.make_dynamic_shape_fixed``)."""

    path: str
    as_is: dict[str, str]
    fixed_shapes: dict[str, str]
    log: str  # the checker's full analysis (partitions, unsupported operators)

    def to_dict(self) -> dict:
        return {"path": self.path, "as_is": self.as_is, "fixed_shapes": self.fixed_shapes}


def check_mobile(path: str | os.PathLike) -> MobileCheck:
    """Run onnxruntime's mobile usability checker on ``path`` and collect its verdicts."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    check_onnx_size(path)
    stream = io.StringIO()
    logger = logging.getLogger("ccpurify.mobile_check")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
        ):  # not quiet(): it would mute the logger
            warnings.simplefilter("ignore")
            usability_checker.analyze_model(pathlib.Path(path), skip_optimize=False, logger=logger)
    except Exception as exc:  # the checker raises whatever onnx/onnxruntime raised
        raise ExportError(
            f"{path}: onnxruntime's mobile usability checker failed ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    finally:
        logger.removeHandler(handler)
    log = stream.getvalue()
    as_is, fixed = {}, {}
    for provider, when, verdict in _VERDICT.findall(log):
        (as_is if when == "as is" else fixed)[provider] = verdict
    return MobileCheck(os.fspath(path), as_is, fixed, log)


def convert_to_ort(path: str | os.PathLike, out_path: str | os.PathLike) -> pathlib.Path:
    """Write ``path`` in ORT format to ``out_path`` (fixed optimisation style, all optimisations),
    and the operators a reduced mobile build needs beside it (``<out>.required_operators.config``)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    check_onnx_size(path)
    out_path = pathlib.Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "model.onnx"
        shutil.copyfile(path, source)
        try:
            with quiet():
                convert_onnx_models_to_ort(
                    source, output_dir=pathlib.Path(tmp) / "out", optimization_styles=[OptimizationStyle.Fixed]
                )
        except Exception as exc:
            raise ExportError(
                f"{path}: conversion to ORT format failed ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        produced = pathlib.Path(tmp) / "out" / "model.ort"
        if not produced.is_file():
            raise ExportError(f"{path}: onnxruntime's converter wrote no .ort file")
        config = pathlib.Path(tmp) / "out" / "model.required_operators.config"
        with atomic_path(out_path) as target:
            shutil.copyfile(produced, target)
        if config.is_file():
            with atomic_path(out_path.with_suffix(".required_operators.config")) as target:
                shutil.copyfile(config, target)
    return out_path
