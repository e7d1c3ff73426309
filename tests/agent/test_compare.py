"""agent/compare.py: the one output comparison, used by the builder's verification and the agent's
install-time health check, so both judge the same outputs the same way."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agent.compare import compare_arrays, cosine
from agent.errors import InstallError
from agent.install import health_check


def test_tolerance_rule_nan_and_empty_arrays() -> None:
    ref = np.array([[1.0, -2.0, 100.0]])
    edge = ref + np.array([[1e-3 + 1e-3, 0.0, 1e-3 + 0.1]]) * 0.999  # just inside atol + rtol*|ref|
    assert compare_arrays(edge, ref, atol=1e-3, rtol=1e-3).within
    assert not compare_arrays(ref + np.array([[0.0, 0.0, 0.2]]), ref, atol=1e-3, rtol=1e-3).within
    got = np.array([1.0, np.nan, 100.5])
    nan = compare_arrays(got, ref, atol=1.0, rtol=0.0)
    assert not nan.finite and not nan.within and nan.max_abs_diff == pytest.approx(0.5)
    empty = compare_arrays(np.zeros((0, 3)), np.zeros((0, 3)), 1e-3, 1e-3)
    assert (empty.max_abs_diff, empty.mean_abs_diff, empty.within) == (0.0, 0.0, True)
    assert compare_arrays(np.ones(6), np.ones((2, 3)), 0, 0).within  # read in the reference's shape


def test_cosine_of_all_zero_outputs() -> None:
    assert cosine(np.zeros(4), np.zeros(4)) == 1.0
    assert cosine(np.zeros(4), np.full(4, 1e-7)) == 1.0  # an empty map matches a near-empty one
    assert cosine(np.zeros(4), np.ones(4)) == 0.0
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)


def _check_on_device(tmp_path: Path, expected: np.ndarray, produced: np.ndarray, tolerance: dict) -> None:
    np.savez(tmp_path / "sample.npz", **{"in:x": np.ones((1, 4), np.float32), "out:y": expected})
    manifest = SimpleNamespace(sample_payload=SimpleNamespace(name="sample.npz"), verify_tolerance=tolerance,
                               artifact_id="a" * 64)
    runtime = SimpleNamespace(run=lambda feeds: {"y": produced})
    health_check(runtime, manifest, tmp_path, timing_runs=1)


def test_the_host_verification_and_the_device_health_check_agree(tmp_path: Path) -> None:
    """An all-zero output (an empty detection map) with float noise: the host's verification accepts
    it, and so must the device (it used to read cosine 0 there and refuse the model)."""
    from builder.targets.base import TOLERANCES, compare_outputs

    expected = np.zeros((1, 8), np.float32)
    produced = np.full((1, 8), 2e-7, np.float32)
    tol = TOLERANCES["fp32"]
    host = compare_outputs("model.onnx", [{"y": produced}], [{"y": expected}], tol)
    assert host.passed and host.min_cosine == 1.0
    _check_on_device(tmp_path, expected, produced, tol.as_manifest())
    wrong = np.full((1, 8), 0.5, np.float32)
    assert not compare_outputs("model.onnx", [{"y": wrong}], [{"y": expected}], tol).passed
    with pytest.raises(InstallError, match="differs from the expected output"):
        _check_on_device(tmp_path, expected, wrong, tol.as_manifest())
