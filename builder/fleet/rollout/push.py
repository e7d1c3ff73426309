"""Push an artifact to devices and follow them live; roll back; fleet pushes with a canary.

The desired deployment is published retained, so a device that is offline installs it when it
reconnects. The device pulls the chunks from `builder serve`, verifies, installs into its inactive
slot, runs the health check and switches; its progress messages drive ``PushObserver``. After an
"active" the host asks the device for an on-device benchmark and compares it with the previous
model's. When a device refuses or fails, the retained desired state is set back to the artifact the
device still runs (so what the broker says matches what runs).

One device or a thousand go the same way: a ``Wave`` (``wave.py``) follows every device of a
stage on one thread, from their events, with a bounded number of transfers in flight; a fleet
push is canaries (one wave), their verdict, then the rest (another wave). ``push_fleet`` is the
same as a plain function, for benchmarks and simulators.
"""
from __future__ import annotations

import logging
import uuid
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from agent import protocol as proto
from builder.errors import BuilderError, FleetError, UsageError
from builder.fleet.rollout.canary import CanaryEvidence, CanaryThresholds, CanaryVerdict, judge_canaries, split_canaries
from builder.fleet.rollout.track import TrackLimits
from builder.fleet.rollout.watch import DeviceWatch
from builder.fleet.rollout.wave import Wave, WaveDevice, WavePlan, WaveSettings, new_deployment_id
from builder.fleet.transport.link import FleetLink
from builder.fleet.transport.serve import ArtifactDirectories, benchmark_row
from builder.fleet.transport.store import BenchmarkRow, DeploymentEvent, DeviceRecord, FleetStore

log = logging.getLogger(__name__)

FINAL_STATES = ("active", "failed", "rejected", "rolled_back")
FAILED_STATES = ("failed", "rejected", "rolled_back", "timeout", "error")


@dataclass(frozen=True)
class PushOptions:
    timeout_s: float = 900.0  # whole deployment, per device
    stall_timeout_s: float = 120.0  # no progress message for this long: give up
    allow_other_profile: bool = False  # --force, or artifacts built here for each device's profile
    benchmark_runs: int = 30
    benchmark_warmup: int = 3
    benchmark_timeout_s: float = 180.0
    offline_wait_s: float = 0.0  # how long to wait for an offline device before reporting "pending"
    soak_s: float = 0.0  # canaries: serve real traffic this long before judging field telemetry
    max_in_flight: int = 0  # devices transferring at once; 0: as many as IN_FLIGHT_BYTES allows

    def limits(self) -> TrackLimits:
        return TrackLimits(answer_timeout_s=self.stall_timeout_s, offline_wait_s=self.offline_wait_s,
                           timeout_s=self.timeout_s, stall_timeout_s=self.stall_timeout_s,
                           benchmark_timeout_s=self.benchmark_timeout_s)


# What the chunk server may have queued for devices at once: each transferring device has up to one
# window of chunks (64 × 127 KiB) in flight. Small models: up to MAX_IN_FLIGHT devices at once.
IN_FLIGHT_BYTES = 256 << 20
MAX_IN_FLIGHT = 256
MIN_IN_FLIGHT = 8


