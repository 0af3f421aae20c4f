"""ONNX export with verification: one self-contained file, dynamic batch, checker, ORT parity,
debug annotations stripped and deployment metadata written (``exporters.metadata``).

``export(model, path, example_inputs)`` runs the dynamo exporter (opset 20) in eval mode with the
initializers inside the file (no side ``.data`` file), checks it with ``onnx.checker`` (full check),
runs it in onnxruntime at two batch sizes and compares with PyTorch. The file only appears at
``path`` when every check passed (docs/reference/ecosystem.md §4, §7 gotcha 7).
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ccpurify.atomic import atomic_path
from ccpurify.errors import ExportError, InvalidInputError
from ccpurify.recipe import arch_of, edits_of, import_path_arch
from exporters.graph_cost import onnx_cost
from exporters.metadata import deployment_metadata, prune_opset_imports, set_metadata, strip_debug_info
from exporters.onnx_file import MAX_ONNX_BYTES, load_onnx, ort_session, quiet, run_onnx  # noqa: F401  (re-exported)

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23  # what torch.onnx.export(dynamo=True) writes without converting down


@dataclass
class ExportReport:
    path: str
    opset: int
    file_bytes: int
    parity_max_abs_diff: float
    parity_batch_sizes: list[int]
    tolerance: float
    params: int
    macs: int
    nodes: int
    export_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _recipe(model: nn.Module) -> dict | None:
    """How the model was built and edited, where it records it or its class can be imported and
    built without arguments (``ccpurify.recipe``)."""
    try:
        arch = arch_of(model) or import_path_arch(model)
    except InvalidInputError:
        return None
    return {"arch": arch.to_dict(), "edits": edits_of(model)}


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    tolerance: float = 1e-4,
    parity_inputs: torch.Tensor | None = None,
    input_name: str = "input",
    output_name: str = "logits",
    metadata: Mapping[str, Any] | None = None,
    strip_debug: bool = True,
) -> ExportReport:
    """Export ``model`` to ``path`` and verify it; raises ``ExportError`` (and writes nothing) on failure.
    ``model`` itself is not touched (mode, device): a CPU copy in eval mode is exported.

    The file carries ``metadata_props`` (``exporters.metadata.KEYS``): always the input shape, the
    ccpurify version and, for a model that records it, its recipe; ``metadata`` adds or overrides
    entries (``deployment_metadata`` builds normalisation, class names and a report summary).
    ``strip_debug`` removes the exporter's per-node debug annotations (stack traces with local paths).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not available: torch's ONNX exporter writes opsets {MIN_OPSET} to {MAX_OPSET}"
        )
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"the parity tolerance must be a finite number >= 0, got {tolerance}")
    model = copy.deepcopy(model).cpu().float().eval()
    example = example_inputs[:1].detach().cpu().float()
    try:  # the model's own error is clearer than the exporter's (and the exporter logs pages of it)
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        raise ExportError(
            f"the model fails on an example input of shape {tuple(example.shape)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); give its input size (CLI: --input-shape C,H,W)"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise ExportError(
            f"the model returns a {type(out).__name__}, and export writes a classifier with one output tensor "
            "(logits); wrap it in a module that returns the logits"
        )
    path = Path(path)
    started = time.perf_counter()
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with atomic_path(path) as tmp:
        try:
            with quiet(), torch.no_grad():
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=dynamic,
                    input_names=[input_name],
                    output_names=[output_name],
                    external_data=False,
                    verbose=False,
                )
                program.save(os.fspath(tmp), external_data=False)
        except Exception as exc:
            first_line = re.sub(
                r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0] if str(exc) else ""
            )  # no terminal colours
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first_line[:300]}") from exc
        if Path(f"{tmp}.data").exists():
            raise ExportError("the exporter wrote external data; the artefact must be one file")
        proto = load_onnx(tmp)
        if strip_debug:
            prune_opset_imports(strip_debug_info(proto))
        set_metadata(proto, {**deployment_metadata(tuple(example.shape), recipe=_recipe(model)), **(metadata or {})})
        onnx.save(proto, os.fspath(tmp))
        try:
            onnx.checker.check_model(os.fspath(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the export: {exc}") from exc
        gen = torch.Generator().manual_seed(0)
        batches = [example]
        if dynamic_batch:
            batches.append(
                parity_inputs if parity_inputs is not None else torch.randn(4, *example.shape[1:], generator=gen)
            )
        session = ort_session(tmp)
        worst = 0.0
        for x in batches:
            with torch.no_grad():
                expected = model(x.cpu().float()).numpy()
            got = run_onnx(tmp, x.cpu().numpy(), session)
            if not (np.isfinite(expected).all() and np.isfinite(got).all()):
                raise ExportError(
                    "the model outputs NaN or Inf on the parity inputs; check its weights and BatchNorm statistics"
                )
            worst = max(worst, float(np.abs(got - expected).max()))
        if not worst <= tolerance:
            raise ExportError(f"onnxruntime and PyTorch disagree: max |delta logit| = {worst:.3g} > {tolerance}")
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:
            raise ExportError(
                f"the exporter wrote opset {written} although opset {opset} was asked for; ask for {written}"
            )
        cost = onnx_cost(proto)
        size = tmp.stat().st_size
    return ExportReport(
        path=os.fspath(path),
        opset=opset,
        file_bytes=size,
        parity_max_abs_diff=worst,
        parity_batch_sizes=[int(b.shape[0]) for b in batches],
        tolerance=tolerance,
        params=cost.params,
        macs=cost.macs,
        nodes=len(proto.graph.node),
        export_seconds=time.perf_counter() - started,
    )
