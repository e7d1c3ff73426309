"""quantize: dynamic/static/fp16 stay within their precision's tolerance on the digits CNN; mixed
precision keeps named nodes in float and reports them; the trap detector refuses broken results."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.execution.sessions import run_onnx
from builder.compression.quantization import QuantizeStep, latency_ratio
from builder.compression.smoothing import SmoothStep
from builder.errors import CompressionError, DataError, UsageError
from builder.loading.types import InputSpec, LoadedModel
from tests.compression.compression_helpers import context


def digits_state(loaded: LoadedModel) -> ModelState:
    return ModelState(inputs=loaded.inputs, output_names=loaded.output_names, onnx_path=loaded.onnx_path)


def workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def accuracy(path: Path, data) -> float:
    logits = run_onnx(path, data.batches(64))
    return float((logits.argmax(axis=1) == data.labels).mean())


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_dynamic_int8_stays_close_to_float(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    step = QuantizeStep(mode="dynamic", check_latency=False)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    assert state.precision == "int8"
    assert {"ConvInteger", "MatMulInteger"} & set(op_types(state.onnx_path))
    assert record.facts["cosine_mean"] > 0.99 and record.facts["agreement"] >= 0.97
    assert accuracy(state.onnx_path, digits_test_data) >= accuracy(digits_loaded.onnx_path, digits_test_data) - 0.02


def weight_dtypes(path: Path) -> dict[str, set]:
    """op type -> numpy dtypes of its constant weight input (input 1), over the quantized graph."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i).dtype for i in model.graph.initializer}
    out: dict[str, set] = {}
    for node in model.graph.node:
        if len(node.input) > 1 and node.input[1] in inits:
            out.setdefault(node.op_type, set()).add(inits[node.input[1]])
    return out


def test_weight_types_store_each_op_type_in_its_own_int8_format(digits_loaded, digits_test_data, tmp_path) -> None:
    step = QuantizeStep(mode="dynamic", weight_type="int8", weight_types={"Conv": "uint8"}, check_latency=False)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    dtypes = weight_dtypes(state.onnx_path)
    assert dtypes["ConvInteger"] == {np.dtype(np.uint8)} and dtypes["MatMulInteger"] == {np.dtype(np.int8)}
    assert record.facts["cosine_mean"] > 0.99
    assert not list(Path(state.onnx_path).parent.glob(".weight-types-*"))  # the intermediate pass is gone
    plain, _ = QuantizeStep(mode="dynamic", weight_type="int8", check_latency=False).apply(
        digits_state(digits_loaded), context(workdir(tmp_path, "p"), calibration=digits_test_data))
    assert weight_dtypes(plain.onnx_path)["ConvInteger"] == {np.dtype(np.int8)}
    with pytest.raises(UsageError, match="weight_types applies to mode 'dynamic'"):
        QuantizeStep(mode="static", weight_types={"Conv": "uint8"})
    with pytest.raises(UsageError, match="weight_types"):
        QuantizeStep(weight_types={"Conv": "int4"})


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_qdq_per_channel_stays_close_to_float(calibration, digits_loaded, digits_test_data, tmp_path: Path) -> None:
    step = QuantizeStep(mode="static", calibration=calibration, check_latency=False, calibration_samples=128)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    ops = op_types(state.onnx_path)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3
    assert record.facts["agreement"] >= 0.95
    assert accuracy(state.onnx_path, digits_test_data) >= accuracy(digits_loaded.onnx_path, digits_test_data) - 0.03


def test_fp16_halves_weights_and_keeps_float32_io(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    step = QuantizeStep(mode="fp16", check_latency=False)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    model = onnx.load(str(state.onnx_path))
    assert state.precision == "fp16"
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in model.graph.input)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output)
    big = [init for init in model.graph.initializer if np.prod(init.dims) > 100]
    assert big and all(init.data_type == TensorProto.FLOAT16 for init in big)
    ref = run_onnx(digits_loaded.onnx_path, digits_test_data.batches(64))
    out = run_onnx(state.onnx_path, digits_test_data.batches(64))
    np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max())
    assert record.facts["agreement"] >= 0.99


