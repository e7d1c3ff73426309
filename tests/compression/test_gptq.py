"""GPTQ weight rounding (quantize step, weight_rounding = "gptq"): it must lower each layer's output
error on the calibration data versus round-to-nearest under the very same scales, keep ORT's graph,
and lower the model's error on held-out inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.execution.sessions import run_onnx
from builder.compression.gptq import gptq_quantize
from builder.compression.quantization import QuantizeStep
from builder.errors import DataError, UsageError
from builder.loading.types import InputSpec

IN, HIDDEN, OUT = 48, 64, 16


def correlated_inputs(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Inputs living near a 12-dimensional subspace: rounding errors there can be cancelled."""
    mixing = np.random.default_rng(7).normal(size=(12, IN))
    return (rng.normal(size=(rows, 12)) @ mixing + 0.05 * rng.normal(size=(rows, IN))).astype(np.float32)


def mlp(path: Path) -> Path:
    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32)
    w2 = (rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def quantize(tmp_path: Path, name: str, rounding: str, mode: str = "dynamic") -> tuple[Path, dict]:
    rng = np.random.default_rng(11)
    batches = [{"x": correlated_inputs(rng, 64)} for _ in range(4)]
    work = tmp_path / name
    work.mkdir()
    state = ModelState(inputs=(InputSpec("x", (1, IN)),), output_names=("y",), onnx_path=mlp(tmp_path / "mlp.onnx"))
    ctx = StepContext(workdir=work, calibration_batches=lambda: iter(batches), task="embed")
    step = QuantizeStep(mode=mode, per_channel=True, weight_type="uint8", weight_rounding=rounding,
                        check_latency=False, preprocess=False)
    quantized, record = step.apply(state, ctx)
    return Path(quantized.onnx_path), record.facts


def held_out_error(float_path: Path, path: Path) -> float:
    batch = [{"x": correlated_inputs(np.random.default_rng(99), 512)}]
    return float(np.mean((run_onnx(path, batch) - run_onnx(float_path, batch)) ** 2))


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_gptq_lowers_the_layer_error_under_fixed_scales() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(IN, HIDDEN))
    x = correlated_inputs(rng, 2048).astype(np.float64)
    hessian = x.T @ x / len(x)
    scale = np.abs(weight).max(axis=0) / 127.0
    zero = np.zeros(HIDDEN)
    nearest = np.clip(np.round(weight / scale), -128, 127)
    gptq = gptq_quantize(weight, hessian, scale, zero, -128, 127)

    def error(q: np.ndarray) -> float:
        delta = weight - q * scale
        return float(np.sum(delta * (hessian @ delta)))

    assert gptq.min() >= -128 and gptq.max() <= 127 and np.array_equal(gptq, np.round(gptq))
    assert error(gptq) < 0.5 * error(nearest)
    assert (gptq != nearest).mean() > 0.05  # it really chose other levels


def test_gptq_step_keeps_the_graph_and_scales_and_lowers_the_error(tmp_path: Path) -> None:
    nearest_path, nearest_facts = quantize(tmp_path, "nearest", "nearest")
    gptq_path, facts = quantize(tmp_path, "gptq", "gptq")
    assert "gptq_rounded" not in nearest_facts
    assert facts["gptq_rounded"] == 2 and facts["gptq_layer_error_ratio"] < 0.8
    assert [n.op_type for n in onnx.load(str(gptq_path)).graph.node] == \
        [n.op_type for n in onnx.load(str(nearest_path)).graph.node]
    a, b = initializers(nearest_path), initializers(gptq_path)
    for name in ("w1_scale", "w1_zero_point", "w2_scale", "w2_zero_point"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["w1_quantized"], b["w1_quantized"])
    float_path = tmp_path / "mlp.onnx"
    assert held_out_error(float_path, gptq_path) < held_out_error(float_path, nearest_path)


def test_gptq_works_on_static_qdq_too(tmp_path: Path) -> None:
    _, facts = quantize(tmp_path, "static", "gptq", mode="static")
    assert facts["gptq_rounded"] == 2 and facts["gptq_layer_error_ratio"] < 1.0


def test_gptq_needs_data_and_int8() -> None:
    assert QuantizeStep(weight_rounding="gptq").requires_data()
    with pytest.raises(UsageError, match="weight_rounding"):
        QuantizeStep(mode="fp16", weight_rounding="gptq")
    with pytest.raises(UsageError, match="unknown"):
        QuantizeStep(weight_rounding="adaround")


def test_gptq_without_data_is_refused(tmp_path: Path) -> None:
    state = ModelState(inputs=(InputSpec("x", (1, IN)),), output_names=("y",), onnx_path=mlp(tmp_path / "mlp.onnx"))
    ctx = StepContext(workdir=tmp_path, calibration_batches=None, task="embed")
    with pytest.raises(DataError, match="--data"):
        QuantizeStep(weight_rounding="gptq", check_latency=False).apply(state, ctx)
