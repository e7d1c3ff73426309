"""fp16 overflow is found before conversion and fixed by keeping the node in float; converted graphs
have unique node names and are topologically sorted (onnx's checker accepts them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _bn_model(path: Path, duplicate_names: bool = False, constant_var: bool = False) -> Path:
    """Conv -> BatchNorm whose variance is 1e8 on two channels (scale 1e4 compensates: the fp32
    output is ordinary, but fp16 turns the variance into inf), like a Paddle text detector."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5, "w"),
             numpy_helper.from_array(np.array([1e4, 1, 1, 1e4], np.float32), "scale"),
             numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
             numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
             numpy_helper.from_array(np.array([1e8, 1, 2, 1e8], np.float32), "var"),
             numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32) * 0.1, "fc"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="relu" if duplicate_names else "reshape"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]  # unnamed
    if constant_var:  # weights in Constant nodes, as Paddle exports them
        var = next(i for i in inits if i.name == "var")
        inits.remove(var)
        nodes.insert(0, helper.make_node("Constant", [], ["var"], value=var, name="var_const"))
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _samples(count: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).random((1, 3, 8, 8)).astype(np.float32)} for i in range(count)]


def test_overflowing_constant_weight_survives_the_converters_fp16_round_trip(tmp_path):
    import onnx
    import onnxruntime as ort

    from builder.targets.fp16_safety import convert_to_fp16

    path = _bn_model(tmp_path / "bn.onnx", constant_var=True)
    conversion = convert_to_fp16(onnx.load(str(path)), _samples())
    assert set(conversion.kept_in_float) == {"var_const", "bn"}
    x = _samples(1)[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(conversion.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_overflowing_batchnorm_is_kept_in_float_and_the_rest_is_fp16(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from builder.targets.fp16_safety import convert_to_fp16

    model = onnx.load(str(_bn_model(tmp_path / "bn.onnx")))
    x = _samples(1)[0]
    duplicated = onnx.load(str(_bn_model(tmp_path / "dup.onnx", duplicate_names=True)))  # as a fold step wrote it
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    naive = convert_float_to_float16(onnx.load(str(tmp_path / "bn.onnx")), keep_io_types=True)
    naive_out = ort.InferenceSession(naive.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(naive_out - ref).max() > 1.0  # the plain conversion is broken: the test means something
    conversion = convert_to_fp16(duplicated, _samples())
    assert conversion.kept_in_float == ("bn",) and "kept 1 node(s) in float: bn" in conversion.note()
    onnx.checker.check_model(conversion.model)  # unique names, topologically sorted
    names = [n.name for n in conversion.model.graph.node]
    assert len(names) == len(set(names)) and all(names)
    types = {i.name: i.data_type for i in conversion.model.graph.initializer}
    assert types["w"] == onnx.TensorProto.FLOAT16 and types["var"] == onnx.TensorProto.FLOAT
    got = ort.InferenceSession(conversion.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_jetson_fp16_build_of_an_overflowing_model_passes_verification_and_says_so(tmp_path):
    from builder.artifacts.signing import init_keys
    from builder.targets.profile_build import build_for_profile

    model = _bn_model(tmp_path / "bn.onnx")
    np.savez(tmp_path / "d.npz", x=np.concatenate([s["x"] for s in _samples(16)]))
    init_keys(tmp_path / "home" / "keys")
    result = build_for_profile(str(model), "jetson-orin-nano", precision="fp16", data=tmp_path / "d.npz",
                               registry_dir=tmp_path / "home")
    assert result.report.passed and result.manifest.target.precision == "fp16"
    assert any("kept 1 node(s) in float: bn" in note for note in result.warnings)


def test_topological_sort_orders_appended_nodes():
    from onnx import TensorProto, helper

    from builder.targets.fp16_safety import topological_sort

    nodes = [helper.make_node("Relu", ["a"], ["b"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    topological_sort(graph)
    assert [n.name for n in graph.node] == ["first", "second"]


def test_compress_fp16_output_passes_the_checker_and_keeps_the_overflow_in_float(tmp_path):
    import onnx
    import onnxruntime as ort

    from builder.compression.quantization import quantize_to

    source = _bn_model(tmp_path / "bn.onnx")
    out = quantize_to("fp16", source, tmp_path / "fp16.onnx", per_channel=False, exclude=(),
                      calibration_batches=_samples(4))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)  # was: "not topologically sorted"
    x = _samples(1)[0]
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def test_fold_then_fp16_recipe_builds_for_jetson(tmp_path):
    from builder.artifacts.signing import init_keys
    from builder.targets.profile_build import build_for_profile

    model = _bn_model(tmp_path / "bn.onnx")
    np.savez(tmp_path / "d.npz", x=np.concatenate([s["x"] for s in _samples(16)]))
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "fold-fp16"\n[[step]]\ntype = "fold"\n[[step]]\ntype = "quantize"\nmode = "fp16"\n'
                      'check_latency = false\n')
    init_keys(tmp_path / "home" / "keys")
    result = build_for_profile(str(model), "jetson-orin-nano", recipe=recipe, data=tmp_path / "d.npz",
                               registry_dir=tmp_path / "home")
    assert result.report.passed and result.manifest.target.precision == "fp16"
    assert any("already fp16" in note for note in result.warnings)
