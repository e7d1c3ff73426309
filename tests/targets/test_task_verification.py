"""Verification per task and precision: no false rejections (fp16 CNN at |diff| 0.04, fp32 within
ORT's own level spread) and no false accepts (int8 at 75% top-1 without labels, maps by IoU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.targets.base import MIN_INT8_SAMPLES, TOLERANCES, Tolerance, compare_outputs
from builder.targets.task_metrics import detect_task, map_iou, task_score


def _per_sample(batch: np.ndarray, name: str = "out") -> list[dict[str, np.ndarray]]:
    return [{name: batch[i:i + 1]} for i in range(batch.shape[0])]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_task_kind_is_detected_from_one_sample_output():
    rng = np.random.default_rng(0)
    assert detect_task(rng.standard_normal(10) * 3) == "classify"
    unit = rng.standard_normal(16)
    assert detect_task(unit / np.linalg.norm(unit)) == "embed"
    assert detect_task(_softmax(rng.standard_normal((40, 30)))) == "sequence"  # OCR recogniser (T, classes)
    assert detect_task(rng.standard_normal((12, 384))) == "embed"  # token embeddings
    assert detect_task(1 / (1 + np.exp(-rng.standard_normal((1, 32, 32))))) == "dense_map"  # detector map
    assert detect_task(np.array([0.3])) == "regression"
    # a confident 2-class softmax has norm ~1 too; it is a classifier (PP-OCR's direction classifier)
    assert detect_task(np.array([[0.9995, 0.0005]])) == "classify"
    assert detect_task(rng.standard_normal(10), has_labels=True) == "classify"


def test_dense_map_is_judged_by_iou_not_nearest_neighbours():
    rng = np.random.default_rng(1)
    ref = 1 / (1 + np.exp(-4 * rng.standard_normal((8, 1, 24, 24))))
    near = np.clip(ref + rng.normal(0, 0.01, ref.shape), 0, 1)
    check = compare_outputs("m", _per_sample(near), _per_sample(ref), TOLERANCES["int8"])
    assert check.task == "dense_map" and check.passed and check.task_score > 0.9
    broken = np.zeros_like(ref)
    broken[:, :, :12] = 1.0  # half the map on, the rest off: an overlap a NN metric cannot see
    bad = compare_outputs("m", _per_sample(broken), _per_sample(ref), Tolerance(np.inf, np.inf, 0.0, 0.9, False))
    assert not bad.passed and "map IoU" in bad.reason
    assert map_iou(list(ref), list(ref)) == 1.0


def test_nearest_neighbours_are_not_judged_on_too_few_samples_but_are_on_enough():
    """Four token-embedding samples: one swapped neighbour read NN 0.5 at cosine 0.98 and refused a
    good MiniLM build; under MIN_NN_SAMPLES cosine decides, from there NN is judged again."""
    from builder.targets.task_metrics import MIN_NN_SAMPLES, nearest_neighbour_agreement

    rng = np.random.default_rng(4)
    ref = rng.standard_normal((MIN_NN_SAMPLES, 64))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)  # unit-norm sentence embeddings
    shuffled = rng.permutation(ref)  # every sample's neighbour changes
    assert np.isnan(nearest_neighbour_agreement(list(ref[:4]), list(shuffled[:4])))
    near = ref[:4] + 0.01 * rng.standard_normal((4, 64))  # cosine ~0.997
    few = compare_outputs("m", _per_sample(near / np.linalg.norm(near, axis=1, keepdims=True)), _per_sample(ref[:4]),
                          TOLERANCES["int8"])
    assert few.task == "embed" and few.passed
    assert nearest_neighbour_agreement(list(ref), list(ref)) == 1.0
    assert nearest_neighbour_agreement(list(ref), list(shuffled)) < 0.9


def test_compression_fidelity_of_a_probability_map_is_iou_and_not_flagged():
    from builder.compression.evaluate import EvalConfig, output_fidelity as fidelity_of, detect_task as stacked_task

    rng = np.random.default_rng(2)
    ref = 1 / (1 + np.exp(-4 * rng.standard_normal((16, 1, 20, 20))))
    got = np.clip(ref + rng.normal(0, 0.005, ref.shape), 0, 1)
    task = stacked_task(ref, has_labels=False)
    fid = fidelity_of(ref, got, task)
    assert task == "dense_map" and fid.agreement > EvalConfig().min_agreement


def test_fp16_is_judged_by_task_and_cosine_not_a_fixed_atol():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((16, 1000)).astype(np.float32) * 4
    logits[np.arange(16), rng.integers(0, 1000, 16)] += 20  # confident classes, like an ImageNet CNN
    noisy = logits + rng.uniform(-0.039, 0.039, logits.shape).astype(np.float32)
    check = compare_outputs("m", _per_sample(noisy), _per_sample(logits), TOLERANCES["fp16"])
    assert check.passed and check.max_abs_diff > 0.02 and check.top1_agreement == 1.0
    flipped = logits.copy()
    flipped[:2] = flipped[:2][:, ::-1]
    assert not compare_outputs("m", _per_sample(flipped), _per_sample(logits), TOLERANCES["fp16"]).passed


def test_int8_at_75_percent_top1_is_refused_without_labels_unless_the_user_lowers_the_floor():
    import dataclasses

    rng = np.random.default_rng(4)
    ref = rng.standard_normal((MIN_INT8_SAMPLES, 10)).astype(np.float32)
    ref[np.arange(MIN_INT8_SAMPLES), rng.integers(0, 10, MIN_INT8_SAMPLES)] += 5  # clear winners
    got = ref + rng.normal(0, 0.05, ref.shape).astype(np.float32)
    wrong = np.arange(MIN_INT8_SAMPLES) % 4 == 0  # a quarter of the samples change class
    got[wrong] = np.roll(ref[wrong], 3, axis=1)
    check = compare_outputs("m", _per_sample(got), _per_sample(ref), dataclasses.replace(TOLERANCES["int8"], min_cosine=-1.0))
    assert not check.passed and check.top1_agreement == pytest.approx(0.75) and "top-1 0.750 < 0.9" in check.reason
    lowered = dataclasses.replace(TOLERANCES["int8"], min_cosine=-1.0, min_agreement=0.7)
    assert compare_outputs("m", _per_sample(got), _per_sample(ref), lowered).passed


def test_sequence_and_regression_scores():
    rng = np.random.default_rng(5)
    seq = _softmax(rng.standard_normal((4, 25, 30)))
    other = seq.copy()
    other[0, :5] = other[0, :5][:, ::-1]  # 5 of 100 steps change their argmax (almost surely)
    assert task_score("sequence", list(seq), list(other)) == pytest.approx(0.95, abs=0.01)
    ref = rng.standard_normal((8, 1))
    assert task_score("regression", list(ref), list(ref * 1.01)) == pytest.approx(0.99, abs=1e-6)


def _mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32) * 0.3, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fp32_atol_is_widened_to_the_spread_of_ort_levels(tmp_path):
    from builder.profiles import get_profile
    from builder.targets.base import FP32_SPREAD_FACTOR, output_spread
    from builder.targets.pipeline import BuildModel, BuildRequest, reference_outputs, synthetic_samples, \
        verification_tolerance
    from agent.manifest import TensorSpec

    path = _mlp(tmp_path / "mlp.onnx")
    specs = (TensorSpec("x", (1, 64), "float32"),)
    samples = synthetic_samples(specs, 8)
    samples = type(samples)(tuple({"x": s["x"] * 1e3} for s in samples.inputs), None, "big")  # large activations
    model = BuildModel("mlp", "1", path, specs, path)
    request = BuildRequest(get_profile("x86-64-host"), "onnxruntime", "fp32", "onnx")
    tolerance, note = verification_tolerance(model, request, samples, reference_outputs(path, samples))
    spread = output_spread(reference_outputs(path, samples, "disabled"), reference_outputs(path, samples, "all"))
    assert tolerance.atol == max(TOLERANCES["fp32"].atol, FP32_SPREAD_FACTOR * spread)
    assert (note is not None) == (FP32_SPREAD_FACTOR * spread > TOLERANCES["fp32"].atol)
    user = BuildRequest(get_profile("x86-64-host"), "onnxruntime", "fp32", "onnx", task="regression", min_cosine=0.5)
    tolerance, _ = verification_tolerance(model, user, samples, reference_outputs(path, samples))
    assert tolerance.task == "regression" and tolerance.min_cosine == 0.5


def test_precision_is_honoured_or_refused_with_the_reason():
    from builder.errors import UsageError
    from builder.targets.profile_build import honoured_precision

    assert honoured_precision("fp16", True, "fp32", "onnxruntime-tensorrt") == "fp16"  # prune-only recipe, Jetson
    assert honoured_precision("int8", True, "mixed", "onnxruntime") == "mixed"
    with pytest.raises(UsageError, match="does not quantize"):
        honoured_precision("int8", True, "fp32", "onnxruntime")
    with pytest.raises(UsageError, match="quantized the model to int8"):
        honoured_precision("fp16", True, "int8", "onnxruntime-tensorrt")
    assert honoured_precision("int8", False, "fp32", "onnxruntime") == "fp32"  # the profile's default only
