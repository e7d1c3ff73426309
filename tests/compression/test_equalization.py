"""equalize: exact in float on Conv -> ReLU -> depthwise Conv -> ReLU -> Conv, and it cuts the static
int8 error of a model whose depthwise input channels have ranges 1000x apart; bias correction
removes the mean output shift that int8 weights give a depthwise layer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.compression.equalization import EqualizeStep, find_pairs
from builder.compression.evaluate import output_fidelity
from builder.execution.sessions import run_onnx
from builder.compression.quantization import QuantizeStep
from builder.loading.types import InputSpec

INPUTS = (InputSpec("x", (1, 3, 12, 12)),)


def unbalanced_dw_model(path: Path, spread: float = 3.0) -> Path:
    """x -> Conv 3->8 -> Relu -> depthwise 3x3 -> Relu -> Conv 8->4 -> GlobalAveragePool -> y.
    Output channel i of the first Conv is scaled by a_i (10^-spread .. 1) and the depthwise filter i
    by 1/a_i: the same function as a balanced net, but per-tensor int8 activations crush the small
    channels."""
    rng = np.random.default_rng(0)
    scales = np.logspace(-spread, 0, 8).astype(np.float32)
    rng.shuffle(scales)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * scales[:, None, None, None]
    b1 = (rng.normal(size=8).astype(np.float32) + 0.5) * scales
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) / scales[:, None, None, None] * 0.3
    b2 = rng.normal(size=8).astype(np.float32) * 0.1
    w3 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    b3 = rng.normal(size=4).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pw"),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def batches(count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed + i).normal(size=(16, 3, 12, 12)).astype(np.float32)} for i in range(count)]


def state_of(path: Path) -> ModelState:
    return ModelState(INPUTS, ("y",), onnx_path=path)


def ctx(tmp_path: Path, name: str, data: list[dict[str, np.ndarray]]) -> StepContext:
    work = tmp_path / name
    work.mkdir()
    return StepContext(workdir=work, calibration_batches=lambda: iter(data), task="classify")


def static_int8(tmp_path: Path, name: str, path: Path, data, **params) -> tuple[Path, dict]:
    step = QuantizeStep(mode="static", per_channel=True, check_latency=False, min_cosine=0.0, min_agreement=0.0, **params)
    state, record = step.apply(state_of(path), ctx(tmp_path, name, data))
    return Path(state.onnx_path), dict(record.facts)


def test_equalization_finds_the_chain_and_keeps_float_outputs(tmp_path: Path) -> None:
    source = unbalanced_dw_model(tmp_path / "dw.onnx")
    assert [(p.first, p.second) for p in find_pairs(onnx.load(str(source)))] == [("conv1", "dw"), ("dw", "pw")]
    state, record = EqualizeStep().apply(state_of(source), ctx(tmp_path, "eq", batches()))
    data = batches(2, seed=10)
    np.testing.assert_allclose(run_onnx(state.onnx_path, data), run_onnx(source, data), rtol=1e-4, atol=1e-5)
    assert record.facts["pairs"] == 2
    assert record.facts["range_spread_after"] < record.facts["range_spread_before"] / 10


def test_equalization_cuts_static_int8_error_on_unbalanced_depthwise_ranges(tmp_path: Path) -> None:
    source = unbalanced_dw_model(tmp_path / "dw.onnx")
    calib, held_out = batches(4), batches(2, seed=20)
    equalized, _ = EqualizeStep().apply(state_of(source), ctx(tmp_path, "eq", calib))
    reference = run_onnx(source, held_out)
    plain, _ = static_int8(tmp_path, "q-plain", source, calib)
    balanced, _ = static_int8(tmp_path, "q-eq", Path(equalized.onnx_path), calib)
    error_plain = np.abs(run_onnx(plain, held_out) - reference).mean()
    error_eq = np.abs(run_onnx(balanced, held_out) - reference).mean()
    assert error_eq < 0.5 * error_plain
    assert output_fidelity(reference, run_onnx(balanced, held_out), "classify").cosine_mean > \
        output_fidelity(reference, run_onnx(plain, held_out), "classify").cosine_mean


def test_bias_correction_removes_the_mean_shift_of_int8_depthwise_outputs(tmp_path: Path) -> None:
    source = unbalanced_dw_model(tmp_path / "dw.onnx", spread=0.0)
    calib, held_out = batches(4), batches(2, seed=30)
    reference = run_onnx(source, held_out)
    plain, _ = static_int8(tmp_path, "q-plain", source, calib)
    corrected, facts = static_int8(tmp_path, "q-bc", source, calib, bias_correction=True)
    assert facts["bias_corrected"] == 3
    shift_plain = np.abs((run_onnx(plain, held_out) - reference).mean(axis=0)).mean()
    shift_corrected = np.abs((run_onnx(corrected, held_out) - reference).mean(axis=0)).mean()
    assert shift_corrected < shift_plain
