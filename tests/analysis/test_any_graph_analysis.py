"""Analysis is true on third-party graphs: weights in Constant nodes and in subgraphs, the If branch
the inputs select, recurrent ops, Loop bodies, quantized ops whose value_info holds -1 dims."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.analysis import analyze_model
from tests.analysis.onnx_graphs import single_node_model


def _const(name: str, array: np.ndarray):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def constant_weight_conv(opset: int = 11):
    """Conv + Reshape whose weights and shape are Constant nodes (as Paddle exports them)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 * 8 * 8])
    nodes = [_const("W", w), _const("B", b), _const("target", np.array([0, -1], dtype=np.int64)),
             helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "target"], ["y"], name="flatten")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model, {"W": w, "B": b}


def test_weights_in_constant_nodes_are_parameters() -> None:
    model, weights = constant_weight_conv()
    stats = analyze_model(model, {"x": (2, 3, 8, 8)})
    assert stats.params == sum(w.size for w in weights.values())  # the int64 Reshape target is no weight
    assert stats.weight_bytes == sum(w.nbytes for w in weights.values())
    conv = next(layer for layer in stats.layers if layer.op_type == "Conv")
    assert conv.params == stats.params
    assert conv.macs == 2 * 4 * 8 * 8 * 3 * 3 * 3


