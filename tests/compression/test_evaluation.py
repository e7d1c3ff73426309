"""Evaluation: MACs, params, fidelity metrics, task detection, and broken results flagged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from builder.compression._export import export_module
from builder.analysis.weights import count_parameters
from builder.compression.evaluate import (EvalConfig, baseline_evaluation, output_fidelity, detect_task, evaluate_model,
                                          model_macs)
from tests.support.models import DIGITS_INPUTS

FAST = EvalConfig(warmup_runs=2, timed_runs=10)


def test_macs_and_params_of_the_digits_cnn_match_the_architecture(digits_model, tmp_path: Path) -> None:
    export_module(digits_model, DIGITS_INPUTS, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    # conv 1->32 @8x8, conv 32->64 @8x8, pool, conv 64->64 @4x4, fc 64->128, fc 128->10 (3x3 kernels)
    expected = 64 * 32 * 9 + 64 * 64 * 32 * 9 + 16 * 64 * 64 * 9 + 64 * 128 + 128 * 10
    assert model_macs(model, DIGITS_INPUTS) == expected
    params, nonzero = count_parameters(model)
    torch_params = sum(p.numel() for n, p in digits_model.named_parameters() if "features.1" not in n
                       and "features.4" not in n and "features.8" not in n)  # BatchNorm folded away
    assert params == torch_params and nonzero == params


def test_fidelity_metrics_for_classifiers_and_embeddings() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((100, 10))
    same = output_fidelity(logits, logits, "classify")
    assert same.agreement == 1.0 and same.cosine_mean > 0.9999
    shuffled = output_fidelity(logits, rng.permutation(logits), "classify")
    assert shuffled.agreement < 0.3
    emb = rng.standard_normal((50, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert detect_task(emb, has_labels=False) == "embed"
    assert detect_task(logits, has_labels=False) == "classify"
    assert detect_task(emb, has_labels=True) == "classify"
    noisy = output_fidelity(emb, emb + 0.01 * rng.standard_normal(emb.shape), "embed")
    assert noisy.agreement > 0.9 and noisy.cosine_mean > 0.99


def test_baseline_then_a_broken_model_is_flagged(digits_model, digits_test_data, tmp_path: Path) -> None:
    export_module(digits_model, DIGITS_INPUTS, tmp_path / "good.onnx")
    baseline, reference = baseline_evaluation(tmp_path / "good.onnx", digits_test_data, DIGITS_INPUTS, FAST)
    assert baseline.task == "classify" and baseline.accuracy > 0.9 and not baseline.flags
    assert baseline.latency_p50_ms > 0 and baseline.latency_p95_ms >= baseline.latency_p50_ms
    assert 0 < baseline.download_bytes < baseline.file_bytes
    with torch.no_grad():
        for p in digits_model.parameters():
            p.copy_(torch.randn_like(p))
    export_module(digits_model, DIGITS_INPUTS, tmp_path / "broken.onnx")
    broken = evaluate_model(tmp_path / "broken.onnx", digits_test_data, DIGITS_INPUTS, reference, FAST)
    assert "fidelity_collapse" in broken.flags and broken.fidelity.agreement < 0.5
    # Same architecture, runs interleaved with the reference: about as fast, and not flagged slower.
    assert broken.speedup_vs_input is not None and 0.3 < broken.speedup_vs_input < 3.0
    assert "slower_than_input" not in broken.flags
