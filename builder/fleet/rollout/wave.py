"""One wave of a push: many devices at once, driven by their events on one thread.

Every device's progress (one subscription for the fleet, routed by (device, deployment)) and
command replies land in one queue; a ``DeviceTrack`` per device says what each event means; this
shell does what a change of phase asks for (publish the desired deployment, send a benchmark,
restore the desired state after a failure). At most ``max_in_flight`` devices transfer at once,
so the chunk server is never asked for more windows than it can keep flowing; the others wait
queued and their clocks have not started. ``run`` returns as soon as every device is final.
"""
from __future__ import annotations

import logging
import queue
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Protocol, Sequence

from agent import protocol as proto
from agent.errors import MqttError
from builder.errors import BuilderError
from builder.fleet.rollout.track import DeviceTrack, Phase, TrackLimits
from builder.fleet.rollout.watch import DeviceWatch
from builder.fleet.transport.link import FleetLink
from builder.fleet.transport.serve import benchmark_row
from builder.fleet.transport.store import BenchmarkRow, DeploymentEvent, FleetStore

log = logging.getLogger(__name__)


def new_deployment_id() -> str:
    """Unique per push and device (uuid4): never derived from the clock, which two publishers
    share within a millisecond."""
    return uuid.uuid4().hex


class WaveObserver(Protocol):
    def stage(self, device_id: str, text: str) -> None: ...

    def progress(self, device_id: str, progress: proto.TransferProgress) -> None: ...


@dataclass(frozen=True)
class WavePlan:
    """One device of a wave. ``desired`` is the artifact's desired-deployment message; each device
    gets it with its own deployment id."""

    device_id: str
    desired: proto.DesiredDeployment
    online: bool
    previous_artifact_id: str | None = None
    baseline: bool = False  # benchmark the previous model before pushing
    before: BenchmarkRow | None = None  # the previous model's stored benchmark
    event_detail: Mapping[str, Any] = field(default_factory=dict)  # of the "desired" store event


@dataclass(frozen=True)
class WaveSettings:
    limits: TrackLimits = field(default_factory=TrackLimits)
    max_in_flight: int = 64
    benchmark: proto.BenchmarkArgs | None = None  # None: no on-device benchmarks
    publish_timeout_s: float = 10.0
    tick_s: float = 0.25


@dataclass(frozen=True)
class WaveDevice:
    """A device's end of the wave."""

    plan: WavePlan
    track: DeviceTrack
    before: BenchmarkRow | None = None
    after: BenchmarkRow | None = None


Restore = Callable[[str, "str | None"], None]  # (device_id, artifact it still runs)