def test_mixed_precision_keeps_most_sensitive_nodes_in_float(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    # An unreachable target forces the search to keep max_kept nodes and report them.
    step = QuantizeStep(mode="dynamic", target_cosine=0.999999, max_kept=2, check_latency=False, eval_samples=64)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    kept = record.facts["kept_float"]
    assert len(kept) == 2 and state.precision == "mixed"
    assert len(record.facts["sensitivity"]) >= 4  # every weighted node was measured
    assert [r["node"] for r in record.facts["sensitivity"][:2]] == kept
    nodes = {node.name: node for node in onnx.load(str(state.onnx_path)).graph.node}
    assert all(nodes[name].op_type in ("Conv", "Gemm", "MatMul") for name in kept)
    assert any("target not reached" in w for w in record.warnings)


def test_explicit_keep_float_node_stays_float(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    first_conv = next(n.name for n in onnx.load(str(digits_loaded.onnx_path)).graph.node if n.op_type == "Conv")
    step = QuantizeStep(mode="static", keep_float=[first_conv], check_latency=False)
    state, record = step.apply(digits_state(digits_loaded), context(workdir(tmp_path, "q"), calibration=digits_test_data))
    model = onnx.load(str(state.onnx_path))
    producers = {out: node for node in model.graph.node for out in node.output}
    conv = next(node for node in model.graph.node if node.name == first_conv)
    weight_producer = producers.get(conv.input[1])
    assert weight_producer is None or weight_producer.op_type != "DequantizeLinear"  # float weight, no QDQ
    assert record.facts["kept_float"] == [first_conv]


def test_static_without_data_is_refused_up_front(digits_loaded, tmp_path: Path) -> None:
    step = QuantizeStep(mode="static")
    assert step.requires_data()
    with pytest.raises(DataError, match="--data"):
        step.apply(digits_state(digits_loaded), StepContext(workdir=workdir(tmp_path, "q")))


def test_bad_parameters_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="mode"):
        QuantizeStep(mode="int4")
    with pytest.raises(UsageError, match="calibration"):
        QuantizeStep(calibration="kl")


# ---- traps ----------------------------------------------------------------------------------------
def outlier_model(path: Path, slow_padding: int = 0) -> Path:
    """y = x @ W with one input channel 1000x larger than the others and (almost) no weight on it:
    per-tensor int8 activations spend their whole range on the outlier and zero the real signal."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    w[0] = 1e-4
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm")]
    inits = [numpy_helper.from_array(w, "w")]
    last = "y0"
    for i in range(slow_padding):  # float-only busy work: makes a model reliably slower than another
        inits.append(numpy_helper.from_array(np.eye(8, dtype=np.float32), f"eye{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"eye{i}"], [f"p{i}"], name=f"pad{i}"))
        last = f"p{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def outlier_batches(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        x = rng.normal(size=(32, 16)).astype(np.float32)
        x[:, 0] *= 1000.0
        out.append({"x": x})
    return out


def outlier_state(tmp_path: Path) -> ModelState:
    return ModelState(inputs=(InputSpec("x", (1, 16)),), output_names=("y",),
                      onnx_path=outlier_model(tmp_path / "outlier.onnx"))


def batches_ctx(path: Path, batches) -> StepContext:
    return StepContext(workdir=path, calibration_batches=lambda: iter(batches), task="classify")


def test_static_qdq_fidelity_collapse_is_refused(tmp_path: Path) -> None:
    step = QuantizeStep(mode="static", per_channel=False, check_latency=False)
    with pytest.raises(CompressionError, match="fidelity collapse"):
        step.apply(outlier_state(tmp_path), batches_ctx(workdir(tmp_path, "q"), outlier_batches()))


def test_auto_mode_records_each_rejected_mode(tmp_path: Path) -> None:
    step = QuantizeStep(mode="auto", per_channel=False, check_latency=False)
    with pytest.raises(CompressionError, match="no quantization mode") as err:
        step.apply(outlier_state(tmp_path), batches_ctx(workdir(tmp_path, "q"), outlier_batches()))
    assert "dynamic:" in str(err.value) and "static:" in str(err.value)


def test_smoothing_rescues_the_outlier_model(tmp_path: Path) -> None:
    batches = outlier_batches()
    state, smooth_record = SmoothStep(alpha=0.9).apply(outlier_state(tmp_path), batches_ctx(workdir(tmp_path, "s"), batches))
    assert smooth_record.facts["smoothed_tensors"] == 1
    ref = run_onnx(tmp_path / "outlier.onnx", batches)
    np.testing.assert_allclose(run_onnx(state.onnx_path, batches), ref, rtol=1e-4, atol=1e-3)  # exact in float
    step = QuantizeStep(mode="static", per_channel=True, check_latency=False)
    quantized, record = step.apply(state, batches_ctx(workdir(tmp_path, "q"), batches))
    assert record.facts["cosine_mean"] > 0.99


def test_latency_check_flags_a_slower_model(tmp_path: Path) -> None:
    fast = outlier_model(tmp_path / "fast.onnx")
    slow = outlier_model(tmp_path / "slow.onnx", slow_padding=300)
    ratio = latency_ratio(fast, slow, {"x": np.ones((1, 16), np.float32)}, rounds=5, min_round_s=0.02)
    step = QuantizeStep()
    problem = step._trap(dataclasses.replace(_measurement(), latency_ratio=ratio), "dynamic")
    assert problem is not None and "slower" in problem
    assert latency_ratio(slow, fast, {"x": np.ones((1, 16), np.float32)}, rounds=5, min_round_s=0.02) < 1.0


@pytest.mark.parametrize("readings, refused", [((1.6, 0.9), False), ((1.6, 1.5, 1.7), True), ((0.8,), False)])
def test_a_slowdown_is_refused_only_when_every_measurement_agrees(tmp_path, monkeypatch, readings, refused) -> None:
    """One noisy reading (a load burst on a shared CI machine) must not refuse a faster model; a real
    slowdown reads slow every time. ``readings`` stand in for the machine's timings, the rest is real."""
    import builder.compression.quantization as quantization

    calls = iter(readings)
    monkeypatch.setattr(quantization, "latency_ratio", lambda *a, **k: next(calls))
    state = ModelState(inputs=(InputSpec("x", (1, 16)),), output_names=("y",),
                       onnx_path=outlier_model(tmp_path / "m.onnx"))
    batches = [{"x": np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)}]
    step = QuantizeStep(mode="dynamic", latency_confirmations=2)
    if refused:
        with pytest.raises(CompressionError, match="slower than the input"):
            step.apply(state, batches_ctx(workdir(tmp_path, "q"), batches))
    else:
        _, record = step.apply(state, batches_ctx(workdir(tmp_path, "q"), batches))
        assert record.facts["latency_ratio"] == min(readings)
    assert next(calls, None) is None  # every reading consumed: a pass stops measuring, a refusal asks 3 times


