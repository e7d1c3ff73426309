"""Android from ONNX: an ONNX-only model becomes a verified .tflite (onnx2torch -> litert-torch), and a
node that cannot convert is named and built for the profile's fallback runtime (ONNX Runtime .ort)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.manifest import TensorSpec
from builder.errors import ProfileError, UsageError
from builder.targets import get_target
from builder.targets.base import TOLERANCES
from builder.targets.pipeline import reference_outputs, synthetic_samples

pytestmark = pytest.mark.litert
REPO = Path(__file__).resolve().parents[2]


def _weights(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def conv_relu_gemm(path: Path, opset: int = 17) -> Path:
    """A small classifier: Conv -> Relu -> MaxPool -> Flatten -> Gemm (10 classes)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
             helper.make_node("Flatten", ["p1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1, name="fc")]
    inits = [_weights(rng, "w1", (8, 3, 3, 3)), _weights(rng, "b1", (8,)),
             _weights(rng, "w2", (10, 8 * 8 * 8), 0.05), _weights(rng, "b2", (10,))]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def constant_weights_with_shape_inputs(path: Path) -> Path:
    """Weights in Constant nodes (as Paddle exports them) and ops whose shape/scale/bound arguments
    are tensors (Reshape, Clip, Resize): onnx2torch keeps those as buffers, which torch.export sees
    as data-dependent unless they are inlined."""
    rng = np.random.default_rng(1)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_v"), name=name)

    nodes = [const("w", (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32)),
             const("lo", np.array(0.0, np.float32)), const("hi", np.array(6.0, np.float32)),
             const("scales", np.array([1, 1, 2, 2], np.float32)), const("shape", np.array([1, -1], np.int64)),
             const("wfc", (rng.normal(size=(4 * 16 * 16, 5)) * 0.05).astype(np.float32)),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r6"], name="relu6"),
             helper.make_node("Resize", ["r6", "", "scales"], ["up"], mode="nearest", name="upsample"),
             helper.make_node("Reshape", ["up", "shape"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "wfc"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def lstm_model(path: Path) -> Path:
    """(1, 5, 4) sequence -> LSTM (no onnx2torch converter) -> last hidden state -> 3 scores."""
    rng = np.random.default_rng(2)
    hidden = 8
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"),
             helper.make_node("LSTM", ["xt", "W", "R"], ["seq", "h_last"], hidden_size=hidden, name="lstm_1"),
             helper.make_node("Squeeze", ["h_last", "axis0"], ["h"], name="squeeze"),
             helper.make_node("MatMul", ["h", "wo"], ["scores"], name="head")]
    inits = [_weights(rng, "W", (1, 4 * hidden, 4)), _weights(rng, "R", (1, 4 * hidden, hidden)),
             _weights(rng, "wo", (hidden, 3)), numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    graph = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 4])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _specs(path: Path) -> tuple[TensorSpec, ...]:
    from builder.targets.base import onnx_io_specs

    return onnx_io_specs(onnx.load(str(path)))[0]


def _compile_and_verify(path: Path, precision: str, workdir: Path):
    specs = _specs(path)
    samples = synthetic_samples(specs, 8)
    target = get_target("litert")
    compiled = target.compile(path, specs, precision, {"example_inputs": samples.inputs[0]}, workdir)
    report = target.verify(compiled, samples.inputs, reference_outputs(path, samples), TOLERANCES[precision])
    return compiled, report


@pytest.fixture(autouse=True)
def _converters():
    import importlib.util

    pytest.importorskip("litert_torch")
    if importlib.util.find_spec("onnx2torch") is None:  # importorskip would import it without torchvision
        pytest.skip("onnx2torch is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_onnx_classifier_becomes_a_verified_tflite(tmp_path, precision):
    path = conv_relu_gemm(tmp_path / "clf.onnx")
    compiled, report = _compile_and_verify(path, precision, tmp_path / "out")
    assert compiled.model_file.path.read_bytes()[4:8] == b"TFL3"
    assert any("ONNX via onnx2torch" in note for note in compiled.notes)
    assert list(compiled.input_sources.values()) == ["x"]  # the signature keeps the ONNX input name
    assert report.passed, report.summary()
    bound = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.5}[precision]
    assert report.worst.max_abs_diff < bound and report.worst.min_cosine > 0.99
    size = compiled.model_file.path.stat().st_size
    if precision == "int8":  # int8 weights: about a quarter of the fp32 weights' 22 KB
        assert size < 0.5 * path.stat().st_size


@pytest.mark.slow
def test_constant_weights_and_tensor_shape_arguments_convert(tmp_path):
    path = constant_weights_with_shape_inputs(tmp_path / "paddle_like.onnx")
    compiled, report = _compile_and_verify(path, "fp32", tmp_path / "out")
    assert report.passed, report.summary()
    assert compiled.outputs[0].shape == (1, 5)


def test_small_constants_are_inlined_so_torch_export_sees_their_values(tmp_path):
    import torch

    from builder.targets.onnx_to_torch import (
        constant_propagation_for_export,
        freeze_and_fold,
        import_onnx2torch,
        inline_small_constants,
    )

    # folding turns the Constant weights into initializers (onnx2torch's Conv needs them so)
    model = freeze_and_fold(onnx.load(str(constant_weights_with_shape_inputs(tmp_path / "m.onnx"))), {"x": (1, 3, 8, 8)})
    assert {n.op_type for n in model.graph.node} >= {"Reshape", "Resize", "Clip"}
    x = torch.rand(1, 3, 8, 8)
    plain = import_onnx2torch().convert(model).eval()
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(plain, (x,))
    inlined = import_onnx2torch().convert(model).eval()
    assert inline_small_constants(inlined) == 2  # the Resize scales and the Reshape shape; weights stay buffers
    assert any(b.numel() > 64 for b in inlined.buffers())
    with constant_propagation_for_export():
        program = torch.export.export(inlined, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), plain(x), atol=1e-6)


def test_slices_with_tensor_arguments_export_and_match_onnxruntime(tmp_path):
    """onnx2torch computes Slice bounds with .numpy(), which torch.export's fake tensors refuse
    (PP-OCRv4's recogniser); bound as Python slices they export, negative steps included."""
    import torch

    from builder.targets.onnx_to_torch import constant_propagation_for_export, onnx_to_torch
    from builder.targets.onnxruntime_target import run_ort

    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Slice", ["x", "s0", "e0", "a0"], ["y0"], name="crop"),
             helper.make_node("Slice", ["y0", "s1", "e1", "a1", "st1"], ["y"], name="reverse_every_other")]
    inits = [ints("s0", [1, 2]), ints("e0", [5, 100]), ints("a0", [2, 3]),
             ints("s1", [-1]), ints("e1", [-100]), ints("a1", [3]), ints("st1", [-2])]
    graph = helper.make_graph(nodes, "slices", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "slices.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.random.default_rng(3).random((1, 2, 6, 9)).astype(np.float32)
    module, names, _ = onnx_to_torch(path, {"x": x})
    with constant_propagation_for_export():
        program = torch.export.export(module, (torch.from_numpy(x),))
    expected = run_ort(path, [{"x": x}])[0]["y"]
    with torch.no_grad():
        got = program.module()(torch.from_numpy(x)).numpy()
    assert names == ["x"] and got.shape == expected.shape == (1, 2, 4, 4)
    np.testing.assert_array_equal(got, expected)


def test_clip_with_an_omitted_max_converts(tmp_path):
    """torch.clamp(min=...) exports as Clip(x, min, ""): onnx2torch refused the empty name."""
    import torch

    from builder.targets.onnx_to_torch import onnx_to_torch

    lo = numpy_helper.from_array(np.array(0.25, np.float32), "lo")
    graph = helper.make_graph([helper.make_node("Clip", ["x", "lo", ""], ["y"], name="clamp_min")], "clip",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [lo])
    path = tmp_path / "clip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.array([[0.0, 0.5, -1.0], [2.0, 0.2, 0.3]], np.float32)
    module, _, _ = onnx_to_torch(path, {"x": x})
    with torch.no_grad():
        np.testing.assert_array_equal(module(torch.from_numpy(x)).numpy(), np.maximum(x, 0.25))


def test_first_unconvertible_names_op_and_node(tmp_path):
    from builder.targets.onnx_to_torch import first_unconvertible

    assert first_unconvertible(onnx.load(str(conv_relu_gemm(tmp_path / "ok.onnx")))) is None
    found = first_unconvertible(onnx.load(str(lstm_model(tmp_path / "lstm.onnx"))))
    assert (found.op_type, found.node_name) == ("LSTM", "lstm_1") and "onnx2torch" in found.reason
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    custom = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                                                  helper.make_node("FastGelu", ["r"], ["y"], domain="com.microsoft", name="g1")],
                                                 "g", [x], [y]),
                               opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    found = first_unconvertible(custom)
    assert (found.op_type, found.domain, found.node_name) == ("FastGelu", "com.microsoft", "g1")


