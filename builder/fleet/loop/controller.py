"""The re-compression loop's decision function: pure, over plain data, tested without a broker.

Given a device's policy, what the loop remembers about it (:class:`DeviceLoopState`), its recent
field telemetry windows and its model's ladder (rungs ordered from most accurate to fastest), it
returns one :class:`Decision`: keep, wait, step down, step up, accept or roll back a change, or
start a search. ``builder.fleet.loop.service`` carries decisions out; this module never does I/O.

Rules (``docs/loop.md`` explains them with numbers):

* A change is judged first: after ``judge_windows`` windows on the new rung, a step down is kept
  only if its p95 dropped by ``min_improvement`` against the windows that triggered it (and the
  device reported no failure or fidelity under the floor); otherwise it is rolled back and the rung
  is marked bad for that device, never to be tried again. A step up is kept if p95 meets the
  objective; otherwise it is rolled back and the next step up to that rung needs twice the headroom.
* Step down after ``violate_windows`` consecutive windows over the objective (after cooldown), to
  the most accurate more-compressed rung whose predicted latency (its estimate x the device's
  latency factor measured over those windows) meets the objective and that meets every floor and
  budget. If none does: step to the fastest allowed rung that is faster, and/or ask for a search
  with the calibrated, tighter target.
* Step up after ``headroom_windows`` consecutive windows under ``objective x headroom_fraction``
  (after cooldown), to the most accurate rung predicted at or under ``objective x step_up_margin``.
  The gap between the two thresholds is the hysteresis that keeps the loop from oscillating.
* A rung under a floor or over a budget is never a target; if the device runs one (the policy got
  stricter) the loop moves it to the fastest rung that meets them, without waiting.
"""
from __future__ import annotations

import enum
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

from builder.fleet.loop.policy import Policy

CALIBRATION_ALPHA = 0.3
# One window may move the latency factor by at most this ratio, so a single spike cannot swing it.
CALIBRATION_MAX_STEP = 2.0
MAX_STEP_UP_BACKOFF = 6


class Action(str, enum.Enum):
    KEEP = "keep"              # nothing to do
    WAIT = "wait"              # something to do, but pacing says not yet (cooldown, judging)
    STEP_DOWN = "step_down"    # push a more compressed rung
    STEP_UP = "step_up"        # push a more accurate rung
    ACCEPT = "accept"          # the last change is judged good
    ROLLBACK = "rollback"      # the last change is judged bad: go back to where it came from
    SEARCH = "search"          # no rung fits: run `builder optimize` with a tighter target


class ChangeKind(str, enum.Enum):
    STEP_DOWN = "step_down"
    STEP_UP = "step_up"
    RESTORE_FLOOR = "restore_floor"


@dataclass(frozen=True)
class Rung:
    """One verified point of a model's ladder. Latency is the roofline estimate for the device's
    profile (uncalibrated); accuracy/fidelity are what `builder optimize` measured."""

    artifact_id: str
    estimated_latency_ms: float
    accuracy: Optional[float] = None
    fidelity: Optional[float] = None
    energy_mj: Optional[float] = None
    memory_mb: Optional[float] = None
    label: str = ""


@dataclass(frozen=True)
class FieldWindow:
    """One telemetry window of real requests on the device (it covers ``end_ts - window_s`` to ``end_ts``)."""

    end_ts: float
    artifact_id: Optional[str]
    p95_ms: Optional[float]
    requests: int
    window_s: float = 0.0

    @property
    def start_ts(self) -> float:
        return self.end_ts - self.window_s


@dataclass(frozen=True)
class PendingChange:
    """A change the loop made and has not judged yet."""

    kind: ChangeKind
    at_ts: float
    from_artifact: str
    to_artifact: str
    baseline_p95_ms: float
    device_failed: bool = False          # install / health check / runtime failure reported
    failure_reason: str = ""
    measured_fidelity: Optional[float] = None  # from the device's benchmark, when it reports one


@dataclass(frozen=True)
class DeviceLoopState:
    """What the loop remembers about one device between decisions."""

    latency_factor: float = 1.0
    factor_samples: int = 0
    last_change_ts: Optional[float] = None
    pending: Optional[PendingChange] = None
    bad_rungs: frozenset[str] = frozenset()
    step_up_failures: Mapping[str, int] = field(default_factory=dict)
    search_pending: bool = False


