"""What a shipped ONNX file says about itself: debug information out, deployment metadata in.

torch's dynamo exporter annotates every node with its FX node, class hierarchy, name scopes and a
Python stack trace holding absolute local source paths (about 40% of a small CNN's file), and the
graph with the ExportedProgram's signature. None of it is needed to run the model and some of it
leaks the exporting machine's layout, so ``strip_debug_info`` removes it (nodes, graph, value infos,
initializers, sub-graphs and functions). ``metadata_props`` then carry what a deployment needs to
use the file correctly (keys in ``KEYS``): the input size and layout, the normalisation the images
need first, the class names, the recipe that made the model and a summary of its purification.

Reading the metadata back needs only onnxruntime (``read_metadata``), so a device can check it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# key -> what its (JSON or plain string) value means; every key written by ccpurify is listed here.
KEYS: dict[str, str] = {
    "input_shape": "JSON list: the example input the model was exported with, batch first (the batch is dynamic)",
    "input_layout": "NCHW: images as channels x height x width",
    "input_preprocessing": "how a raw image becomes the input: scale 0-255 pixels to [0, 1], then (x - mean) / std",
    "input_mean": "JSON list: per-channel mean subtracted after scaling to [0, 1]",
    "input_std": "JSON list: per-channel standard deviation divided by after subtracting the mean",
    "class_names": "JSON list: the output index's class names",
    "ccpurify.version": "the ccpurify version that wrote the file",
    "ccpurify.recipe": "JSON: the base architecture and the structural edits (ccpurify.recipe) that made the model",
    "ccpurify.report": "JSON: a summary of the purification (pipeline, params and MACs before/after, scores when measured)",
    "ccpurify.quantization": "JSON: the INT8 quantization settings, where the file is quantized",
}
MAX_VALUE_CHARS = 64 * 1024  # metadata is read by devices: a runaway report is refused, not shipped


def _version() -> str:
    try:
        return importlib.metadata.version("ccpurify")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def deployment_metadata(
    input_shape: Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    recipe: Mapping | None = None,
    report: Mapping | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` for a model exported with ``input_shape``; the optional parts are
    written where known (a model whose normalisation is unknown does not get a guessed one)."""
    meta: dict[str, Any] = {"input_shape": [int(d) for d in input_shape], "ccpurify.version": _version()}
    if len(input_shape) == 4:
        meta["input_layout"] = "NCHW"
    if mean is not None and std is not None:
        meta |= {
            "input_mean": [float(v) for v in mean],
            "input_std": [float(v) for v in std],
            "input_preprocessing": KEYS["input_preprocessing"],
        }
    if class_names is not None:
        meta["class_names"] = [str(c) for c in class_names]
    if recipe is not None:
        meta["ccpurify.recipe"] = dict(recipe)
    if report is not None:
        meta["ccpurify.report"] = dict(report)
    return {k: _as_text(v) for k, v in meta.items()}


def _strip_graph(graph: onnx.GraphProto) -> None:
    import onnx

    del graph.metadata_props[:]
    graph.doc_string = ""
    for item in (*graph.value_info, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _strip_graph(attribute.g)
            for sub in attribute.graphs:
                _strip_graph(sub)


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove exporter debug annotations in place (stack traces, FX nodes, name scopes, rewriter
    rule names, doc strings) from the graph, its sub-graphs and its functions; returns ``model``."""
    _strip_graph(model.graph)
    for function in model.functions:
        del function.metadata_props[:]
        function.doc_string = ""
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""
    model.doc_string = ""
    return model


def prune_opset_imports(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep only the opset domains some node (or local function) uses; the default domain stays.
    Tools that read the file then see the domains it really needs (onnxruntime's quantizer copies
    every domain of the exporter's function library)."""
    used = {""}

    def visit(nodes) -> None:
        for node in nodes:
            used.add(node.domain)
            for attribute in node.attribute:
                for sub in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                    visit(sub.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
        used.add(function.domain)
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> onnx.ModelProto:
    """Write ``metadata`` into ``model.metadata_props`` (replacing keys already there); values that
    are not strings are stored as JSON."""
    from ccpurify.errors import ExportError

    current = {p.key: p.value for p in model.metadata_props}
    for key, value in metadata.items():
        text = _as_text(value)
        if len(text) > MAX_VALUE_CHARS:
            raise ExportError(f"ONNX metadata {key!r} is {len(text):,} characters; the limit is {MAX_VALUE_CHARS:,}")
        current[str(key)] = text
    del model.metadata_props[:]
    for key, value in current.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an ONNX file, JSON values decoded, read with onnxruntime alone."""
    from exporters.onnx_file import ort_session

    raw = ort_session(path).get_modelmeta().custom_metadata_map
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value) if value[:1] in "[{" else value
        except ValueError:
            out[key] = value
    return out
