"""bench/zoo.py's independent counters, metrics and row logic, on tiny models built here (no network)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import zoo, zoo_counts, zoo_int8


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"), name=name)


def _if_model() -> onnx.ModelProto:
    """x (1,4) -> If(sr == 16000): then MatMul by a (4,8) Constant, else MatMul by a (4,16) one.
    Weights live in Constant nodes inside the branches, like the silero VAD's."""
    rng = np.random.default_rng(0)
    then_w, else_w = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
    then_g = helper.make_graph([_const("w8", then_w), helper.make_node("MatMul", ["x", "w8"], ["y8"])], "then", [],
                               [helper.make_tensor_value_info("y8", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([_const("w16", else_w), helper.make_node("MatMul", ["x", "w16"], ["y16"])], "else", [],
                               [helper.make_tensor_value_info("y16", TensorProto.FLOAT, None)])
    nodes = [_const("rate", np.array(16000, np.int64)),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def test_weights_are_counted_in_constant_nodes_and_in_every_branch():
    params, size = zoo_counts.onnx_weights(_if_model())
    assert params == 4 * 8 + 4 * 16  # both branches' weights; the int64 rate constant is not a weight
    assert size == params * 4


def test_macs_follow_the_branch_the_input_selects():
    model = _if_model()
    x = np.ones((1, 4), np.float32)
    assert zoo_counts.onnx_macs(model, {"x": x, "sr": np.array(16000, np.int64)}) == 1 * 8 * 4
    assert zoo_counts.onnx_macs(model, {"x": x, "sr": np.array(8000, np.int64)}) == 1 * 16 * 4


def test_inlined_model_computes_what_the_original_does():
    model = _if_model()
    feeds = {"x": np.arange(4, dtype=np.float32)[None], "sr": np.array(16000, np.int64)}
    flat = zoo_counts.inline_taken_branches(model, feeds)
    assert not [n for n in flat.graph.node if n.op_type == "If"]
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(flat.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want)


def test_lstm_conv_and_gemm_macs_use_the_textbook_formulas():
    rng = np.random.default_rng(1)
    seq, batch, inp, hidden = 5, 1, 3, 4
    inits = [numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, inp)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(size=(6, 2, 3, 3)).astype(np.float32), "K"),  # groups=2: C_in/group = 2
             numpy_helper.from_array(rng.normal(size=(10, 7)).astype(np.float32), "G")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["h_all", "h_last"], hidden_size=hidden),
             helper.make_node("Conv", ["img", "K"], ["conv"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Gemm", ["v", "G"], ["gemm"])]
    graph = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp]),
                                             helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 5, 5]),
                                             helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 10])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h_all", "conv", "gemm")],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.ones((seq, batch, inp), np.float32), "img": np.ones((1, 4, 5, 5), np.float32),
             "v": np.ones((2, 10), np.float32)}
    lstm = seq * batch * 1 * 4 * hidden * (inp + hidden)
    conv = (1 * 6 * 5 * 5) * (2 * 3 * 3)
    gemm = 2 * 7 * 10
    assert zoo_counts.onnx_macs(model, feeds) == lstm + conv + gemm


