"""One simulated device: its own MQTT connection (client id, username and password from its
agent.toml, as a real agent has), the agent's messages built by ``agent.protocol``, a deployment
answered by pulling, verifying and reporting progress like ``agent.daemon``, and synthetic
telemetry. Everything runs in the fleet's event loop; nothing blocks.

Records leave the device through one seam, ``RecordSender``: ``AckSender`` is the agent's
protocol (``agent.telemetry.TelemetrySender``: a record stays in the device's outbox until the
host's ``down/ack`` says it is stored, and ``agent.outbox.AckWindow`` decides what to send and
resend); ``PubackSender`` is the rule before acks (a record is gone once the broker PUBACKs it, as
``agent.telemetry.drain_outbox`` does), kept as ``--no-acks`` to measure what the acks buy.
"""
from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from agent import __version__ as AGENT_VERSION
from agent import protocol as proto
from agent.errors import AgentError, ProtocolError, SignatureError
from agent.mqtt import ClientSettings, LoopMqttClient, Will
from agent.outbox import DEFAULT_RESEND_AFTER_S, DEFAULT_WINDOW, AckWindow
from agent.transfer import verify_desired
from builder.fleet.simulate.pull import ArtifactPull
from builder.fleet.simulate.synthetic import benchmark_result, model_for, telemetry_report

log = logging.getLogger(__name__)

SIM_AGENT_VERSION = f"{AGENT_VERSION}+sim"
PROGRESS_EVERY_S = 0.5  # the agent's "downloading" updates: at most every 0.5 s


@dataclass(frozen=True)
class DeviceIdentity:
    """What a device needs to connect and to trust a deployment (read from its agent.toml)."""

    device_id: str
    client: ClientSettings
    trusted_key: Any  # Ed25519PublicKey
    profile: str | None = None
    # What a real agent persists across restarts (``seq`` above all: the host dedupes by it within
    # the incarnation; a new incarnation starts at seq 0, as a wiped agent's outbox does)
    first_seq: int = 0
    incarnation: str | None = None
    active_artifact_id: str | None = None
    active_model: str | None = None


@dataclass(frozen=True)
class Behaviour:
    """What every simulated device does; the defaults are the agent's."""

    telemetry_interval_s: float = 10.0
    requests_per_s: float = 5.0
    chunk_timeout_s: float = 10.0
    window_chunks: int = proto.DEFAULT_WINDOW_CHUNKS
    install_s: float = 0.05  # simulated install + health check


@dataclass
class DeviceCounters:
    """Per-device tallies the fleet sums up (mutable: only the loop's thread writes them)."""

    records_built: int = 0
    records_published: int = 0  # handed to the client (QoS 1), re-sends included
    records_resent: int = 0  # publishes of a record that had been published before (acks: timeouts, reconnects)
    records_acked: int = 0  # delivered by the device's rule: the host's ack (AckSender) or the broker's PUBACK
    records_pubacked: int = 0  # telemetry publishes the broker PUBACKed (whatever the rule)
    acks_received: int = 0  # down/ack messages of this device's incarnation
    chunk_requests: int = 0
    chunk_frames: int = 0
    chunk_bytes_received: int = 0  # whole frames off the wire (header + bytes)
    deployments: dict[str, dict[str, float | str]] = field(default_factory=dict)  # deployment id -> timings, state
    errors: int = 0


class RecordSender(Protocol):
    """How telemetry records leave the device."""

    def send(self, reports: Sequence[proto.TelemetryReport]) -> None: ...

    def on_connect(self) -> None: ...

    def on_published(self, mid: int) -> None: ...

    def on_ack(self, payload: bytes) -> None: ...

    def tick(self, now_monotonic: float) -> None: ...

    @property
    def unacked(self) -> int: ...