@dataclass(frozen=True)
class SearchRequest:
    """Ask `builder optimize` for a rung that meets ``target_latency_ms`` in *estimate* units
    (the objective divided by the device's latency factor), with the policy's floors."""

    target_latency_ms: float
    objective_ms: float
    latency_factor: float
    accuracy_floor: Optional[float]
    fidelity_floor: Optional[float]
    model: Optional[str] = None        # what to search: the policy's [search] model and data
    data: Optional[str] = None
    input_shape: Optional[str] = None
    trials: int = 20


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    target_artifact: Optional[str] = None
    mark_bad: Optional[str] = None
    step_up_failed: Optional[str] = None
    change_kind: Optional[ChangeKind] = None
    search: Optional[SearchRequest] = None
    numbers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def changes_model(self) -> bool:
        return self.action in (Action.STEP_DOWN, Action.STEP_UP, Action.ROLLBACK)

    def event_detail(self) -> dict[str, Any]:
        """The decision as the detail of a fleet event (reason and the numbers behind it)."""
        detail: dict[str, Any] = {"action": self.action.value, "reason": self.reason, "numbers": dict(self.numbers)}
        if self.target_artifact:
            detail["target_artifact"] = self.target_artifact
        if self.mark_bad:
            detail["mark_bad"] = self.mark_bad
        if self.change_kind:
            detail["change_kind"] = self.change_kind.value
        if self.search:
            detail["search"] = {"target_latency_ms": self.search.target_latency_ms,
                                "objective_ms": self.search.objective_ms,
                                "latency_factor": self.search.latency_factor}
        return detail


# ---------------------------------------------------------------------------------------------
# Calibration


def update_latency_factor(factor: float, samples: int, measured_ms: float, estimated_ms: float,
                          alpha: float = CALIBRATION_ALPHA) -> tuple[float, int]:
    """One step of the device's latency factor (field latency / estimate): an EWMA in log space
    whose step is clipped to x/÷ ``CALIBRATION_MAX_STEP``, so a spike nudges it and a sustained
    change (a throttled device) moves it within a few windows. Returns (factor, samples)."""
    if measured_ms <= 0 or estimated_ms <= 0 or not math.isfinite(measured_ms):
        return factor, samples
    ratio = measured_ms / estimated_ms
    if samples == 0:
        return ratio, 1
    step = math.log(ratio) - math.log(factor)
    limit = math.log(CALIBRATION_MAX_STEP)
    step = max(-limit, min(limit, step))
    return math.exp(math.log(factor) + alpha * step), samples + 1


# ---------------------------------------------------------------------------------------------
# Helpers


def rung_allowed(rung: Rung, policy: Policy) -> tuple[bool, str]:
    """Whether a rung meets every floor and budget; when not, says which and by how much."""
    checks = (
        ("accuracy", rung.accuracy, policy.accuracy_floor, "floor"),
        ("fidelity", rung.fidelity, policy.fidelity_floor, "floor"),
        ("energy_mj", rung.energy_mj, policy.energy_mj_budget, "budget"),
        ("memory_mb", rung.memory_mb, policy.memory_mb_budget, "budget"),
    )
    for name, value, limit, kind in checks:
        if limit is None:
            continue
        if value is None:
            # An unmeasured rung cannot prove it meets a floor: refusing it keeps the floor a promise.
            return False, f"{name} unknown (policy {kind} {limit})"
        if (kind == "floor" and value < limit) or (kind == "budget" and value > limit):
            return False, f"{name} {value:g} vs {kind} {limit:g}"
    return True, ""


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _trailing(windows: Sequence[FieldWindow], predicate: Any) -> list[FieldWindow]:
    out: list[FieldWindow] = []
    for w in reversed(windows):
        if not predicate(w):
            break
        out.append(w)
    out.reverse()
    return out


def _find(ladder: Sequence[Rung], artifact_id: Optional[str]) -> Optional[int]:
    for i, rung in enumerate(ladder):
        if rung.artifact_id == artifact_id:
            return i
    return None


# ---------------------------------------------------------------------------------------------
# The decision