def _lstm_branch(name: str, hidden: int, input_size: int, seed: int):
    """A branch graph: LSTM over the outer ``x`` with its weights in Constant nodes, then a mean."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1, 4 * hidden, input_size)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    b = rng.standard_normal((1, 8 * hidden)).astype(np.float32)
    nodes = [_const(f"{name}_W", w), _const(f"{name}_R", r), _const(f"{name}_B", b),
             helper.make_node("LSTM", ["x", f"{name}_W", f"{name}_R", f"{name}_B"], [f"{name}_Y"],
                              name=f"{name}_lstm", hidden_size=hidden),
             helper.make_node("ReduceMean", [f"{name}_Y"], [f"{name}_out"], axes=[1, 2, 3], keepdims=0)]
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["seq"])
    return helper.make_graph(nodes, name, [], [out]), [w, r, b]


SEQ, INPUT = 5, 4


def if_lstm_model():
    """``If sr == 16000`` picks an LSTM of hidden 8, else one of hidden 16 (a voice-activity model's
    shape: a 0-d int64 sample rate choosing the network)."""
    then_graph, then_weights = _lstm_branch("then", 8, INPUT, 1)
    else_graph, else_weights = _lstm_branch("else", 16, INPUT, 2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1, INPUT])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq"])
    nodes = [_const("rate", np.array(16000, dtype=np.int64)),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], name="by_rate", then_branch=then_graph, else_branch=else_graph)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, sr], [y]), opset_imports=[helper.make_opsetid("", 17)])
    return model, then_weights, else_weights


def lstm_macs(hidden: int, input_size: int, seq: int = SEQ, batch: int = 1, directions: int = 1) -> int:
    return seq * batch * directions * 4 * hidden * (input_size + hidden)


@pytest.mark.parametrize("rate,hidden", [(16000, 8), (8000, 16)])
def test_if_branch_chosen_by_a_0d_input_value_is_counted(rate: int, hidden: int) -> None:
    model, then_weights, else_weights = if_lstm_model()
    shapes = {"x": (SEQ, 1, INPUT), "sr": ()}
    stats = analyze_model(model, shapes, {"sr": np.array(rate, dtype=np.int64)})
    assert stats.macs == lstm_macs(hidden, INPUT)
    assert stats.params == sum(w.size for w in then_weights + else_weights)  # both branches are in the file
    lstm = next(layer for layer in stats.layers if layer.op_type == "LSTM")
    assert lstm.params == sum(w.size for w in (then_weights if rate == 16000 else else_weights))
    assert any(f"sr={rate}" in note for note in stats.notes)


def test_if_without_the_value_counts_the_larger_branch_and_says_so() -> None:
    model, _, _ = if_lstm_model()
    stats = analyze_model(model, {"x": (SEQ, 1, INPUT), "sr": ()})
    assert stats.macs == max(lstm_macs(8, INPUT), lstm_macs(16, INPUT))
    assert any("sr" in note and "larger branch" in note for note in stats.notes)


def test_if_on_shapes_only_is_evaluated_without_values() -> None:
    """An If guarded by a shape test (exporters' Squeeze guards) needs no values: shapes suffice."""
    then_graph, then_weights = _lstm_branch("then", 8, INPUT, 1)
    else_graph, _ = _lstm_branch("else", 16, INPUT, 2)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1, INPUT])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             _const("index0", np.array(0, dtype=np.int64)),
             helper.make_node("Gather", ["shape", "index0"], ["seq_len"], axis=0),
             _const("five", np.array(SEQ, dtype=np.int64)),
             helper.make_node("Equal", ["seq_len", "five"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="guard", then_branch=then_graph, else_branch=else_graph)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    assert analyze_model(model, {"x": (SEQ, 1, INPUT)}).macs == lstm_macs(8, INPUT)
    assert analyze_model(model, {"x": (SEQ + 1, 1, INPUT)}).macs == lstm_macs(16, INPUT, seq=SEQ + 1)


@pytest.mark.parametrize("op,gates,directions,layout", [("LSTM", 4, 2, 0), ("GRU", 3, 1, 1), ("RNN", 1, 2, 0)])
def test_recurrent_macs_follow_the_documented_formula(op: str, gates: int, directions: int, layout: int) -> None:
    hidden, input_size, seq, batch = 6, 5, 7, 3
    rng = np.random.default_rng(0)
    w = rng.standard_normal((directions, gates * hidden, input_size))
    r = rng.standard_normal((directions, gates * hidden, hidden))
    x_shape = [batch, seq, input_size] if layout else [seq, batch, input_size]
    model = single_node_model(op, x_shape, {"W": w, "R": r}, hidden_size=hidden, layout=layout,
                              direction="bidirectional" if directions == 2 else "forward")
    stats = analyze_model(model, {"x": tuple(x_shape)})
    assert stats.macs == seq * batch * directions * gates * hidden * (input_size + hidden)
    assert stats.params == w.size + r.size


def test_loop_body_is_counted_per_iteration() -> None:
    trips, k = 3, 4
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, k)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "LW"], ["h_out"], name="step"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, k])],
        initializer=[numpy_helper.from_array(weight, "LW")])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])
    nodes = [_const("M", np.array(trips, dtype=np.int64)), _const("go", np.array(True)),
             helper.make_node("Loop", ["M", "go", "x"], ["y"], name="loop", body=body)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    stats = analyze_model(model, {"x": (1, k)})
    assert stats.macs == trips * k * k
    assert stats.params == weight.size


def test_conv_integer_with_minus_one_dims_in_value_info_is_never_negative() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(-5, 5, size=(3, 2, 3, 3)).astype(np.int8)
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [-1, 3, -1, -1])
    conv = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="qconv")
    graph = helper.make_graph([conv], "g", [x], [y], initializer=[numpy_helper.from_array(w, "w")],
                              value_info=[helper.make_tensor_value_info("y", TensorProto.INT32, [-1, 3, -1, -1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for dim in model.graph.output[0].type.tensor_type.shape.dim:  # make_tensor_value_info drops -1: set it
        if not dim.HasField("dim_value") or dim.dim_value != 3:
            dim.dim_value = -1
    stats = analyze_model(model, {"x": (1, 2, 5, 5)})
    layer = stats.layers[0]
    assert layer.output_shape == (1, 3, 3, 3)  # measured with ONNX Runtime instead of the -1s
    assert layer.macs == 1 * 3 * 3 * 3 * (2 * 3 * 3) > 0
    assert all(item.macs >= 0 and item.activation_bytes >= 0 for item in stats.layers)
    onnx.checker.check_model(model)


def test_analyze_cli_takes_branch_values_from_data(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import json

    from tests.support.cli import run_builder

    model, _, _ = if_lstm_model()
    path = tmp_path / "vad_like.onnx"
    onnx.save(model, path)
    data = tmp_path / "rate.npz"
    np.savez(data, sr=np.array(8000, dtype=np.int64))
    code, out, err = run_builder(monkeypatch, capsys, "analyze", str(path), "--input-shape", f"x={SEQ}x1x{INPUT}",
                                 "--data", str(data), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["totals"]["macs"] == lstm_macs(16, INPUT)
    assert any("sr=8000" in note for note in report["totals"]["notes"])
    assert report["model"]["normalisation"]["checked"] is True


def test_scan_body_is_counted_per_scanned_slice() -> None:
    steps, k = 6, 3
    weight = np.random.default_rng(0).standard_normal((k, k)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "SW"], ["row_out"], name="per_row"),
         helper.make_node("Add", ["acc_in", "row_out"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [1, k])],
        initializer=[numpy_helper.from_array(weight, "SW")])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, k])
    init = helper.make_tensor_value_info("init", TensorProto.FLOAT, [1, k])
    outs = [helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, [steps, 1, k])]
    scan = helper.make_node("Scan", ["init", "x"], ["acc", "rows"], name="scan", body=body, num_scan_inputs=1)
    model = helper.make_model(helper.make_graph([scan], "g", [init, x], outs), opset_imports=[helper.make_opsetid("", 17)])
    stats = analyze_model(model, {"init": (1, k), "x": (steps, 1, k)})
    assert stats.macs == steps * k * k
    assert stats.params == weight.size