class PubackSender:
    """The rule before acks (``--no-acks``): publish QoS 1, forget the record at the broker's
    PUBACK. Records made while disconnected wait in memory and go out, in ``seq`` order, on the
    next connect (paho itself resends the in-flight ones). The host's acks are ignored."""

    def __init__(self, client: LoopMqttClient, topic: str, counters: DeviceCounters, incarnation: str | None = None) -> None:
        self.client = client
        self.topic = topic
        self.counters = counters
        self._in_flight: dict[int, int] = {}  # mid -> seq
        self._unsent: deque[tuple[int, bytes]] = deque()

    @property
    def unacked(self) -> int:
        return len(self._in_flight) + len(self._unsent)

    def send(self, reports: Sequence[proto.TelemetryReport]) -> None:
        for report in reports:
            self._unsent.append((report.seq, report.to_json()))
        self._drain()

    def _drain(self) -> None:
        while self._unsent:
            seq, body = self._unsent[0]
            mid = self.client.publish(self.topic, body, qos=1)
            if mid is None:
                return
            self._unsent.popleft()
            self._in_flight[mid] = seq
            self.counters.records_published += 1

    def on_connect(self) -> None:
        self._drain()

    def on_published(self, mid: int) -> None:
        if self._in_flight.pop(mid, None) is not None:
            self.counters.records_acked += 1
            self.counters.records_pubacked += 1

    def on_ack(self, payload: bytes) -> None:
        return None

    def tick(self, now_monotonic: float) -> None:
        return None


