"""The artificial slowdown the loop demo and e2e test throttle a device with: f × the model's
typical compute, not f × each inference's own time (which multiplied scheduling noise by f)."""
from __future__ import annotations

import pytest

from agent.config import LoadSettings
from agent.load import LoadController


def test_a_preempted_inference_is_not_multiplied_by_the_slowdown():
    load = LoadController(LoadSettings(slowdown_factor=10.0))
    delays = [load.slowdown_delay_s(0.001, model_key="wide") for _ in range(20)]
    assert delays[-1] == pytest.approx(0.009)  # (10 - 1) x 1 ms
    # One inference preempted for a 40 ms time slice: it sleeps 9 x the typical 1 ms, not 9 x 40 ms.
    assert load.slowdown_delay_s(0.040, model_key="wide") == pytest.approx(0.009)


def test_typical_duration_is_kept_per_model_and_follows_a_model_change():
    load = LoadController(LoadSettings(slowdown_factor=3.0))
    for _ in range(20):
        load.slowdown_delay_s(0.004, model_key="wide")
    assert load.slowdown_delay_s(0.0005, model_key="narrow") == pytest.approx(0.001)  # its own history only
    assert load.slowdown_delay_s(0.004, model_key="wide") == pytest.approx(0.008)


def test_no_slowdown_sleeps_nothing():
    load = LoadController()
    assert load.slowdown_delay_s(0.5) == 0.0
