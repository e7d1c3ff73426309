"""Multiply-accumulates and other arithmetic per ONNX node, from concrete tensor shapes.

MACs are counted for the linear-algebra ops only (bias additions not included), as papers do:

* Conv / ConvInteger / QLinearConv: ``out elements x (C_in / group) x kernel`` = out elements x
  prod(W.shape[1:]), which covers grouped and depthwise convolutions.
* ConvTranspose: ``in elements x (C_out / group) x kernel`` = in elements x prod(W.shape[1:]).
* Gemm / QGemm: ``M x N x K``; MatMul / MatMulInteger / QLinearMatMul and ORT's fused variants:
  ``out elements x K`` (batched and broadcast matmuls, so attention's QK^T and AV too).
* LSTM / GRU / RNN (and ORT's DynamicQuantizeLSTM): ``seq x batch x directions x gates x hidden x
  (input + hidden)`` with gates = 4 / 3 / 1 — every step multiplies the input by W and the previous
  hidden state by R for every gate, which is ``W.shape[1] x (W.shape[2] + R.shape[2])`` per direction
  (W is ``[directions, gates x hidden, input]``, R ``[directions, gates x hidden, hidden]``);
  ``layout = 1`` puts batch first in X. Their gate activations and state updates are
  ``other_ops``: ``(gates + 3) x hidden`` per step, direction and sample.
* ORT's fused Attention / QAttention: the Q/K/V projection (``B x S x W.shape[0] x W.shape[1]``) plus
  ``2 x B x S x S x hidden`` for QK^T and AV; MultiHeadAttention: the latter only.

``other_ops`` are the remaining arithmetic, counted per output element (documented estimates, used by
the latency model only): 1 for elementwise ops, 2 for BatchNormalization, 5 for Softmax, 8 for the
normalisations, the window size for pooling, the input size for reductions. Data movement (Reshape,
Transpose, Gather, Concat...) costs 0 ops; its cost is memory traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from builder.analysis.shapes import TensorInfo


@dataclass(frozen=True)
class OpCost:
    macs: int
    other_ops: int


def _prod(values: tuple[int, ...] | list[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# Linear-algebra ops: op_type -> (activation input index, weight input index).
CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}
MATMUL_OPS = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "FusedMatMul": 0,
              "DynamicQuantizeMatMul": 0, "MatMulIntegerToFloat": 0, "MatMulNBits": 0}
GEMM_OPS = {"Gemm": 0, "QGemm": 0, "FusedGemm": 0}
ATTENTION_OPS = frozenset({"Attention", "QAttention", "MultiHeadAttention"})
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}
LINEAR_OPS = (frozenset(CONV_OPS) | frozenset(MATMUL_OPS) | frozenset(GEMM_OPS) | ATTENTION_OPS
              | frozenset(RECURRENT_GATES) | {"ConvTranspose"})
# Ops ONNX Runtime runs as integer kernels.
INTEGER_OPS = frozenset({"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "QGemm", "QAttention",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeLSTM", "QLinearAdd",
                         "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool",
                         "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax"})

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Neg", "Abs", "Reciprocal", "Relu", "LeakyRelu",
    "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "FastGelu",
    "BiasGelu", "QuickGelu", "Softplus", "Softsign", "Mish", "Clip", "Max", "Min", "Mean", "Sum", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Mod", "Floor",
    "Ceil", "Round", "Sign", "Sin", "Cos", "IsNaN", "IsInf", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "Dropout",
    "ThresholdedRelu", "BitShift", "Shrink",
})
NORMALISATION = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                           "SkipSimplifiedLayerNormalization", "InstanceNormalization", "GroupNormalization",
                           "LpNormalization", "MeanVarianceNormalization", "RMSNormalization"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax", "QLinearSoftmax"})
POOLING = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
REDUCTIONS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "QLinearGlobalAveragePool",
                        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "CumSum"})


def op_cost(node: Any, infos: Mapping[str, TensorInfo]) -> OpCost:
    """MACs and other ops of one node; 0 where a needed shape is unknown (never negative)."""
    def shape(name: str) -> tuple[int, ...] | None:
        info = infos.get(name) if name else None
        if info is None or info.shape is None or any(d < 0 for d in info.shape):
            return None
        return info.shape

    def input_shape(index: int) -> tuple[int, ...] | None:
        return shape(node.input[index]) if len(node.input) > index else None

    out = shape(node.output[0]) if node.output else None
    out_elements = _prod(out) if out is not None else 0
    op = node.op_type
    macs = 0
    if op in CONV_OPS:
        weight = input_shape(CONV_OPS[op])
        if weight is not None and out is not None:
            macs = out_elements * _prod(weight[1:])
    elif op == "ConvTranspose":
        weight, x = input_shape(1), input_shape(0)
        if weight is not None and x is not None:
            macs = _prod(x) * _prod(weight[1:])
    elif op in GEMM_OPS:
        a = input_shape(GEMM_OPS[op])
        if a is not None and out is not None and len(a) == 2:
            k = a[0] if _attr(node, "transA", 0) else a[1]
            macs = out_elements * k
    elif op in MATMUL_OPS:
        a = input_shape(MATMUL_OPS[op])
        if a is not None and out is not None and len(a) >= 1:
            macs = out_elements * a[-1]
    elif op in ATTENTION_OPS:
        macs = _attention_macs(op, input_shape, out)
    elif op in RECURRENT_GATES:
        return _recurrent_cost(node, op, input_shape)
    return OpCost(macs=max(0, macs), other_ops=max(0, _other_ops(node, op, out_elements, input_shape)))


def _recurrent_cost(node: Any, op: str, input_shape: Callable[[int], tuple[int, ...] | None]) -> OpCost:
    """LSTM / GRU / RNN: see the module docstring for the formula."""
    x, w, r = input_shape(0), input_shape(1), input_shape(2)
    if x is None or w is None or len(x) != 3 or len(w) != 3:
        return OpCost(0, 0)
    seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) == 1 else (x[0], x[1])
    directions, gate_rows, input_size = w
    gates = RECURRENT_GATES[op]
    hidden = r[2] if r is not None and len(r) == 3 else gate_rows // gates
    steps = seq * batch * directions
    return OpCost(macs=steps * gate_rows * (input_size + hidden), other_ops=steps * (gates + 3) * hidden)


def _attention_macs(op: str, input_shape: Callable[[int], tuple[int, ...] | None],
                    out: tuple[int, ...] | None) -> int:
    """ORT's fused attention: the Q/K/V projections (Attention, QAttention) plus QKᵀ and AV."""
    x = input_shape(0)
    if x is None or out is None or len(x) != 3 or len(out) != 3:
        return 0
    batch, seq, _ = x
    hidden = out[-1]
    keys = seq
    projections = 0
    if op in ("Attention", "QAttention"):
        weight = input_shape(1)
        if weight is None or len(weight) != 2:
            return 0
        projections = batch * seq * weight[0] * weight[1]
    else:  # MultiHeadAttention: projections are separate MatMuls; K may be longer than Q
        key = input_shape(1)
        keys = key[1] if key is not None and len(key) == 3 else seq
    return projections + 2 * batch * seq * keys * hidden


def _other_ops(node: Any, op: str, out_elements: int, input_shape: Callable[[int], tuple[int, ...] | None]) -> int:
    if op in ELEMENTWISE:
        return out_elements
    if op == "BatchNormalization":
        return 2 * out_elements
    if op in SOFTMAX:
        return 5 * out_elements
    if op in NORMALISATION:
        return 8 * out_elements
    if op in POOLING:
        kernel = _attr(node, "kernel_shape", [])
        return out_elements * _prod(list(kernel)) if kernel else out_elements
    if op in REDUCTIONS:
        x = input_shape(0)
        return _prod(x) if x is not None else out_elements
    return 0