class AckSender:
    """The agent's delivery rule (``agent.telemetry.TelemetrySender`` over ``AckWindow``), with the
    outbox in memory: a record stays until a ``down/ack`` of this device's incarnation covers its
    seq; at most the window's records are in flight, timed-out ones go again (the window halves),
    and after a reconnect everything unacked is due at once. ``tick`` (about once a second) sends
    what timed out; an ack sends what the freed window allows. The PUBACK only counts."""

    def __init__(self, client: LoopMqttClient, topic: str, counters: DeviceCounters, incarnation: str | None = None, *,
                 window: int = DEFAULT_WINDOW, resend_after_s: float = DEFAULT_RESEND_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not incarnation:
            raise ValueError("an acked sender needs the device's incarnation")
        self.client = client
        self.topic = topic
        self.counters = counters
        self.clock = clock
        self.window = AckWindow(incarnation, window=window, resend_after_s=resend_after_s)
        self._outbox: dict[int, bytes] = {}  # seq -> body, ascending (seqs are built in order)
        self._telemetry_mids: set[int] = set()

    @property
    def incarnation(self) -> str:
        return self.window.incarnation

    @property
    def unacked(self) -> int:
        return len(self._outbox)

    def send(self, reports: Sequence[proto.TelemetryReport]) -> None:
        for report in reports:
            self._outbox[report.seq] = report.to_json()
        self._pump()

    def _pump(self) -> None:
        if not self._outbox or not self.client.connected:
            return
        now = self.clock()
        pending = list(itertools.islice(self._outbox, self.window.window))
        sent: list[int] = []
        for seq in self.window.to_send(pending, now):
            mid = self.client.publish(self.topic, self._outbox[seq], qos=1)
            if mid is None:
                break
            self._telemetry_mids.add(mid)
            sent.append(seq)
        before = self.window.stats().resent
        self.window.mark_sent(sent, now)
        self.counters.records_published += len(sent)
        self.counters.records_resent += self.window.stats().resent - before

    def on_connect(self) -> None:
        self.window.on_reconnect()
        self._pump()

    def on_published(self, mid: int) -> None:
        if mid in self._telemetry_mids:
            self._telemetry_mids.discard(mid)
            self.counters.records_pubacked += 1

    def on_ack(self, payload: bytes) -> None:
        """A ``down/ack``; ProtocolError for a malformed one (the caller counts it)."""
        ack = proto.TelemetryAck.from_json(payload)
        ranges = self.window.on_ack(ack)
        if ack.incarnation != self.incarnation:
            return
        self.counters.acks_received += 1
        removed = 0
        for first, last in ranges:
            if last - first + 1 <= len(self._outbox):
                for seq in range(first, last + 1):
                    removed += self._outbox.pop(seq, None) is not None
            else:
                for seq in [s for s in self._outbox if first <= s <= last]:
                    del self._outbox[seq]
                    removed += 1
        self.counters.records_acked += removed
        self._pump()

    def tick(self, now_monotonic: float) -> None:
        due = self.window.next_due_in_s(self.clock())
        if self._outbox and (due is None or due <= 0.0):
            self._pump()


SenderFactory = Callable[[LoopMqttClient, str, DeviceCounters, "str | None"], RecordSender]


class SimulatedDevice:
    """Connect with ``start()``; the fleet calls ``emit_telemetry``, ``flush_outbox`` and ``tick``."""

    def __init__(self, identity: DeviceIdentity, behaviour: Behaviour, loop: Any, rng: random.Random,
                 sender_factory: SenderFactory = AckSender, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.device_id = identity.device_id
        self.behaviour = behaviour
        self.loop = loop
        self.rng = rng
        self.clock = clock
        self.counters = DeviceCounters()
        self.telemetry_interval_s = behaviour.telemetry_interval_s
        self.seq = identity.first_seq
        self.incarnation = identity.incarnation or uuid.uuid4().hex  # load_identities persists one per device
        self.active_artifact_id: str | None = identity.active_artifact_id
        self.active_model: str | None = identity.active_model
        self.previous_artifact_id: str | None = None
        self._desired: proto.DesiredDeployment | None = None
        self._pull: ArtifactPull | None = None
        self._last_chunk_at = 0.0
        self._last_progress_at = 0.0
        self._failed: set[str] = set()
        will = Will(self._topic(proto.Up.STATUS),
                    proto.DeviceStatus(device_id=self.device_id, state="offline", agent_version=SIM_AGENT_VERSION).to_json())
        settings = _with_will(identity.client, will)
        self.client = LoopMqttClient(settings, loop, on_connect=self._on_connect, on_published=self._on_published)
        self.records = sender_factory(self.client, self._topic(proto.Up.TELEMETRY), self.counters, self.incarnation)
        self.client.subscribe(self._topic(proto.Down.ACK), self._on_ack)
        self.client.subscribe(self._topic(proto.Down.DESIRED), self._on_desired)
        self.client.subscribe(self._topic(proto.Down.CHUNKS), self._on_chunk)
        self.client.subscribe(self._topic(proto.Down.COMMAND), self._on_command)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.client.start()

    def stop(self) -> None:
        final = Will(self._topic(proto.Up.STATUS), self._status("offline").to_json())
        self.client.stop(final)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def state(self) -> dict[str, Any]:
        """What survives a restart of the simulator (``register.save_states``)."""
        return {"seq": self.seq, "incarnation": self.incarnation, "active_artifact_id": self.active_artifact_id, "active_model": self.active_model}

    def tick(self, now_monotonic: float) -> None:
        """About once a second: keep-alive, and a silent pull asks again from its first missing chunk."""
        self.client.tick()
        self.records.tick(now_monotonic)
        if self._pull is not None and now_monotonic - self._last_chunk_at > self.behaviour.chunk_timeout_s:
            self._pull.restart_window()
            self._last_chunk_at = now_monotonic
            self._request_chunks()

    # -- messages out ---------------------------------------------------------------------------
    def _topic(self, suffix: str) -> str:
        return proto.device_topic(self.device_id, suffix)

    def _publish(self, suffix: str, message: Any, retain: bool = False) -> None:
        self.client.publish(self._topic(suffix), message.to_json(), qos=1, retain=retain)

    def _status(self, state: str) -> proto.DeviceStatus:
        return proto.DeviceStatus(device_id=self.device_id, state=state, active_artifact_id=self.active_artifact_id,
                                  active_model=self.active_model, previous_artifact_id=self.previous_artifact_id,
                                  profile=self.identity.profile, agent_version=SIM_AGENT_VERSION, ts=proto.now_s())

    def _on_connect(self) -> None:
        self._publish(proto.Up.HELLO, proto.Hello(
            device_id=self.device_id, agent_version=SIM_AGENT_VERSION, profile=self.identity.profile, machine="simulated",
            runtimes=("onnxruntime",), active_artifact_id=self.active_artifact_id, free_disk_bytes=8 << 30,
            ts=proto.now_s(), incarnation=self.incarnation))
        self._publish(proto.Up.STATUS, self._status("online"), retain=True)
        self.records.on_connect()
        if self._pull is not None:  # in-flight chunks may be lost with the old connection
            self._pull.restart_window()
            self._request_chunks()

    def _on_published(self, mid: int) -> None:
        self.records.on_published(mid)

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            self.records.on_ack(payload)
        except ProtocolError as exc:
            self.counters.errors += 1
            log.warning("%s: ignoring a malformed telemetry ack: %s", self.device_id, exc)

    def _next_report(self, ts: float, event: str = "periodic", window_s: float | None = None,
                     details: dict[str, Any] | None = None) -> proto.TelemetryReport:
        report = telemetry_report(self.device_id, self.seq, ts, model_for(self.active_artifact_id), self.rng,
                                  window_s=self.telemetry_interval_s if window_s is None else window_s,
                                  requests_per_s=self.behaviour.requests_per_s, event=event,
                                  model_label=self.active_model, details=details, incarnation=self.incarnation)
        self.seq += 1
        self.counters.records_built += 1
        return report

    def emit_telemetry(self, event: str = "periodic", details: dict[str, Any] | None = None) -> None:
        self.records.send([self._next_report(self.clock(), event, details=details)])

    def flush_outbox(self, count: int) -> None:
        """``count`` buffered reports at once, as ``drain_outbox`` sends them after an outage. Their
        ``ts`` is the flush time, so ``received_at - ts`` measures the host's ingest delay, not the outage."""
        now = self.clock()
        self.records.send([self._next_report(now, details={"buffered": True}) for _ in range(count)])

    # -- deployment -----------------------------------------------------------------------------
    def _progress(self, desired: proto.DesiredDeployment, state: str, done: int = 0, total: int = 0,
                  error: str | None = None) -> None:
        percent = round(100.0 * done / total, 2) if total else (100.0 if state == "active" else 0.0)
        self._publish(proto.Up.PROGRESS, proto.TransferProgress(
            deployment_id=desired.deployment_id, artifact_id=desired.artifact_id, state=state, bytes_done=done,
            bytes_total=total, percent=percent, error=error, ts=proto.now_s()))
        record = self.counters.deployments.setdefault(desired.deployment_id, {"received": time.monotonic()})
        record["state"] = state
        record[state] = time.monotonic()

    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            self._pull, self._desired = None, None  # cleared: keep what runs, drop the pull
            return
        try:
            desired = proto.DesiredDeployment.from_json(payload)
        except ProtocolError as exc:
            self.counters.errors += 1
            log.warning("%s: ignoring a malformed desired deployment: %s", self.device_id, exc)
            return
        if desired.artifact_id == self.active_artifact_id:
            self._progress(desired, "active")
            return
        if self._desired is not None and self._desired.deployment_id == desired.deployment_id and self._pull is not None:
            return  # a re-sent deployment already being pulled
        if desired.deployment_id in self._failed:
            return
        self._progress(desired, "verifying")
        try:
            manifest = verify_desired(desired, self.identity.trusted_key)
        except (SignatureError, ProtocolError) as exc:
            self._failed.add(desired.deployment_id)
            self._progress(desired, "rejected", error=str(exc))
            return
        self._desired = desired
        self._pull = ArtifactPull(manifest, window_chunks=self.behaviour.window_chunks)
        self._last_chunk_at = time.monotonic()
        self._progress(desired, "downloading", 0, manifest.total_size_bytes)
        self._request_chunks()

    def _request_chunks(self) -> None:
        if self._pull is None or not self.client.connected:
            return
        for request in self._pull.next_requests():
            self._publish(proto.Up.CHUNK_REQUEST, request)
            self.counters.chunk_requests += 1

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        pull, desired = self._pull, self._desired
        self.counters.chunk_frames += 1
        self.counters.chunk_bytes_received += len(payload)
        if pull is None or desired is None:
            return
        try:
            frame = proto.decode_chunk_frame(payload)
            advanced = pull.accept(frame)
        except ProtocolError as exc:
            self.counters.errors += 1
            log.warning("%s: dropping a malformed chunk frame: %s", self.device_id, exc)
            return
        except AgentError as exc:  # TransferError / SignatureError: the deployment failed
            self._pull = None
            self._failed.add(desired.deployment_id)
            self._progress(desired, "failed", error=str(exc))
            return
        total = pull.manifest.total_size_bytes
        if advanced:
            self._last_chunk_at = time.monotonic()
        if pull.done:
            self._pull = None
            self._progress(desired, "installing", total, total)
            self.loop.call_later(self.behaviour.install_s, self._activate, desired, pull)
            return
        if advanced and time.monotonic() - self._last_progress_at >= PROGRESS_EVERY_S:
            self._last_progress_at = time.monotonic()
            self._progress(desired, "downloading", pull.bytes_done, total)
        self._request_chunks()

    def _activate(self, desired: proto.DesiredDeployment, pull: ArtifactPull) -> None:
        if self._desired is not desired:
            return  # replaced meanwhile
        manifest = pull.manifest
        self.previous_artifact_id = self.active_artifact_id
        self.active_artifact_id = manifest.artifact_id
        self.active_model = f"{manifest.model_name}@{manifest.model_version}"
        total = manifest.total_size_bytes
        self._progress(desired, "active", total, total)
        self.counters.deployments[desired.deployment_id]["compressed_bytes"] = pull.compressed_bytes
        self._publish(proto.Up.STATUS, self._status("online"), retain=True)
        self.emit_telemetry("install", details={"deployment_id": desired.deployment_id,
                                                "transfer": {"compressed_bytes": pull.compressed_bytes,
                                                             "rerequests": pull.rerequests}})

    # -- commands -------------------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes) -> None:
        try:
            command = proto.Command.from_json(payload)
        except ProtocolError as exc:
            self.counters.errors += 1
            log.warning("%s: ignoring a malformed command: %s", self.device_id, exc)
            return
        try:
            args = command.parsed_args()
            result = self._execute(args)
            reply = proto.CommandReply(request_id=command.request_id, command=command.command, ok=True, result=result,
                                       ts=proto.now_s())
        except (ProtocolError, _NotSimulated) as exc:
            reply = proto.CommandReply(request_id=command.request_id, command=command.command, ok=False, error=str(exc),
                                       ts=proto.now_s())
        self._publish(proto.Up.REPLY, reply)

    def _execute(self, args: proto.CommandArgs) -> dict[str, Any]:
        if isinstance(args, proto.StatusArgs):
            deploying = self._desired.deployment_id if self._pull is not None and self._desired is not None else None
            return {**self._status("online").to_dict(), "deploying": deploying, "trial": None}
        if isinstance(args, proto.BenchmarkArgs):
            if self.active_artifact_id is None:
                raise _NotSimulated("no active model to benchmark")
            result = benchmark_result(model_for(self.active_artifact_id), self.rng, args.runs, args.warmup)
            self.emit_telemetry("benchmark")
            return result
        if isinstance(args, proto.SetTelemetryIntervalArgs):
            self.telemetry_interval_s = float(args.seconds)
            return {"telemetry_interval_s": self.telemetry_interval_s}
        raise _NotSimulated(f"command {args.COMMAND!r} is not simulated")


class _NotSimulated(Exception):
    """A command the simulator answers with ok: false (trial, rollback, set_load)."""


def _with_will(settings: ClientSettings, will: Will) -> ClientSettings:
    from dataclasses import replace

    return replace(settings, will=will)