def transfer_slots(largest_bytes: int, max_in_flight: int = 0) -> int:
    """How many devices transfer at once: ``max_in_flight`` when set, else what keeps the chunk
    server's queued windows under ``IN_FLIGHT_BYTES``."""
    if max_in_flight > 0:
        return max_in_flight
    window = min(max(int(largest_bytes), 1), proto.DEFAULT_WINDOW_CHUNKS * proto.MAX_CHUNK_BYTES)
    return max(MIN_IN_FLIGHT, min(MAX_IN_FLIGHT, IN_FLIGHT_BYTES // window))


@dataclass(frozen=True)
class DeviceOutcome:
    device_id: str
    artifact_id: str
    state: str  # "active" | "pending" (offline: installs on reconnect) | "failed" | "rejected" | "rolled_back" | "timeout"
    deployment_id: str | None = None
    error: str | None = None
    model: str | None = None
    size_bytes: int = 0
    previous_artifact_id: str | None = None
    previous_model: str | None = None
    before: BenchmarkRow | None = None
    after: BenchmarkRow | None = None
    seconds: float = 0.0  # its desired deployment -> its final state
    notes: tuple[str, ...] = ()
    wait_s: float = 0.0  # queued (baseline benchmark, a free transfer slot) before its desired went out

    @property
    def ok(self) -> bool:
        return self.state in ("active", "pending")


@dataclass(frozen=True)
class GroupPushResult:
    group: str
    canaries: tuple[DeviceOutcome, ...]
    rest: tuple[DeviceOutcome, ...]
    verdict: CanaryVerdict | None
    rolled_back: tuple[DeviceOutcome, ...] = ()
    seconds: float = 0.0  # the whole push, from its start to the last device's final state

    @property
    def outcomes(self) -> tuple[DeviceOutcome, ...]:
        return self.canaries + self.rest

    @property
    def ok(self) -> bool:
        return (self.verdict is None or self.verdict.proceed) and all(o.ok for o in self.canaries + self.rest)


class PushObserver(Protocol):
    def stage(self, device_id: str, text: str) -> None: ...

    def progress(self, device_id: str, progress: proto.TransferProgress) -> None: ...


class SilentObserver:
    def stage(self, device_id: str, text: str) -> None:
        log.info("%s: %s", device_id, text)

    def progress(self, device_id: str, progress: proto.TransferProgress) -> None:
        log.debug("%s: %s %.0f%%", device_id, progress.state, progress.percent)


def is_portable_build(record: Any) -> bool:
    """A plain ONNX file for ONNX Runtime's CPU provider at fp32 or int8 runs the same on every
    profile. Artifact ids name content, so such a file built for two profiles is ONE artifact whose
    registry row names the first profile: for it a profile difference is only a note."""
    return record.runtime == "onnxruntime" and record.format == "onnx" and record.precision in ("fp32", "int8")


def check_runs_on(record: Any, device: Any, allow_other_profile: bool = False) -> tuple[str, ...]:
    """Refuse an artifact whose runtime the device does not have, or one built for another profile
    that is not a portable CPU ONNX build (a Jetson's TensorRT fp16 build or an Android LiteRT build
    on a Pi) unless ``allow_other_profile`` (--force)."""
    needed = "litert" if record.runtime == "litert" else "onnxruntime"
    if device.runtimes and needed not in device.runtimes:
        raise UsageError(f"artifact {record.artifact_id[:12]} needs {record.runtime} but {device.device_id} has "
                         f"{', '.join(device.runtimes)}; build it for {device.profile or 'its profile'}")
    if device.profile and record.profile != device.profile:
        if not allow_other_profile and not is_portable_build(record):
            raise UsageError(f"artifact {record.artifact_id[:12]} was built for {record.profile} ({record.runtime}, "
                             f"{record.precision}, {record.format}), but {device.device_id} is a {device.profile}; "
                             f"push --model to build it for {device.profile}, or pass --force")
        return (f"artifact registered for profile {record.profile}, device is {device.profile}",)
    return ()


class PushLog:
    """A fleet push as the store's ``pushes`` row: its devices, canaries and stage, for the dashboard
    (writes are best-effort: a store hiccup must not fail a push that is reaching devices)."""

    def __init__(self, store: FleetStore, target: str, plan: dict[str, Any]) -> None:
        self.store, self.plan = store, dict(plan, stage="planned")
        self.push_id = f"push-{uuid.uuid4().hex[:12]}"
        self._write(lambda: self.store.start_push(self.push_id, target, self.plan))

    def stage(self, name: str) -> None:
        self.plan["stage"] = name
        self._write(lambda: self.store.update_push(self.push_id, self.plan))

    def finish(self, state: str, reason: str | None = None) -> None:
        self._write(lambda: self.store.finish_push(self.push_id, state, reason))

    @staticmethod
    def _write(action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:  # sqlite busy, disk full: the push itself goes on
            log.warning("push record not written: %s", exc)


class PushCancelled(FleetError):
    """The user interrupted a push (Ctrl-C): the desired deployment was withdrawn."""

    exit_code = 130


@dataclass(frozen=True)
class _Target:
    """One device's push, checked and planned before anything is published."""

    plan: WavePlan
    artifact_id: str
    model: str
    size_bytes: int
    previous_artifact_id: str | None
    previous_model: str | None
    notes: tuple[str, ...] = ()


class Pusher:
    """Everything a push needs: the broker link, the store, the registry, the serve-cache dirs."""

    def __init__(self, link: FleetLink, store: FleetStore, registry: Any, data_dir: Path,
                 options: PushOptions | None = None, observer: PushObserver | None = None) -> None:
        self.link = link
        self.store = store
        self.registry = registry
        self.options = options or PushOptions()
        self.observer: PushObserver = observer or SilentObserver()
        self.dirs = ArtifactDirectories(registry, Path(data_dir) / "serve-cache")
        self.watch = DeviceWatch(link)
        self._desired: dict[str, proto.DesiredDeployment] = {}  # per artifact: the message devices get

    # -- one device -------------------------------------------------------------------------
    def push(self, device_id: str, artifact_id: str) -> DeviceOutcome:
        """Push to one device and follow it to its final state. Raises (UsageError, FleetError)
        when the push cannot start or the host could not publish; PushCancelled on Ctrl-C."""
        record = self.registry.get(artifact_id)
        device = self.store.device(device_id)
        self._require_registered([device])
        self.watch.require_serve()
        self.watch.settle()
        target = self._target(device, record.artifact_id)
        try:
            [outcome] = self._wave([target])
        except KeyboardInterrupt as exc:
            previous = target.previous_model or (target.previous_artifact_id or "")[:12]
            raise PushCancelled(f"push cancelled: desired deployment to {device_id} withdrawn, {device_id} keeps "
                                + (previous or "what it runs")) from exc
        if outcome.state == "error":
            raise FleetError(f"{device_id}: {outcome.error}")
        return outcome

    # -- many devices, canary first -----------------------------------------------------------
    def push_devices(self, device_ids: Sequence[str], artifact_for: Callable[[DeviceRecord], str],
                     canary_percent: float = 0.0, thresholds: CanaryThresholds | None = None,
                     label: str = "devices") -> GroupPushResult:
        """Canaries (online devices only) first; the rest only if the canaries hold against the
        previous model; otherwise the canaries are rolled back. Every device is checked before
        anything is published."""
        start = time.monotonic()
        devices = [self.store.device(d) for d in dict.fromkeys(device_ids)]
        if not devices:
            raise UsageError("no devices to push to; add some with `builder fleet add-device ID --profile P`")
        self._require_registered(devices)
        self.watch.require_serve()
        self.watch.settle()
        targets = {d.device_id: self._target(d, artifact_for(d)) for d in devices}
        online = [d for d, t in targets.items() if t.plan.online]
        canaries, rest = split_canaries(online, canary_percent)
        rest = rest + sorted(d for d in targets if d not in online)
        verdict: CanaryVerdict | None = None
        canary_outcomes: list[DeviceOutcome] = []
        record = PushLog(self.store, label, {"devices": sorted(targets), "canaries": list(canaries),
                                             "canary_percent": canary_percent,
                                             "artifacts": sorted({t.artifact_id for t in targets.values()})})
        try:
            if canaries:
                for device_id in canaries:
                    self.observer.stage(device_id, "canary")
                record.stage("canary")
                canary_outcomes = self._wave([targets[d] for d in canaries])
                if self.options.soak_s > 0 and all(o.state == "active" for o in canary_outcomes):
                    self.observer.stage(",".join(canaries), f"soaking {self.options.soak_s:.0f} s on real traffic")
                    time.sleep(self.options.soak_s)
                verdict = judge_canaries([self._evidence(o) for o in canary_outcomes], thresholds)
                if not verdict.proceed:
                    active = [o for o in canary_outcomes if o.state == "active" and o.previous_artifact_id]
                    reason = "canary did not hold: " + "; ".join(verdict.reasons)
                    rolled = self._rollback_many(active, reason)
                    record.finish("rolled_back", reason)
                    return GroupPushResult(label, tuple(canary_outcomes), (), verdict, tuple(rolled),
                                           seconds=time.monotonic() - start)
            record.stage("fleet" if canaries else "all")
            rest_outcomes = self._wave([targets[d] for d in rest]) if rest else []
        except KeyboardInterrupt:
            record.finish("cancelled", "Ctrl-C: desired deployments withdrawn")
            raise PushCancelled("push cancelled: desired deployments withdrawn; each device that was still "
                                "transferring keeps its previous model") from None
        except BaseException as exc:
            record.finish("failed", f"{type(exc).__name__}: {exc}")
            raise
        result = GroupPushResult(label, tuple(canary_outcomes), tuple(rest_outcomes), verdict,
                                 seconds=time.monotonic() - start)
        failed = [o.device_id for o in (*canary_outcomes, *rest_outcomes) if not o.ok]
        record.finish("done" if not failed else "partial", f"{len(failed)} device(s) not active: "
                      + ", ".join(failed[:5]) if failed else None)
        return result

    def push_group(self, group: str, artifact_for: Callable[[str], str], canary_percent: float,
                   thresholds: CanaryThresholds | None = None) -> GroupPushResult:
        """Every device of a group; ``artifact_for(profile)`` names each one's artifact."""
        devices = self.store.devices(group=group)
        if not devices:
            raise UsageError(f"group '{group}' has no devices; add some with `builder fleet add-device ID --profile P --group {group}`")
        return self.push_devices([d.device_id for d in devices], lambda d: artifact_for(d.profile or ""),
                                 canary_percent, thresholds, label=group)

    def push_all(self, artifact_for: Callable[[str], str], canary_percent: float,
                 thresholds: CanaryThresholds | None = None) -> GroupPushResult:
        """Every registered device of the fleet (unregistered clients are never pushed to)."""
        devices = [d for d in self.store.devices() if d.registered]
        if not devices:
            raise UsageError("the fleet has no registered devices; add some with `builder fleet add-device ID --profile P`")
        return self.push_devices([d.device_id for d in devices], lambda d: artifact_for(d.profile or ""),
                                 canary_percent, thresholds, label="all")

    # -- planning ---------------------------------------------------------------------------
    @staticmethod
    def _require_registered(devices: Sequence[DeviceRecord]) -> None:
        for device in devices:
            if not device.registered:
                raise UsageError(f"{device.device_id} is not registered (it connected without `builder fleet add-device`); "
                                 f"register it with `builder fleet add-device {device.device_id} --profile P` or remove it")

    def _target(self, device: DeviceRecord, artifact_id: str) -> _Target:
        record = self.registry.get(artifact_id)
        artifact_id = record.artifact_id
        notes = check_runs_on(record, device, self.options.allow_other_profile)
        status = self.watch.status_now(device.device_id)
        online = status is not None and status.state == "online"
        previous = (status.active_artifact_id if status else None) or device.active_artifact_id
        previous_model = (status.active_model if status else None) or device.active_model
        model_label = f"{record.model_name}@{record.model_version}"
        before, baseline = None, False
        if previous is not None and previous != artifact_id:
            before = self.store.latest_benchmark(device.device_id, previous)
            baseline = before is None and online and self.options.benchmark_runs > 0
        plan = WavePlan(device.device_id, self._desired_message(artifact_id), online, previous, baseline, before,
                        {"model": model_label, "previous": previous})
        return _Target(plan, artifact_id, model_label, record.size_bytes, previous, previous_model, notes)

    def _desired_message(self, artifact_id: str) -> proto.DesiredDeployment:
        if artifact_id not in self._desired:
            from builder.fleet.transport.chunk_server import desired_message

            directory = self.dirs(artifact_id)
            if directory is None:
                raise FleetError(f"artifact {artifact_id[:12]} is not in the registry at {self.registry.root}")
            self._desired[artifact_id] = desired_message(directory)
        return self._desired[artifact_id]

    def _wave(self, targets: Sequence[_Target]) -> list[DeviceOutcome]:
        benchmark = (proto.BenchmarkArgs(runs=self.options.benchmark_runs, warmup=self.options.benchmark_warmup)
                     if self.options.benchmark_runs > 0 else None)
        slots = transfer_slots(max(t.size_bytes for t in targets), self.options.max_in_flight)
        settings = WaveSettings(limits=self.options.limits(), max_in_flight=slots, benchmark=benchmark)
        ended = Wave(self.link, self.watch, self.store, self.observer, [t.plan for t in targets], settings,
                     self._restore_desired).run()
        return [_outcome(t, ended[t.plan.device_id]) for t in targets]

    def benchmark(self, device_id: str, expected_artifact: str | None = None) -> BenchmarkRow:
        reply = self.link.command(device_id, proto.BenchmarkArgs(runs=self.options.benchmark_runs,
                                                                 warmup=self.options.benchmark_warmup),
                                  timeout_s=self.options.benchmark_timeout_s)
        if not reply.ok:
            raise FleetError(f"{device_id} could not benchmark: {reply.error}")
        row = benchmark_row(device_id, dict(reply.result), reply.ts or time.time())
        if expected_artifact and row.artifact_id and row.artifact_id != expected_artifact:
            raise FleetError(f"{device_id} benchmarked {row.artifact_id[:12]}, not {expected_artifact[:12]} (it changed model meanwhile)")
        return row

    def _restore_desired(self, device_id: str, running_artifact: str | None) -> None:
        """Make the retained desired state name what the device still runs (or clear it)."""
        from builder.fleet.transport.chunk_server import clear_desired, publish_desired

        directory = self.dirs(running_artifact) if running_artifact else None
        try:
            if directory is not None:
                deployment_id = f"restore-{new_deployment_id()}"
                publish_desired(self.link.mqtt, device_id, directory, deployment_id)
                self.store.add_event(DeploymentEvent(device_id, time.time(), "desired", deployment_id, running_artifact,
                                                     {"restore": True}))
            else:
                clear_desired(self.link.mqtt, device_id)
                self.store.add_event(DeploymentEvent(device_id, time.time(), "desired_cleared"))
        except (FleetError, RuntimeError, ValueError) as exc:
            log.warning("could not restore the desired deployment of %s: %s", device_id, exc)

    # -- rollback ---------------------------------------------------------------------------
    def rollback(self, device_id: str, reason: str = "builder fleet rollback") -> DeviceOutcome:
        """Ask the device to switch back to its previous slot, then make the retained desired match."""
        start = time.monotonic()
        device = self.store.device(device_id)
        status = self.watch.status(device_id)
        if status is None or status.state != "online":
            raise FleetError(f"{device_id} is offline; a rollback needs the device online (it keeps its previous "
                             "model in its other slot)")
        current = status.active_artifact_id
        self.store.add_event(DeploymentEvent(device_id, time.time(), "rollback_requested", None, current, {"reason": reason}))
        reply = self.link.command(device_id, proto.RollbackArgs(reason=reason), timeout_s=60)
        return self._rolled_back(device_id, reply, current, status.active_model or device.active_model,
                                 time.monotonic() - start)

    def _rolled_back(self, device_id: str, reply: proto.CommandReply, current: str | None, current_model: str | None,
                     seconds: float) -> DeviceOutcome:
        if not reply.ok:
            return DeviceOutcome(device_id, current or "", "failed", error=reply.error, previous_artifact_id=current,
                                 previous_model=current_model, seconds=seconds)
        now_active = reply.result.get("active_artifact_id")
        self._restore_desired(device_id, now_active)
        model = None
        if now_active:
            try:
                rec = self.registry.get(now_active)
                model = f"{rec.model_name}@{rec.model_version}"
            except BuilderError:
                model = None
        return DeviceOutcome(device_id, now_active or "", "rolled_back", error=None, model=model,
                             previous_artifact_id=current, previous_model=current_model, seconds=seconds)

    def _rollback_many(self, outcomes: Sequence[DeviceOutcome], reason: str, timeout_s: float = 60.0) -> list[DeviceOutcome]:
        """Roll back many devices at once (commands sent together, replies awaited together)."""
        start = time.monotonic()
        replies: queue.Queue[tuple[str, proto.CommandReply]] = queue.Queue()
        pending: dict[str, str] = {}
        def on_reply(device_id: str) -> Callable[[proto.CommandReply], None]:
            return lambda reply: replies.put((device_id, reply))

        for outcome in outcomes:
            self.store.add_event(DeploymentEvent(outcome.device_id, time.time(), "rollback_requested", None,
                                                 outcome.artifact_id, {"reason": reason}))
            pending[outcome.device_id] = self.link.send_command(outcome.device_id, proto.RollbackArgs(reason=reason),
                                                                on_reply(outcome.device_id))
        got: dict[str, proto.CommandReply] = {}
        deadline = start + timeout_s
        while len(got) < len(pending) and time.monotonic() < deadline:
            try:
                device_id, reply = replies.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            got[device_id] = reply
        rolled = []
        for outcome in outcomes:
            answer = got.get(outcome.device_id)
            if answer is None:
                self.link.forget_command(pending[outcome.device_id])
                rolled.append(DeviceOutcome(outcome.device_id, outcome.artifact_id, "failed",
                                            error=f"no answer to the rollback within {timeout_s:.0f} s"))
                continue
            rolled.append(self._rolled_back(outcome.device_id, answer, outcome.artifact_id, outcome.model,
                                            time.monotonic() - start))
        return rolled

    def _evidence(self, outcome: DeviceOutcome) -> CanaryEvidence:
        previous_field = (self.store.latest_field_telemetry_for(outcome.device_id, outcome.previous_artifact_id)
                          if outcome.previous_artifact_id else None)
        new_field = self.store.latest_field_telemetry_for(outcome.device_id, outcome.artifact_id)
        since = time.time() - max(self.options.soak_s, 0.0) - 1.0
        windows = [r for r in self.store.telemetry(outcome.device_id, since=since)
                   if r.model_id == outcome.artifact_id and r.event == "periodic"]
        return CanaryEvidence(
            device_id=outcome.device_id, outcome=outcome.state, error=outcome.error,
            previous_p95_ms=outcome.before.p95_ms if outcome.before else None,
            candidate_p95_ms=outcome.after.p95_ms if outcome.after else None,
            previous_field_p95_ms=previous_field.p95_ms if previous_field else None,
            candidate_field_p95_ms=new_field.p95_ms if new_field else None,
            field_requests=sum(r.requests for r in windows), field_errors=sum(r.errors for r in windows),
            previous_power_w=_measured_power(outcome.before), candidate_power_w=_measured_power(outcome.after))


def _outcome(target: _Target, ended: WaveDevice) -> DeviceOutcome:
    track = ended.track
    return DeviceOutcome(device_id=target.plan.device_id, artifact_id=target.artifact_id, state=track.phase.value,
                         deployment_id=track.deployment_id, error=track.error, model=target.model,
                         size_bytes=target.size_bytes, previous_artifact_id=target.previous_artifact_id,
                         previous_model=target.previous_model, before=ended.before, after=ended.after,
                         seconds=track.seconds, notes=target.notes + track.notes, wait_s=track.wait_s)


def push_fleet(link: FleetLink, store: FleetStore, registry: Any, data_dir: Path, device_ids: Sequence[str],
               artifact_id: str, *, canary_percent: float = 0.0, options: PushOptions | None = None,
               observer: PushObserver | None = None, thresholds: CanaryThresholds | None = None) -> GroupPushResult:
    """Push one artifact to many devices (canaries first when ``canary_percent``), returning as
    soon as every device is final: what `builder push --all/--group` does, callable from a
    benchmark or simulator on an open link and store. ``result.seconds`` is the push's wall time."""
    pusher = Pusher(link, store, registry, data_dir, options or PushOptions(benchmark_runs=0), observer)
    return pusher.push_devices(device_ids, lambda _device: artifact_id, canary_percent, thresholds, label="fleet")


def _measured_power(row: BenchmarkRow | None) -> float | None:
    """Only measured power is compared (an estimate from the profile says nothing about the model)."""
    if row is None or row.power_source.startswith("estimate"):
        return None
    return row.power_w


def outcome_summary(outcome: DeviceOutcome) -> dict[str, Any]:
    """Plain data for --json and the final table."""
    def bench(row: BenchmarkRow | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {"artifact_id": row.artifact_id, "p50_ms": row.p50_ms, "p95_ms": row.p95_ms, "power_w": row.power_w,
                "power_source": row.power_source, "energy_mj": row.energy_mj}

    return {"device_id": outcome.device_id, "state": outcome.state, "error": outcome.error,
            "artifact_id": outcome.artifact_id, "model": outcome.model, "size_bytes": outcome.size_bytes,
            "previous_artifact_id": outcome.previous_artifact_id, "previous_model": outcome.previous_model,
            "before": bench(outcome.before), "after": bench(outcome.after), "seconds": round(outcome.seconds, 2),
            "deployment_id": outcome.deployment_id, "notes": list(outcome.notes)}
