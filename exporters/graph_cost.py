"""Params and MACs read off an ONNX graph (what is deployed, not what PyTorch thinks it is).

Params: elements of the floating-point initializers (quantized weights count once, by element).
MACs: Conv / ConvInteger / QLinearConv (``out_elems * C_in/groups * kh * kw``), Gemm and MatMul
(``out_elems * K``), after shape inference at batch size 1. Element-wise ops are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import shape_inference

_CONV = {"Conv", "ConvInteger", "QLinearConv"}
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_COUNTED_DTYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}


@dataclass(frozen=True)
class GraphCost:
    params: int
    macs: int


def _shape(value_info) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    if not dims:
        return None
    return [d.dim_value if d.HasField("dim_value") else 1 for d in dims]


def onnx_cost(model: onnx.ModelProto) -> GraphCost:
    """Params and MACs of ``model`` for one input sample (dynamic dims taken as 1)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    inferred = shape_inference.infer_shapes(fixed)
    shapes = {vi.name: _shape(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    inits = {t.name: t for t in inferred.graph.initializer}
    for t in inits.values():
        shapes[t.name] = list(t.dims)
    params = sum(math.prod(t.dims) for t in inits.values() if t.data_type in _COUNTED_DTYPES and len(t.dims) > 0)
    macs = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type in _CONV:
            w = shapes.get(node.input[_WEIGHT_INPUT[node.op_type]])
            if w is not None:
                macs += math.prod(out) * math.prod(w[1:])
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QGemm"):
            a = shapes.get(node.input[0])
            if a is not None:
                transposed = any(at.name == "transA" and at.i == 1 for at in node.attribute)
                k = a[-2] if transposed else a[-1]
                macs += math.prod(out) * k
    return GraphCost(params=int(params), macs=int(macs))
