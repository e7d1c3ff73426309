"""Pure search logic: Pareto front, recommendation under constraints, infeasibility explanation,
target parsing, constraint values, calibration. Fast: no model, no optuna."""
from __future__ import annotations

import random

import pytest

from builder.errors import SearchError, UsageError
from builder.search import objectives as obj
from builder.search.pareto import dominates, explain_infeasible, front_of, non_dominated, recommend, require_recommendation

BASE = obj.Baseline(accuracy=0.97, download_bytes=1_000_000, host_latency_ms=1.0, device_latency_ms=10.0, energy_mj=40.0)
NO_CAL = obj.Calibration()


def _metrics(accuracy: float, latency_ms: float, size: int) -> obj.CandidateMetrics:
    return obj.CandidateMetrics(fidelity=accuracy / 0.97, download_bytes=size, file_bytes=size, host_latency_ms=1.0,
                                device_latency_ms=latency_ms, energy_mj=latency_ms * 4, accuracy=accuracy)


def _cand(key: str, accuracy: float, latency_ms: float, size: int, targets: obj.Targets,
          calibration: obj.Calibration = NO_CAL) -> obj.ScoredCandidate:
    return obj.score(key, [{"type": "quantize", "mode": key}], _metrics(accuracy, latency_ms, size), targets, BASE,
                     calibration, use_accuracy=True)


def test_non_dominated_front_is_truly_non_dominated_on_random_points_with_ties():
    rng = random.Random(7)
    for _ in range(30):
        points = [tuple(rng.choice([0, 1, 2, 3]) for _ in range(3)) for _ in range(25)]
        points += points[:5]  # exact duplicates (ties)
        front = set(non_dominated(points))
        for i in front:  # nothing dominates a front point
            assert not any(dominates(points[j], points[i]) for j in range(len(points)))
        for i in set(range(len(points))) - front:  # every other point is dominated by someone
            assert any(dominates(points[j], points[i]) for j in range(len(points)))
        for i in front:  # a tie of a front point is on the front too
            assert all(j in front for j, p in enumerate(points) if p == points[i])


def test_dominates_needs_strictly_better_somewhere():
    assert dominates((1, 2), (1, 3))
    assert not dominates((1, 2), (1, 2))
    assert not dominates((0, 3), (1, 2))


def test_front_dedups_same_recipe_and_orders_most_accurate_first():
    t = obj.Targets()
    a = _cand("a", 0.97, 10.0, 900_000, t)
    b = _cand("b", 0.95, 4.0, 300_000, t)
    c = _cand("c", 0.94, 5.0, 400_000, t)  # dominated by b
    front = front_of([a, b, c, a])
    assert [x.key for x in front] == ["a", "b"]


def test_recommend_fastest_that_holds_quality_floor():
    t = obj.Targets(max_accuracy_drop=0.01)
    fast_bad = _cand("fast", 0.90, 2.0, 200_000, t)
    mid = _cand("mid", 0.965, 4.0, 300_000, t)
    slow_good = _cand("slow", 0.97, 9.0, 900_000, t)
    chosen = recommend([fast_bad, mid, slow_good], t)
    assert chosen is not None and chosen.key == "mid"
    assert not fast_bad.feasible and mid.feasible


def test_recommend_most_accurate_within_latency_and_size():
    t = obj.Targets(max_latency_ms=5.0, max_download_bytes=500_000)
    cands = [_cand("a", 0.97, 9.0, 900_000, t), _cand("b", 0.96, 4.5, 450_000, t), _cand("c", 0.93, 2.0, 100_000, t)]
    assert recommend(cands, t).key == "b"


def test_feasible_point_dominated_only_by_infeasible_one_stays_eligible():
    # b is more accurate and faster than a, but misses the size target: a must still be chosen.
    t = obj.Targets(max_download_bytes=500_000)
    a = _cand("a", 0.95, 5.0, 400_000, t)
    b = _cand("b", 0.96, 4.0, 600_000 - 1, t)
    b = obj.ScoredCandidate(b.key, b.steps, b.metrics, (b.objectives[0], b.objectives[1], 300_000.0, b.objectives[3]),
                            b.violations)
    assert recommend([a, b], t).key == "a"