def _measurement():
    from builder.compression.quantization import Measurement

    return Measurement(cosine_mean=1.0, cosine_min=1.0, agreement=1.0, latency_ratio=1.0)


# ---- MiniLM (real pretrained transformer) ---------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_loaded(tmp_path_factory):
    from builder.loading import load_model
    from builder.zoo.minilm import INPUT_SPEC

    return load_model("builder.zoo.minilm:minilm", INPUT_SPEC, workdir=tmp_path_factory.mktemp("minilm"))


def minilm_ctx(path: Path, count: int = 24) -> StepContext:
    from builder.zoo.minilm import machine_sentences, tokenize

    feeds = tokenize(machine_sentences(count))
    batches = [{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, count, 8)]
    return StepContext(workdir=path, calibration_batches=lambda: iter(batches), task="embed")


@pytest.mark.slow
def test_minilm_naive_static_qdq_is_refused(minilm_loaded, tmp_path: Path) -> None:
    """The measured trap: static QDQ with default settings collapses MiniLM's embeddings (cosine ~0.4)."""
    state = ModelState(minilm_loaded.inputs, minilm_loaded.output_names, onnx_path=minilm_loaded.onnx_path)
    step = QuantizeStep(mode="static", per_channel=False, check_latency=False, preprocess=False)
    with pytest.raises(CompressionError, match="fidelity collapse"):
        step.apply(state, minilm_ctx(workdir(tmp_path, "q")))


