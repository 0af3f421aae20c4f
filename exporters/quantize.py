"""INT8 static quantization (QDQ) of an exported model with onnxruntime, calibrated on given images.

The onnxruntime docs recommend QDQ for CPUs, U8 activations and S8 weights, and ``reduce_range`` on
x86 without VNNI (docs/reference/ecosystem.md §4.2). Dynamic quantization is not offered: it is
slower than fp32 for CNNs on this class of CPU. With labels, the accuracy change is reported.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from ccpurify.atomic import atomic_path
from ccpurify.errors import InvalidInputError
from exporters.metadata import prune_opset_imports, set_metadata, strip_debug_info
from exporters.onnx_file import load_onnx, ort_session, quiet


class Calibration(str, Enum):
    """How activation ranges are chosen from the calibration images (onnxruntime's methods)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


@dataclass
class QuantizeReport:
    path: str
    file_bytes: int
    fp32_file_bytes: int
    calibration_images: int
    per_channel: bool
    reduce_range: bool
    calibration: str
    excluded_nodes: list[str]
    agreement: float | None  # top-1 agreement with the fp32 model on the evaluation images
    fp32_accuracy: float | None
    int8_accuracy: float | None
    seconds: float

    @property
    def accuracy_change(self) -> float | None:
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.int8_accuracy - self.fp32_accuracy

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy_change": self.accuracy_change}


class _Reader:
    """A CalibrationDataReader over float NCHW images in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self._batches = iter(
            [
                {input_name: np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)}
                for i in range(0, len(images), batch_size)
            ]
        )

    def get_next(self):
        return next(self._batches, None)


def _predict(path: str | os.PathLike, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    session = ort_session(path)
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(images[i : i + batch_size], np.float32)})[0].argmax(1)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs)


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_images: np.ndarray,
    *,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    per_channel: bool = True,
    reduce_range: bool = True,
    calibration: Calibration = Calibration.MINMAX,
    exclude_nodes: Sequence[str] = (),
    batch_size: int = 32,
) -> QuantizeReport:
    """Quantize ``onnx_path`` to ``out_path`` (QDQ, static, calibrated on the images).

    ``calibration_images`` and ``eval_images`` are float NCHW, prepared as the model expects.
    ``reduce_range`` (7-bit weights) avoids overflow on x86 CPUs without VNNI; on ARM and VNNI CPUs
    turn it off for full 8-bit precision. ``exclude_nodes`` stay in float (names as in the ONNX
    graph, e.g. a sensitive first conv). The INT8 file keeps the fp32 file's metadata, adds its
    quantization settings, and declares only the opset domains it uses.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration_images.ndim != 4 or len(calibration_images) == 0:
        raise InvalidInputError("calibration needs a non-empty float array of images (N, C, H, W)")
    calibration = Calibration(calibration)
    started = time.perf_counter()
    source = load_onnx(onnx_path)  # size-limited parse: refuse hostile files before onnxruntime sees them
    unknown = sorted(set(exclude_nodes) - {n.name for n in source.graph.node})
    if unknown:
        raise InvalidInputError(
            f"nodes to exclude {unknown[:5]} are not in {onnx_path}; node names: {[n.name for n in source.graph.node][:8]}..."
        )
    input_name = ort_session(onnx_path).get_inputs()[0].name
    method = {
        Calibration.MINMAX: CalibrationMethod.MinMax,
        Calibration.ENTROPY: CalibrationMethod.Entropy,
        Calibration.PERCENTILE: CalibrationMethod.Percentile,
    }[calibration]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        with quiet():  # per-channel notices about un-foldable BatchNorms are expected (PreAct nets)
            quant_pre_process(os.fspath(onnx_path), os.fspath(pre), skip_symbolic_shape=False)
        with atomic_path(out_path) as target:
            with quiet():
                quantize_static(
                    os.fspath(pre),
                    os.fspath(target),
                    _Reader(input_name, calibration_images, batch_size),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=list(exclude_nodes),
                )
            quantized = prune_opset_imports(strip_debug_info(onnx.load(os.fspath(target))))
            settings = {
                "format": "QDQ",
                "activations": "uint8",
                "weights": "int8",
                "per_channel": per_channel,
                "reduce_range": reduce_range,
                "calibration": calibration.value,
                "calibration_images": len(calibration_images),
                "excluded_nodes": list(exclude_nodes),
            }
            set_metadata(
                quantized, {**{p.key: p.value for p in source.metadata_props}, "ccpurify.quantization": settings}
            )
            onnx.save(quantized, os.fspath(target))
    agreement = fp32_acc = int8_acc = None
    if eval_images is not None:
        fp32 = _predict(onnx_path, eval_images)
        int8 = _predict(out_path, eval_images)
        agreement = float((fp32 == int8).mean())
        if eval_labels is not None:
            fp32_acc, int8_acc = float((fp32 == eval_labels).mean()), float((int8 == eval_labels).mean())
    return QuantizeReport(
        path=os.fspath(out_path),
        file_bytes=os.path.getsize(out_path),
        fp32_file_bytes=os.path.getsize(onnx_path),
        calibration_images=len(calibration_images),
        per_channel=per_channel,
        reduce_range=reduce_range,
        calibration=calibration.value,
        excluded_nodes=list(exclude_nodes),
        agreement=agreement,
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        seconds=time.perf_counter() - started,
    )
