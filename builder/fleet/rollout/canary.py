"""Canary rollouts as pure decisions: which devices go first, and whether the rest may follow.

A group push installs the new model on the canary devices, measures each one against the model it
ran before (on-device benchmark, and field telemetry when enough real requests were served), and
only then pushes to the rest. Any canary that did not end "active", or that regressed beyond the
thresholds, stops the rollout and the canaries are rolled back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from builder.errors import UsageError


@dataclass(frozen=True)
class CanaryThresholds:
    """How much worse than the previous model a canary may be and still pass."""

    max_latency_ratio: float = 1.25  # candidate p95 / previous p95
    max_power_ratio: float = 1.25  # only when both were measured
    max_error_rate: float = 0.01  # field errors / requests
    min_field_requests: int = 20  # fewer requests: field latency is not compared


@dataclass(frozen=True)
class CanaryEvidence:
    """What one canary showed. ``outcome`` is the final transfer state ("active", "failed", ...)."""

    device_id: str
    outcome: str
    error: str | None = None
    previous_p95_ms: float | None = None  # on-device benchmark of the previous model
    candidate_p95_ms: float | None = None  # on-device benchmark of the new one
    previous_field_p95_ms: float | None = None
    candidate_field_p95_ms: float | None = None
    field_requests: int = 0
    field_errors: int = 0
    previous_power_w: float | None = None
    candidate_power_w: float | None = None


@dataclass(frozen=True)
class CanaryVerdict:
    proceed: bool
    reasons: tuple[str, ...]  # why it stops (or notes when it proceeds without a comparison)


def split_canaries(device_ids: Sequence[str], percent: float) -> tuple[list[str], list[str]]:
    """First ceil(n × percent / 100) devices in id order (at least one) are canaries; 0 % means none."""
    if not 0 <= percent <= 100:
        raise UsageError(f"--canary {percent}% is outside 0..100; pass e.g. --canary 10")
    ordered = sorted(dict.fromkeys(device_ids))
    if percent == 0 or not ordered:
        return [], ordered
    count = min(len(ordered), max(1, math.ceil(len(ordered) * percent / 100)))
    return ordered[:count], ordered[count:]


def _ratio_reason(name: str, device: str, before: float | None, after: float | None, limit: float, unit: str) -> str | None:
    if before is None or after is None or before <= 0:
        return None
    if after > before * limit:
        return (f"{device}: {name} {after:.2f} {unit} vs {before:.2f} {unit} before "
                f"(×{after / before:.2f} > ×{limit:.2f} allowed)")
    return None


def judge_canaries(evidence: Sequence[CanaryEvidence], thresholds: CanaryThresholds | None = None) -> CanaryVerdict:
    """Proceed only when every canary is active and none regressed against its previous model."""
    limits = thresholds or CanaryThresholds()
    if not evidence:
        return CanaryVerdict(False, ("no canary reported back",))
    problems: list[str] = []
    notes: list[str] = []
    for ev in evidence:
        if ev.outcome != "active":
            problems.append(f"{ev.device_id}: {ev.outcome}" + (f" ({ev.error})" if ev.error else ""))
            continue
        for reason in (
            _ratio_reason("benchmark p95", ev.device_id, ev.previous_p95_ms, ev.candidate_p95_ms, limits.max_latency_ratio, "ms"),
            _ratio_reason("power", ev.device_id, ev.previous_power_w, ev.candidate_power_w, limits.max_power_ratio, "W"),
        ):
            if reason:
                problems.append(reason)
        if ev.field_requests >= limits.min_field_requests:
            reason = _ratio_reason("field p95", ev.device_id, ev.previous_field_p95_ms, ev.candidate_field_p95_ms,
                                   limits.max_latency_ratio, "ms")
            if reason:
                problems.append(reason)
            rate = ev.field_errors / ev.field_requests
            if rate > limits.max_error_rate:
                problems.append(f"{ev.device_id}: field error rate {rate:.1%} > {limits.max_error_rate:.1%}")
        if ev.previous_p95_ms is None or ev.candidate_p95_ms is None:
            notes.append(f"{ev.device_id}: no benchmark of both models to compare; judged on install and health only")
    if problems:
        return CanaryVerdict(False, tuple(problems))
    return CanaryVerdict(True, tuple(notes))