class Wave:
    def __init__(self, link: FleetLink, watch: DeviceWatch, store: FleetStore, observer: WaveObserver,
                 plans: Sequence[WavePlan], settings: WaveSettings, restore: Restore) -> None:
        self.link = link
        self.watch = watch
        self.store = store
        self.observer = observer
        self.plans = {p.device_id: p for p in plans}
        self.order = list(self.plans)
        self.settings = settings
        self.restore = restore
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._tracks: dict[str, DeviceTrack] = {}
        self._before: dict[str, BenchmarkRow | None] = {p.device_id: p.before for p in plans}
        self._after: dict[str, BenchmarkRow | None] = {}
        self._commands: dict[str, str] = {}  # request id -> device id, while a reply is awaited
        self._queued: list[str] = []  # waiting for a slot, in plan order

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict[str, WaveDevice]:
        """Push to every planned device; KeyboardInterrupt withdraws what is in flight, then re-raises."""
        start = time.monotonic()
        for device_id, plan in self.plans.items():
            benchmark_after = self.settings.benchmark is not None
            self._tracks[device_id] = DeviceTrack(device_id, online=plan.online, created_at=start,
                                                  benchmark_after=benchmark_after)
        try:
            for device_id, plan in self.plans.items():
                if plan.baseline and plan.online and self.settings.benchmark is not None:
                    self.observer.stage(device_id, "benchmarking the previous model for comparison")
                    self._send_benchmark(device_id, "baseline")
                    self._set(device_id, self._tracks[device_id].baseline_requested(time.monotonic()))
                else:
                    self._queued.append(device_id)
            self._send([d for d in self._queued if not self.plans[d].online])  # offline: no slot needed
            while not self._all_final():
                self._fill_slots()
                if self._all_final():
                    break
                self._handle_events(self.settings.tick_s)
                now = time.monotonic()
                for device_id, track in list(self._tracks.items()):
                    if not track.phase.final:
                        self._set(device_id, track.on_tick(now, self.settings.limits))
        except KeyboardInterrupt:
            self._withdraw()
            raise
        finally:
            for request_id in list(self._commands):
                self.link.forget_command(request_id)
            for device_id, track in self._tracks.items():
                if track.deployment_id:
                    self.watch.unfollow(device_id, track.deployment_id)
        return {d: WaveDevice(self.plans[d], self._tracks[d], self._before.get(d), self._after.get(d)) for d in self.order}

    def _all_final(self) -> bool:
        return all(t.phase.final for t in self._tracks.values())

    def _fill_slots(self) -> None:
        in_flight = sum(1 for t in self._tracks.values() if t.phase.in_flight and t.online)
        free = max(0, self.settings.max_in_flight - in_flight)
        if free and self._queued:
            self._send(self._queued[:free])

    def _handle_events(self, timeout_s: float) -> None:
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event: tuple[Any, ...]) -> None:
        now = time.monotonic()
        if event[0] == "progress":
            _, device_id, progress = event
            self.observer.progress(device_id, progress)
            self._set(device_id, self._tracks[device_id].on_progress(progress, now))
        elif event[0] == "reply":
            _, device_id, kind, reply = event
            self._on_benchmark_reply(device_id, kind, reply, now)

    # -- effects -------------------------------------------------------------------------------
    def _send(self, device_ids: Sequence[str]) -> None:
        """Publish the desired deployments of a batch, then wait for the broker's acknowledgements
        (they travel together: one round trip for the batch, not one per device)."""
        deliveries = []
        for device_id in device_ids:
            if device_id in self._queued:
                self._queued.remove(device_id)
            plan = self.plans[device_id]
            message = replace(plan.desired, deployment_id=new_deployment_id(), ts=proto.now_s())
            self.watch.route(device_id, message.deployment_id,
                             lambda device, progress: self._events.put(("progress", device, progress)))
            try:
                delivery = self.link.mqtt.publish(proto.device_topic(device_id, proto.Down.DESIRED), message.to_json(),
                                                  qos=1, retain=True)
            except (MqttError, ValueError, RuntimeError) as exc:
                self.watch.unfollow(device_id, message.deployment_id)
                self._set(device_id, self._tracks[device_id].failed_to_send(f"could not publish the desired deployment: {exc}",
                                                                            time.monotonic()))
                continue
            deliveries.append((device_id, message, delivery))
        deadline = time.monotonic() + self.settings.publish_timeout_s
        for device_id, message, delivery in deliveries:
            try:
                delivered = delivery.wait(max(0.0, deadline - time.monotonic()))
            except MqttError as exc:
                delivered, reason = False, f"could not publish the desired deployment: {exc}; is the broker reachable?"
            else:
                reason = f"the broker did not acknowledge the desired deployment within {self.settings.publish_timeout_s:.0f} s"
            now = time.monotonic()
            if not delivered:
                self.watch.unfollow(device_id, message.deployment_id)
                self._set(device_id, self._tracks[device_id].failed_to_send(reason, now))
                continue
            plan = self.plans[device_id]
            self.store.add_event(DeploymentEvent(device_id, time.time(), "desired", message.deployment_id,
                                                 message.artifact_id, dict(plan.event_detail)))
            self.observer.stage(device_id, f"desired deployment {message.deployment_id[:12]} published")
            self._set(device_id, self._tracks[device_id].sent(message.deployment_id, now, self.settings.limits))

    def _send_benchmark(self, device_id: str, kind: str) -> None:
        assert self.settings.benchmark is not None
        def on_reply(reply: proto.CommandReply) -> None:
            self._events.put(("reply", device_id, kind, reply))

        request_id = self.link.send_command(device_id, self.settings.benchmark, on_reply)
        self._commands[request_id] = device_id

    def _on_benchmark_reply(self, device_id: str, kind: str, reply: proto.CommandReply, now: float) -> None:
        self._commands.pop(reply.request_id, None)
        track = self._tracks[device_id]
        plan = self.plans[device_id]
        expected = plan.previous_artifact_id if kind == "baseline" else plan.desired.artifact_id
        row: BenchmarkRow | None = None
        error: str | None = None
        if not reply.ok:
            error = f"{device_id} could not benchmark: {reply.error}"
        else:
            measured = benchmark_row(device_id, dict(reply.result), reply.ts or time.time())
            if expected and measured.artifact_id and measured.artifact_id != expected:
                error = (f"{device_id} benchmarked {measured.artifact_id[:12]}, not {expected[:12]} "
                         "(it changed model meanwhile)")
            else:
                row = measured
        if kind == "baseline":
            if track.phase is Phase.BASELINE:
                self._before[device_id] = row
                if error:
                    log.warning("baseline benchmark on %s failed: %s", device_id, error)
                self._set(device_id, track.baseline_done())
        elif track.phase is Phase.BENCHMARKING:
            self._after[device_id] = row
            self._set(device_id, track.benchmark_done(now, error))

    def _set(self, device_id: str, track: DeviceTrack) -> None:
        """Store the new track and act on its change of phase."""
        old = self._tracks[device_id]
        self._tracks[device_id] = track
        if track.phase is old.phase:
            return
        if track.phase is Phase.QUEUED:
            self._queued.append(device_id)
        elif track.phase is Phase.BENCHMARKING:
            assert self.settings.benchmark is not None
            self.observer.stage(device_id, f"on-device benchmark ({self.settings.benchmark.runs} runs)")
            self._send_benchmark(device_id, "after")
        elif track.phase.final:
            if track.deployment_id:
                self.watch.unfollow(device_id, track.deployment_id)
            if track.phase in (Phase.FAILED, Phase.REJECTED, Phase.ROLLED_BACK):
                self.restore(device_id, self.plans[device_id].previous_artifact_id)
            self.observer.stage(device_id, _final_stage(track))

    def _withdraw(self) -> None:
        """Ctrl-C: every device still transferring gets back the desired state it runs."""
        now = time.monotonic()
        for device_id, track in self._tracks.items():
            if track.phase.in_flight and track.deployment_id:
                previous = self.plans[device_id].previous_artifact_id
                self.restore(device_id, previous)
                try:
                    self.store.add_event(DeploymentEvent(device_id, time.time(), "cancelled", track.deployment_id,
                                                         self.plans[device_id].desired.artifact_id, {"restored": previous}))
                except BuilderError as exc:
                    log.warning("could not record the cancelled push of %s: %s", device_id, exc)
            self._tracks[device_id] = track.cancelled(now)


def _final_stage(track: DeviceTrack) -> str:
    if track.phase is Phase.ACTIVE:
        return "active"
    if track.phase is Phase.PENDING:
        return "offline: it installs the model when it reconnects"
    if track.phase is Phase.TIMEOUT:
        return f"no answer from the device ({track.error})"
    return f"{track.phase.value}" + (f": {track.error}" if track.error else "")