def decide(policy: Policy, state: DeviceLoopState, current_artifact: Optional[str],
           windows: Sequence[FieldWindow], ladder: Sequence[Rung], now: float) -> Decision:
    """The loop's next move for one device. Pure: same inputs, same decision.

    ``windows`` are the device's recent telemetry windows, oldest first (any artifact);
    ``ladder`` is ordered from most accurate to fastest.
    """
    pacing = policy.pacing
    objective = policy.latency_p95_ms
    usable = [w for w in windows if w.p95_ms is not None and w.requests >= pacing.min_samples]
    base: dict[str, Any] = {"objective_p95_ms": objective, "latency_factor": round(state.latency_factor, 4)}

    if state.pending is not None:
        return _judge(policy, state.pending, current_artifact, usable, base)

    idx = _find(ladder, current_artifact)
    if idx is None:
        return Decision(Action.KEEP, f"device runs {current_artifact or 'nothing'}, which is not on the ladder",
                        numbers=base)
    current = ladder[idx]

    ok, why = rung_allowed(current, policy)
    if not ok:
        allowed = [r for r in ladder if r.artifact_id not in state.bad_rungs and rung_allowed(r, policy)[0]]
        if not allowed:
            return Decision(Action.KEEP, f"current rung fails the policy ({why}) and no rung on the ladder meets it",
                            numbers=base)
        target = min(allowed, key=lambda r: r.estimated_latency_ms)
        target_idx = _find(ladder, target.artifact_id)
        assert target_idx is not None  # target is one of the ladder's rungs
        return Decision(Action.STEP_UP if target_idx < idx else Action.STEP_DOWN,
                        f"current rung fails the policy ({why}); moving to the fastest rung that meets it",
                        target_artifact=target.artifact_id, change_kind=ChangeKind.RESTORE_FLOOR,
                        numbers={**base, "target_estimated_ms": target.estimated_latency_ms})

    since = state.last_change_ts if state.last_change_ts is not None else float("-inf")
    # A window that began before the last change mixes two rungs' requests: it is not evidence.
    recent = [w for w in usable if w.artifact_id == current_artifact and w.start_ts >= since]
    cooldown_left = 0.0 if state.last_change_ts is None else state.last_change_ts + pacing.cooldown_s - now

    violating = _trailing(recent, lambda w: w.p95_ms > objective)
    if len(violating) >= pacing.violate_windows:
        return _step_down(policy, state, ladder, idx, violating[-pacing.violate_windows:], cooldown_left, base)

    headroom_limit = objective * pacing.headroom_fraction
    headroom = _trailing(recent, lambda w: w.p95_ms <= headroom_limit)
    if headroom and idx > 0:
        return _step_up(policy, state, ladder, idx, headroom, cooldown_left, base)

    numbers = {**base}
    if recent:
        numbers["last_p95_ms"] = recent[-1].p95_ms
    numbers["violating_windows"] = len(violating)
    return Decision(Action.KEEP, "within objective" if not violating else
                    f"{len(violating)} of {pacing.violate_windows} violating windows", numbers=numbers)


def _judge(policy: Policy, pending: PendingChange, current_artifact: Optional[str], usable: Sequence[FieldWindow],
           base: dict[str, Any]) -> Decision:
    pacing = policy.pacing
    numbers = {**base, "baseline_p95_ms": pending.baseline_p95_ms}
    if current_artifact != pending.to_artifact and not pending.device_failed:
        back = [w for w in usable if w.artifact_id == current_artifact and w.start_ts >= pending.at_ts]
        if current_artifact == pending.from_artifact and len(back) >= pacing.judge_windows:
            # The agent rolled back by itself (health or latency watchdog): the change failed.
            pending = replace(pending, device_failed=True,
                              failure_reason=f"device went back to {current_artifact} by itself")
    bad_on_failure = pending.kind != ChangeKind.STEP_UP or pending.device_failed
    if pending.device_failed:
        return Decision(Action.ROLLBACK, f"device failed on {pending.to_artifact}: {pending.failure_reason or 'no reason given'}",
                        target_artifact=pending.from_artifact, mark_bad=pending.to_artifact if bad_on_failure else None,
                        numbers=numbers)
    floor = policy.fidelity_floor
    if pending.measured_fidelity is not None and floor is not None and pending.measured_fidelity < floor:
        numbers["measured_fidelity"] = pending.measured_fidelity
        return Decision(Action.ROLLBACK, f"device-measured fidelity {pending.measured_fidelity:.4f} under the floor {floor}",
                        target_artifact=pending.from_artifact, mark_bad=pending.to_artifact, numbers=numbers)
    post = [w for w in usable if w.artifact_id == pending.to_artifact and w.start_ts >= pending.at_ts]
    numbers["judge_windows_seen"] = len(post)
    if len(post) < pacing.judge_windows:
        return Decision(Action.WAIT, f"judging {pending.kind.value} to {pending.to_artifact}: "
                        f"{len(post)} of {pacing.judge_windows} windows", numbers=numbers)
    post_p95 = _median([w.p95_ms for w in post[-pacing.judge_windows:]])  # type: ignore[misc]
    numbers["post_p95_ms"] = round(post_p95, 4)
    if pending.kind == ChangeKind.STEP_UP:
        if post_p95 <= policy.latency_p95_ms:
            return Decision(Action.ACCEPT, f"step up kept: p95 {post_p95:.2f} ms meets {policy.latency_p95_ms} ms",
                            target_artifact=pending.to_artifact, numbers=numbers)
        return Decision(Action.ROLLBACK, f"step up broke the objective: p95 {post_p95:.2f} ms > {policy.latency_p95_ms} ms",
                        target_artifact=pending.from_artifact, step_up_failed=pending.to_artifact, numbers=numbers)
    if pending.kind == ChangeKind.RESTORE_FLOOR:
        return Decision(Action.ACCEPT, f"floor restored; p95 now {post_p95:.2f} ms",
                        target_artifact=pending.to_artifact, numbers=numbers)
    required = pending.baseline_p95_ms * (1 - pacing.min_improvement)
    numbers["required_p95_ms"] = round(required, 4)
    if post_p95 <= required:
        return Decision(Action.ACCEPT, f"step down kept: p95 {pending.baseline_p95_ms:.2f} -> {post_p95:.2f} ms",
                        target_artifact=pending.to_artifact, numbers=numbers)
    return Decision(Action.ROLLBACK, f"step down did not help: p95 {pending.baseline_p95_ms:.2f} -> {post_p95:.2f} ms "
                    f"(needed <= {required:.2f})", target_artifact=pending.from_artifact,
                    mark_bad=pending.to_artifact, numbers=numbers)