@pytest.mark.slow
def test_minilm_fused_smoothed_dynamic_int8_keeps_embeddings(minilm_loaded, tmp_path: Path) -> None:
    from builder.compression.fusion import OptimizeGraphStep, non_portable_ops

    state = ModelState(minilm_loaded.inputs, minilm_loaded.output_names, onnx_path=minilm_loaded.onnx_path)
    state, fused = OptimizeGraphStep(level="basic", bert_fusions=True, num_heads=12, hidden_size=384).apply(
        state, minilm_ctx(workdir(tmp_path, "f")))
    assert fused.facts["fused_ops"].get("Attention") == 6
    state, smoothed = SmoothStep(alpha=0.85).apply(state, minilm_ctx(workdir(tmp_path, "s")))
    assert smoothed.facts["smoothed_tensors"] >= 18  # Attention input, attention output, FFN in and out per layer
    state, record = QuantizeStep(mode="dynamic", check_latency=False, preprocess=False).apply(
        state, minilm_ctx(workdir(tmp_path, "q")))
    model = onnx.load(str(state.onnx_path))
    ops = {node.op_type for node in model.graph.node}
    assert {"QAttention", "MatMulInteger"} <= ops and not non_portable_ops(model)
    assert record.facts["cosine_mean"] > 0.99
    assert state.onnx_path.stat().st_size < 23e6


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_histogram_calibration_takes_a_short_last_batch(calibration, digits_loaded, digits_test_data, tmp_path: Path) -> None:
    """ORT's histogram calibrators fail on batches of unequal size; the step evens them out."""
    batches = list(digits_test_data.batches(64))[:2]
    batches.append({k: v[:10] for k, v in batches[0].items()})
    ctx = StepContext(workdir=workdir(tmp_path, "q"), calibration_batches=lambda: iter(batches), task="classify")
    step = QuantizeStep(mode="static", calibration=calibration, check_latency=False)
    _, record = step.apply(digits_state(digits_loaded), ctx)
    assert record.facts["mode"] == "static" and record.facts["cosine_mean"] > 0.9


def test_histogram_calibration_samples_fit_the_memory_available(tmp_path: Path) -> None:
    """Entropy/Percentile keep every activation of every sample; the samples are cut to fit."""
    from builder.compression.quantization import (HISTOGRAM_COPIES, HISTOGRAM_MEMORY_SHARE, activation_bytes_per_sample,
                                                  fit_histogram_memory)

    model = outlier_model(tmp_path / "m.onnx", slow_padding=4)
    batches = outlier_batches(4)  # 128 samples
    per_sample = activation_bytes_per_sample(model, batches[0])
    assert per_sample == 4 * 8 * 6  # node outputs y0, p0..p3 and y: 8 float32 each per sample
    room_for_10 = int(10 * per_sample * HISTOGRAM_COPIES / HISTOGRAM_MEMORY_SHARE)
    cut = fit_histogram_memory(model, batches, available_bytes=room_for_10)
    assert sum(len(b["x"]) for b in cut) == 10
    assert fit_histogram_memory(model, batches, available_bytes=10**12) is batches  # plenty: unchanged