def test_impossible_target_names_the_failed_constraint_and_the_gap():
    t = obj.Targets(max_latency_ms=1.0, max_accuracy_drop=0.01)
    cands = [_cand("a", 0.97, 9.0, 900_000, t), _cand("b", 0.965, 3.0, 300_000, t)]
    assert recommend(cands, t) is None
    explanation = explain_infeasible(cands, t, BASE, NO_CAL)
    assert "max-latency: met by 0/2" in explanation.per_constraint[0]
    assert "3.00 ms vs max 1 ms (over by 2.00 ms)" in explanation.summary
    assert explanation.closest[0].key == "b"
    with pytest.raises(SearchError, match="no recipe of 2 evaluated meets the targets"):
        require_recommendation(cands, t, BASE, NO_CAL)


def test_calibration_scales_latency_constraint():
    t = obj.Targets(max_latency_ms=5.0)
    c = _cand("a", 0.97, 4.0, 1, t)
    assert c.feasible
    slow_device = obj.calibration_from_pairs([(8.0, 4.0), (9.0, 4.5), (100.0, 1.0)], "test")
    assert slow_device.factor == pytest.approx(2.0) and slow_device.samples == 3
    assert not _cand("a", 0.97, 4.0, 1, t, slow_device).feasible
    assert obj.calibration_from_pairs([], "empty").factor == 1.0


@pytest.mark.parametrize("text,ms", [("20ms", 20.0), ("0.5s", 500.0), ("250us", 0.25), ("1.5 ms", 1.5)])
def test_parse_latency(text, ms):
    assert obj.parse_latency_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text,n", [("5MB", 5_000_000), ("5MiB", 5 * 2**20), ("800kB", 800_000), ("1200B", 1200)])
def test_parse_size(text, n):
    assert obj.parse_size_bytes(text) == n


def test_parse_quality_targets():
    assert obj.parse_accuracy_drop("1%") == pytest.approx(0.01)
    assert obj.parse_accuracy_drop("0.005") == pytest.approx(0.005)
    assert obj.parse_fidelity("0.99") == pytest.approx(0.99)
    assert obj.parse_fidelity("99.5%") == pytest.approx(0.995)
    assert obj.parse_duration_s("30m") == 1800.0


@pytest.mark.parametrize("call,text,match", [
    (obj.parse_latency_ms, "20", "has no unit"),
    (obj.parse_latency_ms, "20 parsecs", "unknown unit"),
    (obj.parse_size_bytes, "big", "not a number with a unit"),
    (obj.parse_accuracy_drop, "1", "ambiguous"),
    (obj.parse_fidelity, "1.5", r"must be in \(0, 1\]"),
    (obj.parse_duration_s, "30", "needs a unit"),
])
def test_bad_targets_are_one_clear_line(call, text, match):
    with pytest.raises(UsageError, match=match) as info:
        call(text)
    assert "\n" not in str(info.value)


def test_accuracy_targets_need_labels():
    t = obj.Targets(max_accuracy_drop=0.01)
    unlabeled = obj.CandidateMetrics(fidelity=0.99, download_bytes=1, file_bytes=1, host_latency_ms=1,
                                     device_latency_ms=1, energy_mj=1)
    with pytest.raises(UsageError, match="needs labels"):
        obj.constraint_values(unlabeled, t, BASE, NO_CAL)


def test_without_a_fleet_store_the_estimate_is_uncalibrated_and_says_so(tmp_path):
    calibration = obj.fleet_calibration(tmp_path, "raspberry-pi-4")
    assert calibration.factor == 1.0 and calibration.samples == 0
    assert calibration.source.startswith("none: no fleet store")