def _fc_tflite(path: Path) -> None:
    """A .tflite: fp16 weights (3,4) -> DEQUANTIZE -> FULLY_CONNECTED, written with LiteRT's own schema."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT() for _ in range(5)]
    model.buffers[2].data = np.frombuffer(np.arange(12, dtype=np.float16).tobytes(), np.uint8).tolist()

    def tensor(name: str, shape: list[int], kind: int, buffer: int):
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, kind, buffer
        return t

    sub = schema.SubGraphT()
    sub.tensors = [tensor("x", [1, 4], schema.TensorType.FLOAT32, 1), tensor("w16", [3, 4], schema.TensorType.FLOAT16, 2),
                   tensor("w", [3, 4], schema.TensorType.FLOAT32, 3), tensor("y", [1, 3], schema.TensorType.FLOAT32, 4)]
    sub.inputs, sub.outputs = [0], [3]
    codes = []
    for op in (schema.BuiltinOperator.DEQUANTIZE, schema.BuiltinOperator.FULLY_CONNECTED):
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = op, op, 1
        codes.append(code)
    model.operatorCodes = codes
    dequantize, fc = schema.OperatorT(), schema.OperatorT()
    dequantize.opcodeIndex, dequantize.inputs, dequantize.outputs = 0, [1], [2]
    fc.opcodeIndex, fc.inputs, fc.outputs = 1, [0, 2, -1], [3]
    fc.builtinOptionsType, fc.builtinOptions = schema.BuiltinOptions.FullyConnectedOptions, schema.FullyConnectedOptionsT()
    sub.operators = [dequantize, fc]
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def test_tflite_counts_read_weights_from_buffers(tmp_path):
    pytest.importorskip("ai_edge_litert")
    path = tmp_path / "fc.tflite"
    _fc_tflite(path)
    counts = zoo_counts.count(path)
    assert (counts.params, counts.weight_bytes, counts.macs) == (12, 24, 3 * 4)  # fp16: 2 bytes each


def test_make_quantizable_moves_constants_and_raises_the_opset(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "q.onnx"
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph([_const("w", w), helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7), src)
    notes = zoo_int8.make_quantizable(src, dst)
    model = onnx.load(dst)
    assert notes == ["1 Constant -> initializers", "opset 11 -> 13"]
    assert [i.name for i in model.graph.initializer] == ["w"] and model.opset_import[0].version == 13
    x = {"x": np.ones((1, 4), np.float32)}
    np.testing.assert_allclose(ort.InferenceSession(str(dst)).run(None, x)[0], np.ones((1, 4)) @ w)


def test_samples_slice_each_input_on_its_own_axis_and_share_0d_ones():
    inputs = {"input": np.arange(6, dtype=np.float32).reshape(3, 2), "state": np.arange(12.0).reshape(2, 3, 2),
              "sr": np.array(16000, np.int64)}
    feeds = list(zoo_int8.samples(inputs, {"state": 1}))
    assert len(feeds) == 3
    assert feeds[1]["input"].shape == (1, 2) and feeds[1]["state"].shape == (2, 1, 2) and feeds[1]["sr"].shape == ()
    np.testing.assert_array_equal(feeds[2]["state"][:, 0], inputs["state"][:, 2])
    with pytest.raises(ValueError):
        zoo_int8.sample_count(inputs, {})  # state's axis 0 (2) disagrees with input's 3


def test_task_metrics_measure_what_they_name():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    flipped = ref.copy()
    flipped[0] = [1.0, 3.0, 0.0]  # one of four top-1 changes
    assert zoo_int8.fidelity("classifier", ref, flipped).value == pytest.approx(0.75)
    assert zoo_int8.fidelity("embedding", ref, ref).value == 1.0
    maps = np.zeros((1, 1, 4, 4))
    maps[..., :2, :2] = 0.9
    shifted = np.zeros_like(maps)
    shifted[..., :2, 1:3] = 0.9
    assert zoo_int8.fidelity("dense_map", maps, shifted, threshold=0.5).value == pytest.approx(2 / 6)
    seq = np.zeros((1, 4, 3))
    seq[0, :, 0] = 1  # all blank ...
    seq[0, 1] = [0, 1, 0]  # ... but one step emits symbol 1
    other = seq.copy()
    other[0, 1] = [0, 0, 1]
    assert zoo_int8.fidelity("sequence", seq, other).value == 0.0  # blanks do not dilute the one miss
    probs = np.array([[0.9], [0.1], [0.6]])
    assert zoo_int8.fidelity("stateful", probs, np.array([[0.8], [0.2], [0.4]])).value == pytest.approx(2 / 3)
    assert zoo_int8.fidelity("regression", ref, ref * 1.01).value == pytest.approx(0.99)


def test_analyze_verdict_compares_every_figure_with_the_count():
    row = zoo.AnalyzeRow("m", builder_params=100, builder_macs=1000, builder_weight_bytes=400,
                         indep_params=100, indep_macs=1010, indep_weight_bytes=400)
    assert row.verdict() == "match"
    row.builder_params = 0  # the Paddle models' 0 parameters today
    assert row.verdict() == "MISMATCH" and row.ratio("params") == 0.0
    assert zoo.AnalyzeRow("m", error="boom").verdict() == "error"
    assert zoo.AnalyzeRow("m", indep_params=1).verdict() == "incomplete"


def test_build_rows_come_from_the_manifest_or_the_refusal():
    manifest = {"target": {"runtime": "onnxruntime", "precision": "fp32", "format": "onnx"},
                "metrics": {"fidelity": {"min_cosine": 0.99999, "samples": 16, "top1_agreement": None},
                            "verification": "fp32 ONNX on ORT CPU"},
                "verify_tolerance": {"min_cosine": 0.999}}
    ok = zoo.build_row("m", "raspberry-pi-4", zoo.CliResult(0, json.dumps(manifest), "", 3.0))
    assert (ok.status, ok.shipped, ok.metric, ok.value, ok.floor, ok.samples) == \
        ("pass", "onnxruntime/fp32/onnx", "min cosine", 0.99999, 0.999, 16)
    per_task = dict(manifest, metrics={"fidelity": {"metric": "map IoU", "value": 0.97, "floor": 0.9, "samples": 64}})
    assert zoo.build_row("m", "p", zoo.CliResult(0, json.dumps(per_task), "", 1.0)).metric == "map IoU"
    stderr = "progress...\nbuilder: error: artifact for jetson failed verification, not registered: max |diff| 0.04\n"
    refused = zoo.build_row("m", "jetson-orin-nano", zoo.CliResult(1, "", stderr, 2.0))
    assert refused.status == "refused" and refused.reason.startswith("builder: error: artifact for jetson")
    crash = zoo.build_row("m", "p", zoo.CliResult(1, "", "Traceback (most recent call last):\n  ...\nIndexError: x\n", 1.0))
    assert crash.status == "crash" and crash.reason == "IndexError: x"
    timeout = zoo.build_row("m", "p", zoo.CliResult(124, "", "", 9.0))
    assert (timeout.status, timeout.reason) == ("timeout", "timed out")


def test_shape_args_leave_out_0d_inputs():
    model = zoo.MODELS["silero_vad"]
    assert zoo.shape_args(model) == ["--input-shape", "input=1x576,state=2x1x128"]


def test_results_block_is_replaced_not_appended(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nkeep me\n")
    zoo.write_results(path, "first")
    zoo.write_results(path, "second")
    text = path.read_text()
    assert "keep me" in text and "second" in text and "first" not in text and text.count(zoo.START) == 1


def _int8(variant: str, value: float, speedup: float, size: int = 100, cosine: float = 0.99, note: str = "") -> "zoo.Int8Row":
    return zoo.Int8Row("m", variant, size_bytes=size, metric="m", value=value, cosine=cosine, speedup=speedup, note=note)


def test_int8_verdict_holds_the_builder_to_the_better_plain_baseline():
    fp32 = zoo.Int8Row("m", "fp32", size_bytes=1000, speedup=1.0)
    plain = [_int8("ort quantize_dynamic", 0.80, 0.5), _int8("ort quantize_static QDQ per-channel", 0.90, 2.0)]
    good = [fp32, *plain, _int8("builder compress --quantize int8", 0.91, 1.9)]
    assert zoo.int8_verdict(good, "regression") == "meets target"
    slow = [fp32, *plain, _int8("builder compress --quantize int8", 0.95, 1.7)]
    assert "speed" in zoo.int8_verdict(slow, "regression")
    worse = [fp32, *plain, _int8("builder compress --quantize int8", 0.85, 2.0)]
    assert "fidelity" in zoo.int8_verdict(worse, "regression")
    refused = [fp32, *plain, zoo.Int8Row("m", "builder compress --quantize int8", note="refused")]
    assert "although a plain baseline ran" in zoo.int8_verdict(refused, "regression")
    unflagged = [fp32, _int8("builder compress --quantize int8", 0.99, 0.8)]
    assert "not flagged" in zoo.int8_verdict(unflagged, "regression")
    assert zoo.int8_verdict([fp32, _int8("builder compress --quantize int8", 0.99, 0.8, note="flags: slower_than_input")],
                            "regression") == "meets target"
    big_cnn = [fp32, *plain, _int8("builder compress --quantize int8", 0.95, 2.0, size=400)]
    assert "CNN target" in zoo.int8_verdict(big_cnn, "classifier")


def test_zoo_json_round_trips_into_the_same_tables():
    from dataclasses import asdict

    report = zoo.ModelReport("m", "pkg==1", analyze=zoo.AnalyzeRow("m", 1, 2, 3, 1, 2, 3),
                             builds=[zoo.BuildRow("m", "raspberry-pi-4", "pass", "onnxruntime/fp32/onnx", "min cosine", 1.0)],
                             int8=[zoo.Int8Row("m", "fp32", 10, speedup=1.0)],
                             optimize=zoo.OptimizeRow("m", "raspberry-pi-4", "chosen", "quantize(static)", "int8"))
    back = zoo.reports_from_json(json.dumps([asdict(report)]))
    assert back == [report]
    assert zoo.build_table(back) == zoo.build_table([report]) and zoo.optimize_table(back)[1][0][4].startswith("int8")