def _step_down(policy: Policy, state: DeviceLoopState, ladder: Sequence[Rung], idx: int,
               violating: Sequence[FieldWindow], cooldown_left: float, base: dict[str, Any]) -> Decision:
    objective = policy.latency_p95_ms
    current = ladder[idx]
    p95s = [w.p95_ms for w in violating if w.p95_ms is not None]  # all of them: violating windows are usable ones
    observed = _median(p95s)
    # The factor over the violating windows describes the device *now* (the EWMA lags a sudden throttle).
    factor_now = observed / current.estimated_latency_ms
    numbers = {**base, "violating_p95_ms": [round(p, 4) for p in p95s], "baseline_p95_ms": round(observed, 4),
               "latency_factor_now": round(factor_now, 4), "current_estimated_ms": current.estimated_latency_ms}
    if cooldown_left > 0:
        numbers["cooldown_left_s"] = round(cooldown_left, 3)
        return Decision(Action.WAIT, f"p95 over {objective} ms for {len(violating)} windows, but in cooldown",
                        numbers=numbers)
    candidates = []
    skipped = {}
    for rung in ladder[idx + 1:]:
        if rung.artifact_id in state.bad_rungs:
            skipped[rung.artifact_id] = "marked bad on this device"
            continue
        ok, why = rung_allowed(rung, policy)
        if not ok:
            skipped[rung.artifact_id] = why
            continue
        candidates.append(rung)
    predictions = {r.artifact_id: round(r.estimated_latency_ms * factor_now, 4) for r in candidates}
    numbers["predicted_p95_ms"] = predictions
    if skipped:
        numbers["skipped"] = skipped
    fits = [r for r in candidates if r.estimated_latency_ms * factor_now <= objective]
    if fits:
        target = fits[0]
        return Decision(Action.STEP_DOWN,
                        f"p95 {observed:.2f} ms > {objective} ms for {len(violating)} windows; "
                        f"{target.label or target.artifact_id} predicted {predictions[target.artifact_id]:.2f} ms",
                        target_artifact=target.artifact_id, change_kind=ChangeKind.STEP_DOWN, numbers=numbers)
    search = None
    if policy.search_enabled and not state.search_pending:
        search = SearchRequest(target_latency_ms=objective / factor_now, objective_ms=objective,
                               latency_factor=factor_now, accuracy_floor=policy.accuracy_floor,
                               fidelity_floor=policy.fidelity_floor, model=policy.search_model,
                               data=policy.search_data, input_shape=policy.search_input_shape,
                               trials=policy.search_trials)
    faster = [r for r in candidates if r.estimated_latency_ms < current.estimated_latency_ms]
    if faster:
        target = min(faster, key=lambda r: r.estimated_latency_ms)
        return Decision(Action.STEP_DOWN,
                        f"p95 {observed:.2f} ms > {objective} ms and no rung is predicted to meet it; "
                        f"stepping to the fastest allowed rung{' and searching' if search else ''}",
                        target_artifact=target.artifact_id, change_kind=ChangeKind.STEP_DOWN, search=search,
                        numbers=numbers)
    if search is not None:
        return Decision(Action.SEARCH, f"p95 {observed:.2f} ms > {objective} ms and no allowed rung is faster; "
                        f"searching for {search.target_latency_ms:.3f} ms (estimate units)", search=search,
                        numbers=numbers)
    return Decision(Action.KEEP, f"p95 {observed:.2f} ms > {objective} ms but no allowed rung is faster "
                    f"({'a search was requested' if state.search_pending else 'search disabled'})", numbers=numbers)


