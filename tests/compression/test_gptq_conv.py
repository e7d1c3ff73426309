"""GPTQ rounding generalised to Conv (any groups, depthwise included) and Gemm, on static QDQ models:
the im2col patches must reproduce ONNX Runtime's own convolution, and the rounding must lower each
layer's output error under the scales ORT chose, keep ORT's graph, and lower the error on held-out
inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.compression.gptq import Layer, _patches
from builder.compression.quantization import QuantizeStep
from builder.execution.sessions import run_onnx
from builder.loading.types import InputSpec


@pytest.mark.parametrize("groups, kernel, strides, pads, dilations, auto_pad", [
    (1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "NOTSET"),
    (1, (3, 2), (2, 1), (0, 1, 2, 0), (1, 1), "NOTSET"),
    (6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "NOTSET"),  # depthwise, stride 2
    (3, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), "NOTSET"),  # grouped, dilated
    (6, (5, 5), (2, 2), (0, 0, 0, 0), (1, 1), "SAME_UPPER"),
    (1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "VALID"),
])
def test_patches_times_the_weight_is_onnx_runtimes_convolution(tmp_path: Path, groups: int, kernel: tuple[int, int],
                                                               strides: tuple[int, int], pads: tuple[int, ...],
                                                               dilations: tuple[int, int], auto_pad: str) -> None:
    rng = np.random.default_rng(0)
    cin, cout = 6, 12
    weight = rng.normal(size=(cout, cin // groups, *kernel)).astype(np.float32)
    attrs = dict(group=groups, strides=list(strides), dilations=list(dilations))
    if auto_pad == "NOTSET":
        attrs["pads"] = list(pads)
    else:
        attrs["auto_pad"] = auto_pad
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(size=(1, cin, 11, 9)).astype(np.float32)
    expected = run_onnx(path, [{"x": x}])[0]  # [Cout, Ho, Wo]

    layer = Layer("w", "x", "conv", groups=groups, kernel=kernel, strides=strides, dilations=dilations,
                  pads=pads, auto_pad=auto_pad)  # type: ignore[arg-type]
    patches = _patches(x[0], layer)  # [G, rows, K]
    per_group = cout // groups
    w = weight.reshape(groups, per_group, -1).transpose(0, 2, 1)  # [G, K, Cout/g]
    got = np.matmul(patches, w).transpose(0, 2, 1).reshape(cout, *expected.shape[1:])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def small_cnn(path: Path) -> Path:
    """stem 3x3 conv -> depthwise 3x3 -> pointwise 1x1 -> global pool -> Gemm (transB)."""
    rng = np.random.default_rng(5)
    w_stem = (rng.normal(size=(16, 3, 3, 3)) / 5).astype(np.float32)
    w_dw = (rng.normal(size=(16, 1, 3, 3)) / 3).astype(np.float32)
    w_pw = (rng.normal(size=(24, 16, 1, 1)) / 4).astype(np.float32)
    w_fc = (rng.normal(size=(10, 24)) / 5).astype(np.float32)
    biases = {f"b_{n}": (rng.normal(size=(c,)) / 10).astype(np.float32)
              for n, c in (("stem", 16), ("dw", 16), ("pw", 24), ("fc", 10))}
    nodes = [helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["s"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["s"], ["s_r"]),
             helper.make_node("Conv", ["s_r", "w_dw", "b_dw"], ["d"], name="dw", pads=[1, 1, 1, 1], group=16),
             helper.make_node("Relu", ["d"], ["d_r"]),
             helper.make_node("Conv", ["d_r", "w_pw", "b_pw"], ["p"], name="pw"),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w_stem": w_stem, "w_dw": w_dw, "w_pw": w_pw, "w_fc": w_fc, **biases}.items()]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def images(seed: int, count: int) -> np.ndarray:
    """Smooth images (neighbouring pixels correlate, as in photos): rounding errors can cancel."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(count, 3, 4, 4))
    return np.kron(coarse, np.ones((1, 1, 4, 4))).astype(np.float32) + 0.1 * rng.normal(size=(count, 3, 16, 16)).astype(np.float32)


