"""MACs and params of single layers match hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from builder.analysis import analyze_model
from tests.analysis.onnx_graphs import single_node_model


def _only_layer(model, shapes):
    stats = analyze_model(model, shapes)
    assert len(stats.layers) == 1
    return stats, stats.layers[0]


@pytest.mark.parametrize("group, c_in, c_out", [(1, 16, 32), (4, 16, 32), (16, 16, 16)])
def test_conv_plain_grouped_and_depthwise(group, c_in, c_out):
    w = np.zeros((c_out, c_in // group, 3, 3))
    b = np.zeros(c_out)
    model = single_node_model("Conv", ["N", c_in, 14, 14], {"w": w, "b": b}, group=group, pads=[1, 1, 1, 1],
                              strides=[2, 2])
    stats, layer = _only_layer(model, {"x": (2, c_in, 14, 14)})
    # out 7x7; each output element needs (c_in / group) x 3 x 3 MACs
    assert layer.output_shape == (2, c_out, 7, 7)
    assert layer.macs == 2 * c_out * 7 * 7 * (c_in // group) * 9
    assert layer.params == w.size + b.size == stats.params
    assert stats.fp32_weight_bytes == 4 * stats.params


def test_conv_transpose():
    w = np.zeros((8, 4, 2, 2))  # (C_in, C_out / group, kH, kW)
    model = single_node_model("ConvTranspose", [1, 8, 5, 5], {"w": w}, strides=[2, 2])
    _, layer = _only_layer(model, {"x": (1, 8, 5, 5)})
    assert layer.output_shape == (1, 4, 10, 10)
    assert layer.macs == 8 * 5 * 5 * 4 * 2 * 2


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 1)])
def test_gemm(trans_a, trans_b):
    m, k, n = 3, 20, 7
    w = np.zeros((n, k) if trans_b else (k, n))
    x_shape = [k, m] if trans_a else [m, k]
    model = single_node_model("Gemm", x_shape, {"w": w, "c": np.zeros(n)}, transA=trans_a, transB=trans_b)
    _, layer = _only_layer(model, {"x": tuple(x_shape)})
    assert layer.output_shape == (m, n)
    assert layer.macs == m * n * k
    assert layer.params == k * n + n


def test_batched_matmul_of_two_activations():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", 4, "S", 16])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", 4, 16, "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="qk")], "g", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for batch, seq in ((1, 16), (3, 50)):
        stats = analyze_model(model, {"a": (batch, 4, seq, 16), "b": (batch, 4, 16, seq)})
        assert stats.layers[0].macs == batch * 4 * seq * seq * 16
        assert stats.params == 0
        # inputs live, then the output joins them: a + b + y
        assert stats.peak_activation_bytes == 4 * (2 * batch * 4 * seq * 16 + batch * 4 * seq * seq)


def test_peak_activation_frees_tensors_after_last_use():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    stats = analyze_model(model, {"x": (1, 1000)})
    assert stats.peak_activation_bytes == 2 * 4000  # never more than one input and one output alive
    assert stats.macs == 0 and stats.other_ops == 3000
    assert stats.op_histogram == {"Relu": 3}
