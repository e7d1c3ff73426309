"""The optimize plot's front is the 2-D non-dominated set of the two plotted objectives: a staircase
in which latency and quality both rise (the 4-objective front projected on two axes zig-zags)."""
from __future__ import annotations

from builder.search.objectives import CandidateMetrics, ScoredCandidate
from builder.search.outputs import latency_quality_front


def _candidate(key: str, loss: float, latency: float, size: int, violation: float = 0.0) -> ScoredCandidate:
    metrics = CandidateMetrics(fidelity=1 - loss, download_bytes=size, file_bytes=size, host_latency_ms=1.0,
                               device_latency_ms=latency, energy_mj=1.0)
    return ScoredCandidate(key, (), metrics, (loss, latency, float(size), 1.0), {"x": violation})


def test_front_of_the_two_plotted_objectives_is_monotone_and_dominates_the_rest() -> None:
    # on the 4-objective front a small-but-slow-and-bad point would sit between good ones
    pool = [_candidate("fast-bad", 0.30, 1.0, 900), _candidate("small", 0.25, 3.0, 100),
            _candidate("mid", 0.10, 2.0, 800), _candidate("slow-good", 0.01, 5.0, 950),
            _candidate("infeasible-best", 0.0, 0.5, 10, violation=1.0)]
    front = latency_quality_front(pool)
    assert [c.key for c in front] == ["fast-bad", "mid", "slow-good"]
    latencies = [c.objectives[1] for c in front]
    qualities = [1 - c.objectives[0] for c in front]
    assert latencies == sorted(latencies) and qualities == sorted(qualities)
    assert latency_quality_front([pool[-1]])[0].key == "infeasible-best"  # none feasible: all count
