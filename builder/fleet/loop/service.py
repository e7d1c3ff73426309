"""The re-compression loop inside `builder serve`: telemetry in, pushes and rollbacks out.

:class:`ReCompressionLoop` is the stateful wrapper around the pure
:func:`builder.fleet.loop.controller.decide`. For each telemetry window a device reports it

1. updates the device's latency factor (field p95 / the running rung's estimate),
2. asks the decision function what to do with the device's policy, windows and ladder,
3. carries the decision out through a :class:`DeviceActions` (push a rung, roll back) and a
   :class:`SearchLauncher` (start `builder optimize`), or only proposes it in dry-run mode,
4. records it as a fleet event (``kind = "loop.<action>"``, detail = reason + numbers) and keeps
   its own state (latency factor, pending change, bad rungs) in ``loop_state`` of the fleet store.

Telemetry arrives on the MQTT thread; decisions and pushes run on the loop's own worker thread so
a slow push never blocks telemetry intake. Tests drive :meth:`ReCompressionLoop.step` directly.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from builder.errors import UsageError
from builder.fleet.loop.controller import (
    Action, ChangeKind, Decision, DeviceLoopState, FieldWindow, PendingChange, Rung, SearchRequest,
    apply_decision, decide, update_latency_factor,
)
from builder.fleet.loop.policy import Policy, PolicyStore

if TYPE_CHECKING:
    from builder.fleet.transport.store import FleetStore

log = logging.getLogger(__name__)

EVENT_PREFIX = "loop."
MAX_WINDOWS = 200  # enough for headroom_windows x backoff on any sane policy
SEARCH_RETRY_S = 3600.0  # a search requested this long ago (finished or not) no longer blocks a new one


@dataclass(frozen=True)
class PushOutcome:
    """What happened when the loop asked a device to run an artifact."""

    ok: bool
    reason: str = ""


class DeviceActions(Protocol):
    """How the loop changes what a device runs (the fleet push API behind it)."""

    def push(self, device_id: str, artifact_id: str) -> PushOutcome:
        """Make the device run ``artifact_id``; return when it is active or has failed."""
        ...


class SearchLauncher(Protocol):
    """Starts a search for a faster rung (``builder optimize``) without waiting for it."""

    def start(self, device_id: str, profile: Optional[str], ladder: Sequence[Rung], request: SearchRequest) -> str:
        """Returns a short description of what was started (a command line, a job id)."""
        ...


class LadderSource(Protocol):
    """Where the loop finds the ladder a device's current model belongs to."""

    def ladder_for(self, device_id: str, profile: Optional[str], active_artifact_id: Optional[str]) -> Sequence[Rung]:
        ...


@dataclass(frozen=True)
class StaticLadders:
    """Ladders given up front (tests, the demo, a ladder.json): a device's ladder is the one that
    contains its active artifact, restricted to ``profile`` when the ladder names one."""

    ladders: tuple[tuple[Optional[str], tuple[Rung, ...]], ...]

    @classmethod
    def of(cls, *ladders: Sequence[Rung], profile: Optional[str] = None) -> "StaticLadders":
        return cls(tuple((profile, tuple(ladder)) for ladder in ladders))

    def ladder_for(self, device_id: str, profile: Optional[str], active_artifact_id: Optional[str]) -> Sequence[Rung]:
        for ladder_profile, rungs in self.ladders:
            if ladder_profile not in (None, profile):
                continue
            if any(r.artifact_id == active_artifact_id for r in rungs):
                return rungs
        return ()