def quantize(tmp_path: Path, rounding: str) -> tuple[Path, dict]:
    batches = [{"x": images(seed, 16)} for seed in range(8)]  # 128 rows >= 4 x the classifier's 24 inputs
    work = tmp_path / rounding
    work.mkdir()
    state = ModelState(inputs=(InputSpec("x", (1, 3, 16, 16)),), output_names=("y",),
                       onnx_path=small_cnn(tmp_path / "cnn.onnx"))
    ctx = StepContext(workdir=work, calibration_batches=lambda: iter(batches), task="classify")
    step = QuantizeStep(mode="static", per_channel=True, weight_rounding=rounding, check_latency=False,
                        preprocess=False, min_cosine=0.0, min_agreement=0.0)
    quantized, record = step.apply(state, ctx)
    return Path(quantized.onnx_path), record.facts


def test_gptq_rounds_conv_depthwise_and_gemm_and_lowers_the_held_out_error(tmp_path: Path) -> None:
    nearest_path, nearest = quantize(tmp_path, "nearest")
    gptq_path, facts = quantize(tmp_path, "gptq")
    assert "gptq_rounded" not in nearest
    assert facts["gptq_rounded"] == 4, facts.get("gptq_skipped")  # stem, depthwise, pointwise, classifier
    assert facts["gptq_layer_error_ratio"] < 0.9
    assert [n.op_type for n in onnx.load(str(gptq_path)).graph.node] == \
        [n.op_type for n in onnx.load(str(nearest_path)).graph.node]
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(nearest_path)).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(gptq_path)).graph.initializer}
    for name in ("w_dw_scale", "w_pw_scale", "w_fc_scale", "w_stem_zero_point"):
        np.testing.assert_array_equal(a[name], b[name])  # same scales: only the integers moved
    assert not np.array_equal(a["w_dw_quantized"], b["w_dw_quantized"])
    assert b["w_dw_quantized"].dtype == a["w_dw_quantized"].dtype
    assert np.abs(b["w_dw_quantized"].astype(int)).max() <= 127

    held = [{"x": images(100, 64)}]
    reference = run_onnx(tmp_path / "cnn.onnx", held)
    error = {name: float(np.mean((run_onnx(path, held) - reference) ** 2))
             for name, path in (("nearest", nearest_path), ("gptq", gptq_path))}
    assert error["gptq"] < error["nearest"], error


def test_a_layer_with_too_few_calibration_rows_keeps_nearest_rounding(tmp_path: Path) -> None:
    """After global pooling the classifier sees one row per image: GPTQ would fit those samples."""
    batches = [{"x": images(seed, 8)} for seed in range(2)]  # 16 rows for 24 inputs
    work = tmp_path / "few"
    work.mkdir()
    state = ModelState(inputs=(InputSpec("x", (1, 3, 16, 16)),), output_names=("y",),
                       onnx_path=small_cnn(tmp_path / "cnn.onnx"))
    ctx = StepContext(workdir=work, calibration_batches=lambda: iter(batches), task="classify")
    step = QuantizeStep(mode="static", per_channel=True, weight_rounding="gptq", check_latency=False,
                        preprocess=False, min_cosine=0.0, min_agreement=0.0)
    _, record = step.apply(state, ctx)
    assert record.facts["gptq_rounded"] == 3
    assert "16 calibration rows for 24 inputs" in record.facts["gptq_skipped"]["w_fc"]


def test_an_input_dead_on_the_calibration_data_keeps_its_weights() -> None:
    """A channel no calibration sample lit must not have its weights zeroed (it may light later)."""
    from builder.compression.gptq import gptq_quantize

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 6))
    x[:, 2] = 0.0  # dead on the calibration data
    weight = rng.normal(size=(6, 4))
    scale = np.abs(weight).max(axis=0) / 127
    q = gptq_quantize(weight, x.T @ x / len(x), scale, np.zeros(4), -127, 127)
    np.testing.assert_array_equal(q[2], np.clip(np.round(weight[2] / scale), -127, 127))


def test_mixed_precision_candidates_leave_out_layers_holding_a_large_share_of_the_weights(tmp_path: Path) -> None:
    from builder.compression.quantization import weighted_nodes

    path = small_cnn(tmp_path / "cnn.onnx")  # weights: stem 432, dw 144, pw 384, fc 240 of 1200
    assert weighted_nodes(path) == ["stem", "dw", "pw", "fc"]
    assert weighted_nodes(path, 0.3) == ["dw", "fc"]