def _step_up(policy: Policy, state: DeviceLoopState, ladder: Sequence[Rung], idx: int,
             headroom: Sequence[FieldWindow], cooldown_left: float, base: dict[str, Any]) -> Decision:
    pacing = policy.pacing
    objective = policy.latency_p95_ms
    current = ladder[idx]
    factor_recent = _median([w.p95_ms / current.estimated_latency_ms for w in headroom])  # type: ignore[operator]
    # Conservative: the slower of the long-run factor and what the headroom windows show.
    factor = max(state.latency_factor, factor_recent) if state.factor_samples else factor_recent
    limit = objective * pacing.step_up_margin
    numbers = {**base, "headroom_windows": len(headroom), "latency_factor_used": round(factor, 4),
               "step_up_limit_ms": limit, "last_p95_ms": headroom[-1].p95_ms}
    target = None
    for rung in ladder[:idx]:
        if rung.artifact_id in state.bad_rungs or not rung_allowed(rung, policy)[0]:
            continue
        if rung.estimated_latency_ms * factor <= limit:
            target = rung
            break
    if target is None:
        return Decision(Action.KEEP, f"headroom for {len(headroom)} windows but no more accurate rung is predicted "
                        f"under {limit:.2f} ms", numbers=numbers)
    failures = min(state.step_up_failures.get(target.artifact_id, 0), MAX_STEP_UP_BACKOFF)
    needed = pacing.headroom_windows * (2 ** failures)
    predicted = target.estimated_latency_ms * factor
    numbers.update(headroom_windows_needed=needed, target_predicted_ms=round(predicted, 4))
    if len(headroom) < needed:
        return Decision(Action.KEEP, f"headroom {len(headroom)} of {needed} windows", numbers=numbers)
    if cooldown_left > 0:
        numbers["cooldown_left_s"] = round(cooldown_left, 3)
        return Decision(Action.WAIT, "headroom, but in cooldown", numbers=numbers)
    return Decision(Action.STEP_UP, f"p95 under {objective * pacing.headroom_fraction:.2f} ms for {len(headroom)} windows; "
                    f"{target.label or target.artifact_id} predicted {predicted:.2f} ms <= {limit:.2f} ms",
                    target_artifact=target.artifact_id, change_kind=ChangeKind.STEP_UP, numbers=numbers)


def apply_decision(state: DeviceLoopState, decision: Decision, current_artifact: Optional[str],
                   baseline_p95_ms: Optional[float], now: float) -> DeviceLoopState:
    """The state after the loop carried a decision out (for dry-run, the loop does not call this
    for changes). Kept beside :func:`decide` so tests can drive the whole loop with plain data."""
    if decision.action in (Action.STEP_DOWN, Action.STEP_UP) and decision.target_artifact:
        pending = PendingChange(kind=decision.change_kind or ChangeKind(decision.action.value), at_ts=now,
                                from_artifact=current_artifact or "", to_artifact=decision.target_artifact,
                                baseline_p95_ms=float(baseline_p95_ms or decision.numbers.get("baseline_p95_ms", 0.0)))
        state = replace(state, pending=pending, last_change_ts=now)
    elif decision.action == Action.ACCEPT:
        state = replace(state, pending=None)
    elif decision.action == Action.ROLLBACK:
        failures = dict(state.step_up_failures)
        if decision.step_up_failed:
            failures[decision.step_up_failed] = failures.get(decision.step_up_failed, 0) + 1
        bad = state.bad_rungs | ({decision.mark_bad} if decision.mark_bad else set())
        state = replace(state, pending=None, last_change_ts=now, bad_rungs=frozenset(bad), step_up_failures=failures)
    if decision.search is not None:
        state = replace(state, search_pending=True)
    return state