def load_ladder_json(path: Path) -> tuple[Optional[str], tuple[Rung, ...]]:
    """Reads a ladder file: ``{"profile": ..., "rungs": [{"artifact_id", "estimated_latency_ms",
    "accuracy", "fidelity", "energy_mj", "memory_mb", "label"}, ...]}``, most accurate first."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rungs = tuple(Rung(artifact_id=str(r["artifact_id"]), estimated_latency_ms=float(r["estimated_latency_ms"]),
                           accuracy=r.get("accuracy"), fidelity=r.get("fidelity"), energy_mj=r.get("energy_mj"),
                           memory_mb=r.get("memory_mb"), label=str(r.get("label", "")))
                      for r in data["rungs"] if r.get("artifact_id"))
    except FileNotFoundError:
        raise UsageError(f"ladder file {path} not found; pass the ladder.json written by `builder optimize`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"ladder file {path} is malformed ({exc}); it needs rungs with artifact_id and "
                         "estimated_latency_ms") from None
    if not rungs:
        raise UsageError(f"ladder file {path} has no rungs")
    return data.get("profile"), rungs


# ---------------------------------------------------------------------------------------------
# Persistent per-device loop state (table ``loop_state`` of the fleet store)


@dataclass(frozen=True)
class LoopRecord:
    """The decision state plus bookkeeping: the last window folded into the latency factor and the
    last KEEP/WAIT reason recorded (so a steady state is one event, not one per window)."""

    state: DeviceLoopState = field(default_factory=DeviceLoopState)
    last_window_ts: float = float("-inf")
    last_quiet_key: str = ""
    changes: int = 0
    search_requested_ts: Optional[float] = None

    def to_json(self) -> str:
        s = self.state
        pending = None
        if s.pending is not None:
            pending = {**asdict(s.pending), "kind": s.pending.kind.value}
        return json.dumps({
            "latency_factor": s.latency_factor, "factor_samples": s.factor_samples,
            "last_change_ts": s.last_change_ts, "pending": pending, "bad_rungs": sorted(s.bad_rungs),
            "step_up_failures": dict(s.step_up_failures), "search_pending": s.search_pending,
            "last_window_ts": None if self.last_window_ts == float("-inf") else self.last_window_ts,
            "last_quiet_key": self.last_quiet_key, "changes": self.changes,
            "search_requested_ts": self.search_requested_ts,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoopRecord":
        d = json.loads(text)
        pending = d.get("pending")
        state = DeviceLoopState(
            latency_factor=float(d.get("latency_factor", 1.0)), factor_samples=int(d.get("factor_samples", 0)),
            last_change_ts=d.get("last_change_ts"),
            pending=None if pending is None else PendingChange(**{**pending, "kind": ChangeKind(pending["kind"])}),
            bad_rungs=frozenset(d.get("bad_rungs", ())), step_up_failures=dict(d.get("step_up_failures", {})),
            search_pending=bool(d.get("search_pending", False)))
        last = d.get("last_window_ts")
        return cls(state=state, last_window_ts=float("-inf") if last is None else float(last),
                   last_quiet_key=d.get("last_quiet_key", ""), changes=int(d.get("changes", 0)),
                   search_requested_ts=d.get("search_requested_ts"))


class LoopStateStore:
    """The loop's per-device records in a :class:`~builder.fleet.transport.store.FleetStore`, typed
    (the store keeps them as JSON; other processes share the file)."""

    def __init__(self, store: "FleetStore") -> None:
        self.store = store

    def load(self, device_id: str) -> LoopRecord:
        text = self.store.loop_state(device_id)
        return LoopRecord.from_json(text) if text is not None else LoopRecord()

    def save(self, device_id: str, record: LoopRecord, now: float) -> None:
        self.store.save_loop_state(device_id, record.to_json(), now)

    def all(self) -> dict[str, LoopRecord]:
        return {device_id: LoopRecord.from_json(text) for device_id, text in self.store.loop_states().items()}


def latency_factors(store: "FleetStore") -> dict[str, float]:
    """Each device's calibrated latency factor (field latency / estimate), for `fleet status --factors`.
    Devices the loop never measured are absent."""
    return {device_id: rec.state.latency_factor for device_id, rec in LoopStateStore(store).all().items()
            if rec.state.factor_samples > 0}


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class LoopEvent:
    """A decision as recorded: what the loop did (or proposed) for a device and why."""

    device_id: str
    ts: float
    kind: str  # "loop.<action>" or "loop.proposal" in dry-run
    artifact_id: Optional[str]
    detail: Mapping[str, Any]


class ReCompressionLoop:
    """Runs the decision function for every device with a policy, from its telemetry.

    ``store`` is a :class:`builder.fleet.transport.store.FleetStore` (devices, telemetry, benchmarks, events,
    and the loop's own policies and state).
    """

    def __init__(self, store: Any, actions: Optional[DeviceActions], ladders: LadderSource,
                 search: Optional[SearchLauncher] = None, dry_run: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        if actions is None and not dry_run:
            raise UsageError("the re-compression loop needs a way to push (or run it with --dry-run)")
        self.store = store
        self.actions = actions
        self.ladders = ladders
        self.search = search
        self.dry_run = dry_run
        self.clock = clock
        self.policies = PolicyStore(store)
        self.states = LoopStateStore(store)
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # -- hooks called by `builder serve` (MQTT thread): cheap, never block --------------------
    def on_telemetry(self, row: Any) -> None:
        """A telemetry row was stored for a device: schedule a decision for it."""
        self._queue.put(row.device_id)

    def on_benchmark(self, row: Any) -> None:
        """An on-device benchmark was stored: it calibrates the factor too."""
        self._queue.put(row.device_id)

    # -- worker ------------------------------------------------------------------------------
    def start(self) -> "ReCompressionLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recompression-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            device_id = self._queue.get()
            if device_id is None:
                return
            pending = {device_id}
            while True:  # coalesce a burst of reports into one decision per device
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                pending.add(more)
            for dev in sorted(pending):
                try:
                    self.step(dev)
                except Exception:  # a bad device must not stop the loop for the others
                    log.exception("re-compression loop failed for device %s", dev)

    # -- one decision -------------------------------------------------------------------------
    def step(self, device_id: str) -> Optional[Decision]:
        """Decide and act for one device now. Returns the decision (None: no policy or ladder)."""
        with self._lock:
            return self._step(device_id)

    def _step(self, device_id: str) -> Optional[Decision]:
        device = self.store.find_device(device_id)
        if device is None:
            return None
        groups = (device.group,) if device.group else ()
        _, policy = self.policies.resolve(device_id, groups)
        if policy is None:
            return None
        record = self.states.load(device_id)
        current = device.active_artifact_id
        if record.state.pending is not None:
            # The ladder is the one the change was made on, even if the device briefly runs neither rung.
            ladder = self.ladders.ladder_for(device_id, device.profile, record.state.pending.from_artifact)
        else:
            ladder = self.ladders.ladder_for(device_id, device.profile, current)
        if not ladder:
            return None
        now = self.clock()
        if record.state.search_pending and (record.search_requested_ts is None
                                            or now - record.search_requested_ts > SEARCH_RETRY_S):
            record = replace(record, state=replace(record.state, search_pending=False), search_requested_ts=None)
        windows = self._windows(device_id)
        record = self._calibrate(record, windows, ladder, device_id)
        record = self._benchmark_fidelity(record, device_id)
        decision = decide(policy, record.state, current, windows, ladder, now)
        record = self._carry_out(device, policy, ladder, record, decision, now)
        self.states.save(device_id, record, now)
        return decision

    def _windows(self, device_id: str) -> list[FieldWindow]:
        rows = self.store.telemetry(device_id, limit=MAX_WINDOWS)
        out = []
        for row in rows:
            if row.requests <= 0:
                continue
            p95 = row.p95_ms if row.p95_ms is not None else (row.latency_ms or {}).get("p95")
            out.append(FieldWindow(end_ts=row.ts, artifact_id=row.model_id, p95_ms=p95, requests=row.requests,
                                   window_s=row.window_s or 0.0))
        return out

    def _calibrate(self, record: LoopRecord, windows: Sequence[FieldWindow], ladder: Sequence[Rung],
                   device_id: str) -> LoopRecord:
        estimates = {r.artifact_id: r.estimated_latency_ms for r in ladder}
        state, last = record.state, record.last_window_ts
        for w in windows:
            if w.end_ts <= record.last_window_ts or w.p95_ms is None or w.artifact_id not in estimates:
                continue
            factor, samples = update_latency_factor(state.latency_factor, state.factor_samples, w.p95_ms,
                                                    estimates[w.artifact_id])
            state = replace(state, latency_factor=factor, factor_samples=samples)
            last = max(last, w.end_ts)
        return replace(record, state=state, last_window_ts=last)

    def _benchmark_fidelity(self, record: LoopRecord, device_id: str) -> LoopRecord:
        """A pending change is judged on the device's benchmark too: a fidelity it reports under the
        floor, or a failed health check, condemns the rung without waiting for field windows."""
        pending = record.state.pending
        if pending is None or pending.measured_fidelity is not None:
            return record
        bench = self.store.latest_benchmark(device_id, pending.to_artifact)
        if bench is None or bench.ts < pending.at_ts:
            return record
        result = dict(bench.result or {})
        fidelity = result.get("fidelity", result.get("agreement"))
        if result.get("ok") is False or result.get("error"):
            pending = replace(pending, device_failed=True,
                              failure_reason=f"benchmark failed: {result.get('error') or 'not ok'}")
        elif isinstance(fidelity, (int, float)):
            pending = replace(pending, measured_fidelity=float(fidelity))
        else:
            return record
        return replace(record, state=replace(record.state, pending=pending))

    def _carry_out(self, device: Any, policy: Policy, ladder: Sequence[Rung], record: LoopRecord,
                   decision: Decision, now: float) -> LoopRecord:
        device_id = device.device_id
        current = device.active_artifact_id
        state = record.state
        if decision.action in (Action.KEEP, Action.WAIT):
            key = f"{decision.action.value}:{decision.reason.split(':')[0].split(';')[0]}"
            if key != record.last_quiet_key and decision.action == Action.WAIT:
                self._record(device_id, decision, current, now)
            return replace(record, last_quiet_key=key if decision.action == Action.WAIT else record.last_quiet_key)

        record = replace(record, last_quiet_key="")
        if self.dry_run:
            self._record(device_id, decision, current, now, kind=f"{EVENT_PREFIX}proposal")
            if decision.changes_model or decision.action == Action.SEARCH:
                # Propose once per cooldown, not once per window.
                state = replace(state, last_change_ts=now, pending=None)
            elif decision.action == Action.ACCEPT:
                state = replace(state, pending=None)
            return replace(record, state=state)

        if decision.action == Action.SEARCH or decision.search is not None:
            # Started or not (no launcher, launcher failed: the event says which), a request blocks
            # the next one for SEARCH_RETRY_S so a device stuck over its objective is not a loop of searches.
            self._start_search(device, ladder, decision, now)
            state = replace(state, search_pending=True)
            record = replace(record, search_requested_ts=now)
        if decision.action == Action.SEARCH:
            return replace(record, state=state)

        self._record(device_id, decision, current, now)
        if decision.action in (Action.STEP_DOWN, Action.STEP_UP):
            target = decision.target_artifact
            assert target is not None
            state = apply_decision(state, decision, current, None, now)
            outcome = self._push(device_id, target)
            done = self.clock()
            pending = state.pending
            assert pending is not None
            if outcome.ok:
                # Judge (and cool down) from when the new rung is active: windows reported during the
                # transfer still measure the old one.
                state = replace(state, pending=replace(pending, at_ts=done), last_change_ts=done)
            else:
                state = replace(state, pending=replace(pending, device_failed=True, failure_reason=outcome.reason))
                self._record_plain(device_id, done, "push_failed", target,
                                   {"reason": outcome.reason, "action": decision.action.value})
            return replace(record, state=state, changes=record.changes + 1)
        if decision.action == Action.ROLLBACK:
            target = decision.target_artifact
            refreshed = self.store.find_device(device_id)
            running = refreshed.active_artifact_id if refreshed is not None else current
            if target and running != target:
                outcome = self._push(device_id, target)
                if not outcome.ok:
                    self._record_plain(device_id, now, "rollback_failed", target, {"reason": outcome.reason})
            state = apply_decision(state, decision, current, None, now)
            return replace(record, state=state, changes=record.changes + 1)
        if decision.action == Action.ACCEPT:
            return replace(record, state=apply_decision(state, decision, current, None, now))
        return record

    def _push(self, device_id: str, artifact_id: str) -> PushOutcome:
        assert self.actions is not None
        try:
            return self.actions.push(device_id, artifact_id)
        except Exception as exc:  # mapped to a failed change, which the decision function rolls back
            log.warning("push of %s to %s failed: %s", artifact_id, device_id, exc)
            return PushOutcome(False, str(exc) or type(exc).__name__)

    def _start_search(self, device: Any, ladder: Sequence[Rung], decision: Decision, now: float) -> None:
        request = decision.search
        if request is None:
            return
        if self.search is None:
            self._record_plain(device.device_id, now, "search_unavailable", None,
                               {"reason": "no search launcher configured (start serve with --loop-search)",
                                "target_latency_ms": request.target_latency_ms})
            return
        try:
            started = self.search.start(device.device_id, device.profile, ladder, request)
        except Exception as exc:
            self._record_plain(device.device_id, now, "search_failed", None, {"reason": str(exc)})
            return
        self._record(device.device_id, Decision(Action.SEARCH, decision.reason, search=request,
                                                numbers={**decision.numbers, "started": started}),
                     device.active_artifact_id, now)

    def _record(self, device_id: str, decision: Decision, artifact_id: Optional[str], now: float,
                kind: Optional[str] = None) -> None:
        detail = decision.event_detail()
        detail["dry_run"] = self.dry_run
        detail["from_artifact"] = artifact_id
        self._add_event(LoopEvent(device_id, now, kind or f"{EVENT_PREFIX}{decision.action.value}",
                                  decision.target_artifact or artifact_id, detail))
        log.info("loop %s %s: %s", device_id, decision.action.value, decision.reason)

    def _record_plain(self, device_id: str, now: float, what: str, artifact_id: Optional[str],
                      detail: Mapping[str, Any]) -> None:
        self._add_event(LoopEvent(device_id, now, f"{EVENT_PREFIX}{what}", artifact_id,
                                  {**detail, "dry_run": self.dry_run}))

    def _add_event(self, event: LoopEvent) -> None:
        from builder.fleet.transport.store import DeploymentEvent

        self.store.add_event(DeploymentEvent(device_id=event.device_id, ts=event.ts, kind=event.kind,
                                             artifact_id=event.artifact_id, detail=dict(event.detail)))


def loop_events(store: Any, device_id: Optional[str] = None, since: Optional[float] = None) -> list[Any]:
    """The loop's events (fleet events whose kind starts with ``loop.``), oldest first."""
    devices = [device_id] if device_id else [d.device_id for d in store.devices()]
    out: list[Any] = []
    for dev in devices:
        out.extend(e for e in store.events(dev, since=since) if e.kind.startswith(EVENT_PREFIX))
    return sorted(out, key=lambda e: e.ts)


def count_changes(events: Iterable[Any]) -> dict[str, int]:
    """How many model changes the loop made, by kind (for tests, the demo and `fleet events`)."""
    counts: dict[str, int] = {}
    for e in events:
        action = e.kind[len(EVENT_PREFIX):]
        if action in ("step_down", "step_up", "rollback"):
            counts[action] = counts.get(action, 0) + 1
    return counts


def summarize_events(events: Sequence[Any], labels: dict[str, str]) -> list[str]:
    """One line per loop event, artifact ids replaced by rung labels (for the demo and test logs)."""
    lines = []
    t0 = events[0].ts if events else 0.0
    for e in events:
        detail = dict(e.detail or {})
        artifact = labels.get(e.artifact_id or "", (e.artifact_id or "")[:12])
        lines.append(f"+{e.ts - t0:6.1f}s {e.kind:<18} {artifact:<8} {detail.get('reason', '')}")
    return lines


# ---------------------------------------------------------------------------------------------
# Wiring into `builder serve`: the registry's ladders, the fleet's Pusher, `builder optimize`.


def _metric(metrics: Mapping[str, Any], *names: str) -> Optional[float]:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def rung_from_metrics(artifact_id: str, metrics: Mapping[str, Any], label: str = "") -> Optional[Rung]:
    """A ladder entry's metrics as a :class:`Rung`; None when it has no latency estimate."""
    estimate = _metric(metrics, "device_latency_ms", "estimated_latency_ms", "latency_estimate_ms")
    if estimate is None or estimate <= 0:
        return None
    memory_bytes = _metric(metrics, "peak_memory_bytes")
    memory_mb = _metric(metrics, "memory_mb")
    if memory_mb is None and memory_bytes is not None:
        memory_mb = memory_bytes / 1e6
    return Rung(artifact_id=artifact_id, estimated_latency_ms=estimate, accuracy=_metric(metrics, "accuracy"),
                fidelity=_metric(metrics, "fidelity", "agreement"), energy_mj=_metric(metrics, "energy_mj"),
                memory_mb=memory_mb, label=str(metrics.get("label", "")))


@dataclass(frozen=True)
class RegistryLadders:
    """Ladders written by `builder optimize` into the artifact registry (rung 0 = most accurate)."""

    registry: Any

    def ladder_for(self, device_id: str, profile: Optional[str], active_artifact_id: Optional[str]) -> Sequence[Rung]:
        from builder.errors import BuilderError

        if not active_artifact_id:
            return ()
        try:
            record = self.registry.get(active_artifact_id)
            entries = self.registry.list_ladder(record.model_name, record.profile)
        except BuilderError:
            return ()
        rungs = [rung_from_metrics(e.artifact_id, e.metrics, e.metrics.get("label", f"rung {e.rung}"))
                 for e in entries]
        ladder = tuple(r for r in rungs if r is not None)
        return ladder if any(r.artifact_id == active_artifact_id for r in ladder) else ()


class PusherActions:
    """:class:`DeviceActions` over the fleet's :class:`builder.fleet.rollout.push.Pusher`, connected lazily
    (in the loop's worker thread) to the broker the running serve announced."""

    def __init__(self, data_dir: Path, benchmark_runs: int = 20, store_url: Optional[str] = None) -> None:
        self.data_dir = Path(data_dir)
        self.store_url = store_url
        self.benchmark_runs = benchmark_runs
        self._pusher: Any = None
        self._link: Any = None
        self._store: Any = None

    def _get(self) -> Any:
        if self._pusher is None:
            from builder.artifacts.registry import Registry
            from builder.fleet.rollout.push import PushOptions, Pusher
            from builder.fleet.transport.link import FleetLink, resolve_endpoint
            from builder.fleet.transport.store import open_store

            self._link = FleetLink(resolve_endpoint(self.data_dir), client_id=f"edgefleet-loop-{id(self):x}").connect()
            self._store = open_store(self.data_dir, self.store_url)
            self._pusher = Pusher(self._link, self._store, Registry(self.data_dir), self.data_dir,
                                  PushOptions(timeout_s=300, stall_timeout_s=60, benchmark_runs=self.benchmark_runs))
        return self._pusher

    def push(self, device_id: str, artifact_id: str) -> PushOutcome:
        outcome = self._get().push(device_id, artifact_id)  # serve stores the benchmarks the agent reports
        if outcome.ok:
            return PushOutcome(True)
        return PushOutcome(False, f"{outcome.state}: {outcome.error or 'no reason given'}")

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._store is not None:
            self._store.close()
        self._pusher = self._link = self._store = None


@dataclass(frozen=True)
class OptimizeLauncher:
    """Starts ``builder optimize`` in the background for the device's profile with the objective and
    the device's latency factor (so the search's calibrated target is the field objective), on the
    model and data the policy's ``[search]`` names. Output and log under ``<data dir>/loop-searches``."""

    data_dir: Path

    def command(self, device_id: str, profile: Optional[str], ladder: Sequence[Rung], request: SearchRequest) -> list[str]:
        import sys

        if not request.model or not request.data:
            raise UsageError(f"cannot search for {device_id}: the policy's [search] needs model and data "
                             "(e.g. model = \"pkg.module:factory\", data = \"eval.npz\")")
        if not profile:
            raise UsageError(f"cannot search for {device_id}: the device has no profile")
        out = self.data_dir / "loop-searches" / f"{device_id}-{int(time.time())}"
        cmd = [sys.executable, "-m", "builder.cli.main", "optimize", request.model, "--profile", profile,
               "--data", request.data, "--max-latency", f"{request.objective_ms:g}ms",
               "--latency-factor", f"{request.latency_factor:.4g}", "--trials", str(request.trials),
               "--data-dir", str(self.data_dir), "--out", str(out)]
        if request.input_shape:
            cmd += ["--input-shape", request.input_shape]
        if request.accuracy_floor is not None:
            cmd += ["--min-accuracy", f"{request.accuracy_floor:g}"]
        if request.fidelity_floor is not None:
            cmd += ["--min-fidelity", f"{request.fidelity_floor:g}"]
        return cmd

    def start(self, device_id: str, profile: Optional[str], ladder: Sequence[Rung], request: SearchRequest) -> str:
        import subprocess

        cmd = self.command(device_id, profile, ladder, request)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "optimize.log", "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        return f"pid {proc.pid}: builder {' '.join(cmd[3:])}"


class ServeLoopHook:
    """The telemetry hook `builder serve` calls, ``(device_id, TelemetryReport) -> None``.

    Starts the loop on the first report (so a serve with no policies pays nothing but a check) and
    hands every report to the loop's worker thread."""

    def __init__(self, data_dir: Path, dry_run: bool = False, search: Optional[SearchLauncher] = None,
                 ladders: Optional[LadderSource] = None, actions: Optional[DeviceActions] = None,
                 store_url: Optional[str] = None) -> None:
        self.data_dir = Path(data_dir)
        self.store_url = store_url  # None: the data dir's SQLite file
        self.dry_run = dry_run
        self.search = search
        self.ladders = ladders
        self.actions = actions
        self.loop: Optional[ReCompressionLoop] = None
        self._lock = threading.Lock()

    def __call__(self, device_id: str, report: Any) -> None:
        with self._lock:
            if self.loop is None:
                from builder.artifacts.registry import Registry
                from builder.fleet.transport.store import open_store

                store = open_store(self.data_dir, self.store_url)
                ladders = self.ladders or RegistryLadders(Registry(self.data_dir))
                actions = None if self.dry_run else (self.actions or PusherActions(self.data_dir, store_url=self.store_url))
                search = self.search or OptimizeLauncher(self.data_dir)
                self.loop = ReCompressionLoop(store, actions, ladders, search=search, dry_run=self.dry_run).start()
        self.loop._queue.put(device_id)

    def close(self) -> None:
        with self._lock:
            if self.loop is not None:
                self.loop.stop()
                if isinstance(self.loop.actions, PusherActions):
                    self.loop.actions.close()
                self.loop.store.close()
                self.loop = None


def serve_hooks(data_dir: Path, dry_run: bool = False, store_url: Optional[str] = None) -> list[Any]:
    """What `builder serve` registers: the loop acts only for devices that have a policy
    (`builder fleet policy set`), on the ladders in the registry."""
    return [ServeLoopHook(data_dir, dry_run=dry_run, store_url=store_url)]