def test_android_profile_falls_back_to_onnxruntime_ort():
    from builder.profiles import get_profile

    android = get_profile("android-arm64")
    assert (android.preferred_runtime, android.fallback_runtime, android.fallback_format) == ("litert", "onnxruntime", "ort")
    assert "NnapiExecutionProvider" in android.onnxruntime_providers and "XNNPACKExecutionProvider" in android.onnxruntime_providers


def test_profile_fallback_must_be_another_available_runtime(tmp_path):
    from builder.profiles import load_profile_file

    text = (REPO / "device_profiles" / "android-arm64.toml").read_text()
    bad = tmp_path / "android-arm64.toml"
    bad.write_text(text.replace('fallback_runtime = "onnxruntime"', 'fallback_runtime = "onnxruntime-tensorrt"'))
    with pytest.raises(ProfileError, match="fallback_runtime 'onnxruntime-tensorrt' must be another"):
        load_profile_file(bad)


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    from builder.artifacts.signing import init_keys

    init_keys(tmp_path / "home" / "keys")
    return tmp_path / "home"


@pytest.mark.slow
def test_cli_builds_ort_for_android_when_an_op_does_not_convert(tmp_path, home):
    path = lstm_model(tmp_path / "rnn.onnx")
    cmd = [sys.executable, "-m", "builder.cli.main", "build", str(path), "-p", "android-arm64", "--precision", "fp32",
           "--registry-dir", str(home), "--out", str(tmp_path / "artifact")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("LiteRT: op LSTM (node lstm_1) does not convert: building ONNX Runtime .ort for android-arm64 instead"
            in proc.stdout.splitlines())
    assert "onnxruntime/fp32/ort" in proc.stdout and "NnapiExecutionProvider" in proc.stdout
    assert (tmp_path / "artifact" / "model.ort").is_file() and not list((tmp_path / "artifact").glob("*.tflite"))


def test_fallback_refuses_fp16_rather_than_changing_precision(tmp_path, home):
    from builder.targets.profile_build import build_for_profile

    with pytest.raises(UsageError, match="op LSTM .node lstm_1. does not convert.*fp16"):
        build_for_profile(str(lstm_model(tmp_path / "rnn.onnx")), "android-arm64", precision="fp16", registry_dir=home)


def test_runtime_named_by_the_user_does_not_fall_back(tmp_path, home):
    from builder.targets.onnx_to_torch import LiteRtConversionError
    from builder.targets.profile_build import build_for_profile

    with pytest.raises(LiteRtConversionError, match=r"LiteRT: op LSTM \(node lstm_1\) does not convert") as info:
        build_for_profile(str(lstm_model(tmp_path / "rnn.onnx")), "android-arm64", runtime="litert", precision="fp32",
                          registry_dir=home)
    assert info.value.op.op_type == "LSTM"
