"""The pure comparison every target's verification uses."""
from __future__ import annotations

import numpy as np

from builder.targets.base import TOLERANCES, compare_outputs


def _samples(values):
    return [{"out": np.asarray(v, dtype=np.float32)[None]} for v in values]


def test_fp32_passes_noise_and_fails_a_real_difference_naming_the_worst_output():
    ref = _samples([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    ok = compare_outputs("m", _samples([[1.0, 2.0, 3.00001], [3.0, 1.0, 0.0]]), ref, TOLERANCES["fp32"])
    assert ok.passed
    bad = compare_outputs("m", _samples([[1.0, 2.0, 3.5], [3.0, 1.0, 0.0]]), ref, TOLERANCES["fp32"])
    assert not bad.passed and bad.output == "out" and abs(bad.max_abs_diff - 0.5) < 1e-6 and "atol" in bad.reason


def test_int8_is_judged_by_agreement_not_elementwise():
    ref = _samples([[1.0, 5.0, 0.0], [4.0, 0.0, 1.0]])
    close = compare_outputs("m", _samples([[1.2, 4.6, 0.1], [3.7, 0.2, 1.1]]), ref, TOLERANCES["int8"])
    assert close.passed and close.top1_agreement == 1.0
    flipped = compare_outputs("m", _samples([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0]]), ref, TOLERANCES["int8"])
    assert not flipped.passed and flipped.top1_agreement == 0.0


def test_nan_outputs_never_pass():
    ref = _samples([[1.0, 2.0]])
    assert not compare_outputs("m", _samples([[np.nan, 2.0]]), ref, TOLERANCES["int8"]).passed
