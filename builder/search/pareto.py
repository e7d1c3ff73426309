"""Pareto front, the recommended point, and the explanation when nothing meets the targets.

Pure functions over minimised objective vectors and ``ScoredCandidate`` values; no optuna, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from builder.errors import SearchError
from builder.search.objectives import (
    Baseline,
    Calibration,
    ScoredCandidate,
    Targets,
    violation_text,
)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` (all minimised): no worse everywhere and strictly better somewhere."""
    if len(a) != len(b):
        raise ValueError("objective vectors differ in length")
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in input order.

    Ties (identical vectors) do not dominate each other, so all copies stay on the front; callers
    that want one per vector deduplicate (``front_of`` does, by recipe key).
    """
    front = []
    for i, p in enumerate(points):
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i):
            front.append(i)
    return front


def front_of(candidates: Sequence[ScoredCandidate]) -> list[ScoredCandidate]:
    """The non-dominated candidates (one per recipe key), ordered most accurate first, then fastest."""
    unique: dict[str, ScoredCandidate] = {}
    for c in candidates:
        unique.setdefault(c.key, c)
    pool = list(unique.values())
    chosen = [pool[i] for i in non_dominated([c.objectives for c in pool])]
    return sorted(chosen, key=lambda c: (c.objectives[0], c.objectives[1], c.objectives[2]))


def recommend(candidates: Sequence[ScoredCandidate], targets: Targets) -> ScoredCandidate | None:
    """The chosen point among feasible Pareto-optimal candidates, or None when none is feasible.

    With a quality target (accuracy drop / fidelity) the quality is a floor and the search takes the
    fastest candidate that holds it (then smallest, then most accurate); with only latency/size
    targets it takes the most accurate candidate that fits (then fastest). Objectives are
    ``(1 - quality, latency, size, energy)``.
    """
    # The front of the feasible set: a feasible point may be dominated only by an infeasible one
    # (e.g. more accurate but below the fidelity floor), and it must stay eligible.
    feasible = front_of([c for c in candidates if c.feasible])
    if not feasible:
        return None
    if targets.has_quality_target:
        return min(feasible, key=lambda c: (c.objectives[1], c.objectives[2], c.objectives[0]))
    return min(feasible, key=lambda c: (c.objectives[0], c.objectives[1], c.objectives[2]))


@dataclass(frozen=True)
class InfeasibleExplanation:
    """Why no candidate met the targets: a one-line summary, one line per constraint, closest points."""

    summary: str
    per_constraint: tuple[str, ...]
    closest: tuple[ScoredCandidate, ...]


def explain_infeasible(candidates: Sequence[ScoredCandidate], targets: Targets, baseline: Baseline,
                       calibration: Calibration, n_closest: int = 5) -> InfeasibleExplanation:
    """Say which constraints failed and by how much, and which candidates came closest.

    Per constraint: how many candidates met it and the best value reached. Closest: smallest sum of
    normalised violations. The summary names the closest candidate's failed constraints with numbers.
    """
    if not candidates:
        return InfeasibleExplanation(
            summary="no candidate was evaluated (all trials failed or were pruned); see the trial log",
            per_constraint=(), closest=())
    lines = []
    for name in targets.names:
        met = [c for c in candidates if c.violations.get(name, 0.0) <= 0]
        best = min(candidates, key=lambda c: c.violations.get(name, 0.0))
        lines.append(f"{name}: met by {len(met)}/{len(candidates)}; best: "
                     + violation_text(name, best.metrics, targets, baseline, calibration))
    closest = tuple(sorted(candidates, key=lambda c: (c.total_violation, c.objectives))[:n_closest])
    top = closest[0]
    failed = [violation_text(n, top.metrics, targets, baseline, calibration)
              for n, v in top.violations.items() if v > 0]
    summary = (f"no recipe of {len(candidates)} evaluated meets the targets ({targets.describe()}); "
               f"closest: {'; '.join(failed)}")
    return InfeasibleExplanation(summary=summary, per_constraint=tuple(lines), closest=closest)


def require_recommendation(candidates: Sequence[ScoredCandidate], targets: Targets, baseline: Baseline,
                           calibration: Calibration) -> ScoredCandidate:
    """The recommended candidate, or ``SearchError`` with the explanation's summary (never a silent best effort)."""
    chosen = recommend(candidates, targets)
    if chosen is None:
        raise SearchError(explain_infeasible(candidates, targets, baseline, calibration).summary)
    return chosen
