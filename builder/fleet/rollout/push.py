"""Push an artifact to devices and follow them live; roll back; group pushes with a canary.

The desired deployment is published retained, so a device that is offline installs it when it
reconnects. The device pulls the chunks from `builder serve`, verifies, installs into its inactive
slot, runs the health check and switches; its progress messages drive ``PushObserver``. After an
"active" the host asks the device for an on-device benchmark and compares it with the previous
model's. When a device refuses or fails, the retained desired state is set back to the artifact the
device still runs (so what the broker says matches what runs).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from agent import protocol as proto
from agent.errors import ProtocolError
from builder.errors import BuilderError, FleetError, UsageError
from builder.fleet.rollout.canary import CanaryEvidence, CanaryThresholds, CanaryVerdict, judge_canaries, split_canaries
from builder.fleet.transport.link import SERVE_TOPIC, FleetLink
from builder.fleet.transport.serve import ArtifactDirectories, benchmark_row
from builder.fleet.transport.store import BenchmarkRow, DeploymentEvent, FleetStore

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
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

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


class PushCancelled(FleetError):
    """The user interrupted a push (Ctrl-C): the desired deployment was withdrawn."""

    exit_code = 130


class DeviceWatch:
    """Progress and retained status of every device, routed to whoever waits for them."""

    def __init__(self, link: FleetLink) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue[proto.TransferProgress]] = {}
        self._status: dict[str, proto.DeviceStatus] = {}
        self._status_seen = threading.Condition(self._lock)
        self._serve_state: dict[str, Any] | None = None
        self._serve_seen = threading.Event()
        link.subscribe(proto.all_devices_topic(proto.Up.PROGRESS), self._on_progress)
        link.subscribe(proto.all_devices_topic(proto.Up.STATUS), self._on_status)
        link.subscribe(SERVE_TOPIC, self._on_serve)
        link.watch_replies()

    def _on_progress(self, topic: str, payload: bytes) -> None:
        try:
            progress = proto.TransferProgress.from_json(payload)
        except ProtocolError:
            return
        with self._lock:
            q = self._queues.get(progress.deployment_id)
        if q is not None:
            q.put(progress)

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            device_id, _ = proto.parse_device_topic(topic)
            status = proto.DeviceStatus.from_json(payload)
        except ProtocolError:
            return
        with self._lock:
            self._status[device_id] = status
            self._status_seen.notify_all()

    def _on_serve(self, topic: str, payload: bytes) -> None:
        try:
            self._serve_state = dict(json.loads(payload)) if payload else {"state": "offline"}
        except (ValueError, TypeError):
            self._serve_state = {"state": "unknown"}
        self._serve_seen.set()

    def require_serve(self, wait_s: float = 3.0) -> None:
        """Refuse early when nobody serves chunks (the device would wait forever)."""
        self._serve_seen.wait(wait_s)
        if not self._serve_state or self._serve_state.get("state") != "online":
            raise FleetError("no `builder serve` is running on this broker, so nobody would send the model's chunks; "
                             "start `builder serve` (same --data-dir / --broker) and push again")

    def status(self, device_id: str, wait_s: float = 2.0) -> proto.DeviceStatus | None:
        """The device's retained status (None if it never connected)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while device_id not in self._status and time.monotonic() < deadline:
                self._status_seen.wait(max(0.0, deadline - time.monotonic()))
            return self._status.get(device_id)

    def follow(self, deployment_id: str) -> "queue.Queue[proto.TransferProgress]":
        q: queue.Queue[proto.TransferProgress] = queue.Queue()
        with self._lock:
            self._queues[deployment_id] = q
        return q

    def unfollow(self, deployment_id: str) -> None:
        with self._lock:
            self._queues.pop(deployment_id, None)


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
        self._cancel = threading.Event()  # Ctrl-C during a group push: every device's wait stops

    # -- one device -------------------------------------------------------------------------
    def push(self, device_id: str, artifact_id: str) -> DeviceOutcome:
        start = time.monotonic()
        record = self.registry.get(artifact_id)
        artifact_id = record.artifact_id
        device = self.store.device(device_id)
        if not device.registered:
            raise UsageError(f"{device_id} is not registered (it connected without `builder fleet add-device`); "
                             f"register it with `builder fleet add-device {device_id} --profile P` or remove it")
        compat_notes = check_runs_on(record, device, self.options.allow_other_profile)
        self.watch.require_serve()
        status = self.watch.status(device_id)
        online = status is not None and status.state == "online"
        previous = (status.active_artifact_id if status else None) or device.active_artifact_id
        previous_model = (status.active_model if status else None) or device.active_model
        model_label = f"{record.model_name}@{record.model_version}"
        base = dict(device_id=device_id, artifact_id=artifact_id, model=model_label, size_bytes=record.size_bytes,
                    previous_artifact_id=previous, previous_model=previous_model)
        before = self._baseline(device_id, previous, artifact_id, online)
        directory = self.dirs(artifact_id)
        if directory is None:
            raise FleetError(f"artifact {artifact_id[:12]} is not in the registry at {self.registry.root}")
        from builder.fleet.transport.chunk_server import publish_desired

        deployment_id = f"{artifact_id[:12]}-{int(time.time() * 1000)}"
        progress_q = self.watch.follow(deployment_id)
        try:
            publish_desired(self.link.mqtt, device_id, directory, deployment_id)
            self.store.add_event(DeploymentEvent(device_id, time.time(), "desired", deployment_id, artifact_id,
                                                 {"model": model_label, "previous": previous}))
            self.observer.stage(device_id, f"desired deployment {deployment_id} published")
            if not online and self.options.offline_wait_s <= 0:
                self.observer.stage(device_id, "offline: it installs the model when it reconnects")
                return DeviceOutcome(state="pending", deployment_id=deployment_id, before=before,
                                     seconds=time.monotonic() - start,
                                     notes=compat_notes + ("device offline; the retained desired deployment waits for it",), **base)
            try:
                final = self._wait_final(device_id, progress_q, online)
            except (KeyboardInterrupt, PushCancelled) as exc:
                self._restore_desired(device_id, previous)
                self.store.add_event(DeploymentEvent(device_id, time.time(), "cancelled", deployment_id, artifact_id,
                                                     {"restored": previous}))
                raise PushCancelled(f"push cancelled: desired deployment {deployment_id} withdrawn, {device_id} keeps "
                                    + (f"{previous_model or previous[:12]}" if previous else "what it runs")) from exc
        finally:
            self.watch.unfollow(deployment_id)
        if final is None:
            self.observer.stage(device_id, "no answer from the device")
            if not online:
                return DeviceOutcome(state="pending", deployment_id=deployment_id, before=before,
                                     seconds=time.monotonic() - start,
                                     notes=("device still offline; it installs the model when it reconnects",), **base)
            return DeviceOutcome(state="timeout", deployment_id=deployment_id, before=before,
                                 error="the device reported no progress in time", seconds=time.monotonic() - start, **base)
        if final.state != "active":
            self._restore_desired(device_id, previous)
            return DeviceOutcome(state=final.state, deployment_id=deployment_id, error=final.error, before=before,
                                 seconds=time.monotonic() - start, **base)
        after, notes = None, list(compat_notes)
        if self.options.benchmark_runs > 0:
            self.observer.stage(device_id, f"on-device benchmark ({self.options.benchmark_runs} runs)")
            try:
                after = self.benchmark(device_id, artifact_id)
            except FleetError as exc:
                notes.append(f"benchmark after install failed: {exc}")
        return DeviceOutcome(state="active", deployment_id=deployment_id, before=before, after=after,
                             seconds=time.monotonic() - start, notes=tuple(notes), **base)

    def _baseline(self, device_id: str, previous: str | None, new_artifact: str, online: bool) -> BenchmarkRow | None:
        """The previous model's on-device benchmark: stored, else measured now (device online)."""
        if previous is None or previous == new_artifact:
            return None
        stored = self.store.latest_benchmark(device_id, previous)
        if stored is not None or not online or self.options.benchmark_runs <= 0:
            return stored
        self.observer.stage(device_id, "benchmarking the previous model for comparison")
        try:
            return self.benchmark(device_id, previous)
        except FleetError as exc:
            log.warning("baseline benchmark on %s failed: %s", device_id, exc)
            return None

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

    def _wait_final(self, device_id: str, progress_q: "queue.Queue[proto.TransferProgress]",
                    online: bool) -> proto.TransferProgress | None:
        deadline = time.monotonic() + self.options.timeout_s
        stall = self.options.stall_timeout_s if online else max(self.options.offline_wait_s, 0.1)
        last_message = time.monotonic()
        while time.monotonic() < deadline:
            if self._cancel.is_set():
                raise PushCancelled("push cancelled")
            try:
                progress = progress_q.get(timeout=0.25)
            except queue.Empty:
                if time.monotonic() - last_message > stall:
                    return None
                continue
            last_message = time.monotonic()
            stall = self.options.stall_timeout_s
            self.observer.progress(device_id, progress)
            if progress.state in FINAL_STATES:
                return progress
        return None

    def _restore_desired(self, device_id: str, running_artifact: str | None) -> None:
        """Make the retained desired state name what the device still runs (or clear it)."""
        from builder.fleet.transport.chunk_server import clear_desired, publish_desired

        directory = self.dirs(running_artifact) if running_artifact else None
        try:
            if directory is not None:
                deployment_id = f"restore-{running_artifact[:12]}-{int(time.time() * 1000)}"  # type: ignore[index]
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
        if not reply.ok:
            return DeviceOutcome(device_id, current or "", "failed", error=reply.error,
                                 previous_artifact_id=current, previous_model=status.active_model,
                                 seconds=time.monotonic() - start)
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
                             previous_artifact_id=current, previous_model=status.active_model or device.active_model,
                             seconds=time.monotonic() - start)

    # -- group with canary ------------------------------------------------------------------
    def push_group(self, group: str, artifact_for: Callable[[str], str], canary_percent: float,
                   thresholds: CanaryThresholds | None = None) -> GroupPushResult:
        """Canaries (online devices only) first; the rest only if the canaries hold against the
        previous model; otherwise the canaries are rolled back."""
        devices = self.store.devices(group=group)
        if not devices:
            raise UsageError(f"group '{group}' has no devices; add some with `builder fleet add-device ID --profile P --group {group}`")
        self.watch.require_serve()
        online = [d.device_id for d in devices if (s := self.watch.status(d.device_id, wait_s=1.0)) and s.state == "online"]
        offline = [d.device_id for d in devices if d.device_id not in online]
        canaries, rest = split_canaries(online, canary_percent)
        rest = rest + sorted(offline)
        artifacts = {d.device_id: artifact_for(d.profile or "") for d in devices}
        for d in devices:  # refuse before anything is pushed, not after the canaries installed it
            check_runs_on(self.registry.get(artifacts[d.device_id]), d, self.options.allow_other_profile)
        verdict: CanaryVerdict | None = None
        canary_outcomes: list[DeviceOutcome] = []
        if canaries:
            for device_id in canaries:
                self.observer.stage(device_id, "canary")
            canary_outcomes = self._parallel(canaries, artifacts)
            if self.options.soak_s > 0 and all(o.state == "active" for o in canary_outcomes):
                self.observer.stage(",".join(canaries), f"soaking {self.options.soak_s:.0f} s on real traffic")
                time.sleep(self.options.soak_s)
            verdict = judge_canaries([self._evidence(o) for o in canary_outcomes], thresholds)
            if not verdict.proceed:
                rolled = []
                for outcome in canary_outcomes:
                    if outcome.state == "active" and outcome.previous_artifact_id:
                        try:
                            rolled.append(self.rollback(outcome.device_id, reason="canary did not hold: " + "; ".join(verdict.reasons)))
                        except FleetError as exc:
                            rolled.append(DeviceOutcome(outcome.device_id, outcome.artifact_id, "failed", error=str(exc)))
                return GroupPushResult(group, tuple(canary_outcomes), (), verdict, tuple(rolled))
        rest_outcomes = self._parallel(rest, artifacts) if rest else []
        return GroupPushResult(group, tuple(canary_outcomes), tuple(rest_outcomes), verdict)

    def _parallel(self, device_ids: Sequence[str], artifacts: dict[str, str]) -> list[DeviceOutcome]:
        def one(device_id: str) -> DeviceOutcome:
            try:
                return self.push(device_id, artifacts[device_id])
            except BuilderError as exc:
                return DeviceOutcome(device_id, artifacts[device_id], "error", error=str(exc))

        pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(device_ids))))
        futures = [pool.submit(one, device_id) for device_id in device_ids]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            self._cancel.set()  # each device's push withdraws its desired deployment
            for future in futures:
                try:
                    future.result(timeout=30)
                except (PushCancelled, TimeoutError):
                    pass
            raise PushCancelled("push cancelled: desired deployments withdrawn; each device keeps its previous model") from None
        finally:
            pool.shutdown(wait=True)

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
