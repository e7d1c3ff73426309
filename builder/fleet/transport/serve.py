"""`builder serve`: the host-side daemon of a fleet.

It connects to the broker with the builder's credentials (or starts the embedded one), keeps the
device registry from what devices announce (hello, retained status, last will), ingests telemetry,
benchmarks and deployment progress into the fleet store, and answers devices' chunk requests from
the artifact registry. Telemetry is decoded in the network thread and stored in batches by the
ingest worker (``ingest.py``), which then acknowledges the stored seqs to each device and calls
the telemetry hooks (the re-compression controller of issue 8) for each new report.

A malformed message never stops a handler: decoding raises ``ProtocolError``, which the client's
dispatch counts per (device, kind) (``message_errors``) and logs.

Artifacts are served from a directory of symlinks per artifact (``serve-cache/<id>/``: manifest,
signature, payloads pointing at the registry's content-addressed blobs), so nothing is copied.

Several serve workers share one fleet with ``worker_group`` (`builder serve --worker-group NAME`,
docs/scale.md): they connect with MQTT 5 and subscribe to the devices' hello, telemetry, progress and
chunk requests as ``$share/NAME/…``, so the broker hands each message to one worker; every worker
subscribes to the retained status normally (the registry's online state is an idempotent upsert).
The duties one process must do alone (announce ``SERVE_TOPIC`` with its last will, publish the
desired deployments again, run the re-compression loop) go to the worker holding the store's
``serve-duties`` lock; the others poll for it every second and take over when its holder dies.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from agent import protocol as proto
from agent.manifest import MANIFEST_FILE, SIGNATURE_FILE
from agent.mqtt import MqttVersion, shared_filter
from builder.errors import BuilderError, FleetError
from builder.fleet.transport.embedded_broker import EmbeddedBroker, EmbeddedBrokerSettings
from builder.fleet.transport.ingest import IncomingReport, IngestQueue, IngestWorker, acks_for
from builder.fleet.transport.link import (SERVE_STATE_FILE, SERVE_TOPIC, BrokerEndpoint, FleetLink, write_serve_state)
from builder.fleet.transport.store import (TELEMETRY_RESET, BenchmarkRow, DeploymentEvent, FleetStore, SingletonLock,
                                           TelemetryRow, open_store)

log = logging.getLogger(__name__)

TelemetryHook = Callable[[str, proto.TelemetryReport], None]
FINAL_STATES = ("active", "failed", "rejected", "rolled_back")
MAX_TRACKED_TRANSFERS = 20_000  # byte counts kept for the dashboard (a few fleet-wide pushes)
ESTIMATE_PREFIX = "estimate: "  # power_source of a profile-based estimate (no sensor on the device)


@dataclass(frozen=True)
class ServeSettings:
    data_dir: Path
    broker: BrokerEndpoint | None = None  # None: start the embedded broker
    embedded: EmbeddedBrokerSettings = field(default_factory=EmbeddedBrokerSettings)
    chunk_delay_s: float = 0.0  # simulate a slow link (tests, demo)
    store_url: str | None = None  # postgresql://…; None: the data dir's SQLite file
    worker_group: str | None = None  # share the fleet's messages with the other workers of this group


def report_artifact_id(report: proto.TelemetryReport) -> str | None:
    """The artifact a report was measured on (``artifact_id``; older agents sent ``model_id``)."""
    return getattr(report, "artifact_id", None) or getattr(report, "model_id", None)


def telemetry_row(device_id: str, report: proto.TelemetryReport, received_at: float) -> TelemetryRow:
    latency = dict(report.latency_ms or {})

    def num(key: str) -> float | None:
        value = latency.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    power_w, power_source = report.power_w, report.power_source
    details = dict(report.details or {})
    if power_w is None and isinstance(details.get("estimated_power_w"), (int, float)):
        # the agent's profile-based estimate, kept only with its label (never shown as a measurement)
        power_w = float(details["estimated_power_w"])
        power_source = f"{ESTIMATE_PREFIX}{details.get('power_estimate_basis', 'device profile')}"
    return TelemetryRow(device_id=device_id, seq=report.seq, ts=report.ts, event=report.event,
                        model_id=report_artifact_id(report), window_s=report.window_s, requests=report.requests,
                        errors=report.errors, p50_ms=num("p50"), p95_ms=num("p95"), latency_ms=latency,
                        cpu_percent=report.cpu_percent, memory_rss_bytes=report.memory_rss_bytes,
                        temperature_c=report.temperature_c, power_w=power_w, power_source=power_source,
                        received_at=received_at, incarnation=report.incarnation or "")


def benchmark_row(device_id: str, result: dict[str, Any], ts: float, artifact_id: str | None = None) -> BenchmarkRow:
    """A benchmark result (``agent.bench.BenchmarkResult.to_dict()``) as a store row."""
    latency = dict(result.get("latency") or {})
    energy_j = result.get("energy_per_inference_j")
    power_w, source = result.get("power_w"), str(result.get("power_source", "not measured"))
    if power_w is None and isinstance(result.get("estimated_power_w"), (int, float)):
        power_w, source = float(result["estimated_power_w"]), f"{ESTIMATE_PREFIX}device profile"
        energy_j = result.get("estimated_energy_per_inference_j")
    return BenchmarkRow(device_id=device_id, ts=ts, artifact_id=result.get("artifact_id") or artifact_id,
                        p50_ms=latency.get("p50"), p95_ms=latency.get("p95"), mean_ms=latency.get("mean"),
                        power_w=power_w, power_source=source,
                        energy_mj=(float(energy_j) * 1000 if energy_j is not None else None), result=result)


class ArtifactDirectories:
    """artifact id -> a directory the chunk server can read (symlinks into the registry)."""

    def __init__(self, registry: Any, cache_root: Path) -> None:
        self.registry = registry
        self.cache_root = Path(cache_root)

    def __call__(self, artifact_id: str) -> Path | None:
        target = self.cache_root / artifact_id
        if (target / MANIFEST_FILE).is_file():
            return target
        try:
            manifest = self.registry.manifest(artifact_id)
        except BuilderError:
            return None
        if manifest.artifact_id != artifact_id:
            return None  # a prefix matched: chunk requests must name the full id
        self.cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{artifact_id[:12]}.", dir=self.cache_root))
        try:
            mdir = self.registry.manifest_dir(artifact_id)
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                os.symlink(mdir / name, staging / name)
            for entry in manifest.payloads:
                os.symlink(self.registry.blob_path(entry.sha256), staging / entry.name)
            try:
                os.replace(staging, target)
            except OSError:  # another thread won the race
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


class FleetServer:
    """Start with ``start()``, stop with ``stop()``; ``run_forever()`` blocks until Ctrl-C."""

    def __init__(self, settings: ServeSettings, telemetry_hooks: Sequence[TelemetryHook] = ()) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.telemetry_hooks = list(telemetry_hooks)
        self.embedded: EmbeddedBroker | None = None
        self.endpoint: BrokerEndpoint | None = None
        self.link: FleetLink | None = None
        self.store: FleetStore | None = None
        self.chunk_server: Any = None
        self._last_state: dict[tuple[str, str], str] = {}
        # (device, deployment) -> (bytes_done, bytes_total) of the latest progress: the dashboard's bars
        # (the store keeps one event per state; the percentages would be a row per window)
        self._transfer_bytes: dict[tuple[str, str], tuple[int, int]] = {}
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self.reports_ingested = 0
        self.ingest_queue = IngestQueue()
        self.ingest: IngestWorker | None = None
        self.acks_sent = 0
        self.telemetry_received = 0
        self._duties: SingletonLock | None = None  # worker groups only: who announces, republishes, loops
        self._announcer: FleetLink | None = None  # the duty holder's connection with the SERVE_TOPIC will
        self.leading = settings.worker_group is None  # a lone serve does every duty itself

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FleetServer":
        from builder.artifacts.registry import Registry
        from builder.fleet.transport.chunk_server import ChunkServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(self.data_dir, self.settings.store_url)
        registry = Registry(self.data_dir)
        self.ingest = IngestWorker(self.ingest_queue, self._store_batch).start()
        try:
            if self.settings.broker is None:
                self.embedded = EmbeddedBroker(self.settings.embedded, config_dir=self.data_dir / "embedded-broker").start()
                self.endpoint = BrokerEndpoint(self.embedded.url)
            else:
                self.endpoint = self.settings.broker
            group = self.settings.worker_group
            if group is None:
                self.link = FleetLink(self.endpoint, client_id=f"edgefleet-serve-{os.getpid()}",
                                      will=(SERVE_TOPIC, self._serve_state("offline")))
            else:  # no will: one worker's death says nothing about the others; MQTT 5 for $share
                shared_filter(group, "x")  # a bad group name fails before anything connects
                self.link = FleetLink(self.endpoint, client_id=f"edgefleet-serve-{group}-{uuid.uuid4().hex[:8]}",
                                      version=MqttVersion.V5)
            self.link.connect()
            self.chunk_server = ChunkServer(self.link.mqtt, ArtifactDirectories(registry, self.data_dir / "serve-cache"),
                                            cache_dir=self.data_dir / "chunk-cache",
                                            delay_per_chunk_s=self.settings.chunk_delay_s, share_group=group)
            self.chunk_server.attach()
            # Retained statuses at QoS 0: the broker sends all of them at once on subscribe, and at QoS
            # 1 it drops what exceeds its per-client in-flight + queue limits (fleet Mosquitto: 64 +
            # 1000; measured: 1,064 of 1,200 arrived), with whatever else was queued for serve.
            for suffix, handler, shared, qos in ((proto.Up.HELLO, self._on_hello, True, 1),
                                                 (proto.Up.STATUS, self._on_status, False, 0),
                                                 (proto.Up.TELEMETRY, self._on_telemetry, True, 1),
                                                 (proto.Up.PROGRESS, self._on_progress, True, 1)):
                topic_filter = proto.all_devices_topic(suffix)
                self.link.subscribe(shared_filter(group, topic_filter) if group and shared else topic_filter, handler,
                                    qos=qos)
            if group is None:
                self._republish_desired()
                self.link.publish(SERVE_TOPIC, self._serve_state("online"), retain=True)
            else:
                self._duties = self.store.singleton_lock(f"serve-duties-{group}")
                self.poll_duties()
            write_serve_state(self.data_dir, self.endpoint, embedded=self.embedded is not None)
        except BaseException:
            self.stop()
            raise
        log.info("serving the fleet on %s (data dir %s)", self.endpoint.public_url(), self.data_dir)
        return self

    @staticmethod
    def _serve_state(state: str) -> bytes:
        data: dict[str, Any] = {"state": state, "pid": os.getpid()}
        if state == "online":
            data["since"] = time.time()
        return json.dumps(data).encode()

    def poll_duties(self) -> bool:
        """A worker of a group takes the singleton duties when nobody holds them (at start, then every
        second from ``run_forever``), and gives them up when its lock was lost. True while it holds them."""
        if self._duties is None or self.link is None or self.endpoint is None:
            return self.leading
        held = self._duties.held or self._duties.try_acquire()
        if held and not self.leading:
            announcer = FleetLink(self.endpoint, client_id=f"{self.link.client_id}-duties",
                                  will=(SERVE_TOPIC, self._serve_state("offline")), version=MqttVersion.V5)
            try:
                announcer.connect()
                announcer.publish(SERVE_TOPIC, self._serve_state("online"), retain=True)
            except FleetError as exc:
                announcer.close()
                self._duties.release()
                log.warning("could not take the serve duties of group %s: %s", self.settings.worker_group, exc)
                return False
            self._announcer = announcer
            self.leading = True
            self._republish_desired()
            log.info("this worker does group %s's singleton duties (announce, republish desired, loop)",
                     self.settings.worker_group)
        elif not held and self.leading:
            self.leading = False
            if self._announcer is not None:
                self._announcer.close()
                self._announcer = None
            log.warning("lost the serve duties lock of group %s; another worker takes them", self.settings.worker_group)
        return self.leading

    def _republish_desired(self) -> None:
        """Retained desired deployments live in the broker's memory: the embedded broker (and a
        Mosquitto without persistence) forgets them on restart. Publish each device's last one again,
        same deployment id, so a device that comes back still finds what it must run."""
        assert self.store is not None and self.link is not None
        for device_id, event in self.store.latest_desired().items():
            message = self._last_desired_message(device_id, event)
            if message is not None:
                self.link.publish(proto.device_topic(device_id, proto.Down.DESIRED), message.to_json(), retain=True)

    def _last_desired_message(self, device_id: str, event: DeploymentEvent) -> proto.DesiredDeployment | None:
        from builder.fleet.transport.chunk_server import desired_message

        directory = self.chunk_server.lookup(event.artifact_id) if event.artifact_id else None
        if directory is None:
            log.warning("cannot restore %s's desired deployment: artifact %s is not in the registry",
                        device_id, (event.artifact_id or "?")[:12])
            return None
        return desired_message(directory, event.deployment_id)

    def _resend_desired(self, device_id: str, running_artifact: str | None) -> None:
        """A device that says hello gets its desired deployment again unless it already runs it: a
        broker need not resend retained messages to a reconnecting persistent session (rumqttd does
        not), so an agent killed mid-download would otherwise never learn what to resume."""
        if self.store is None or self.link is None:
            return
        event = self.store.latest_desired().get(device_id)
        if event is None or event.artifact_id == running_artifact:
            return
        message = self._last_desired_message(device_id, event)
        if message is not None:  # network thread: publish without waiting for the PUBACK
            self.link.publish_nowait(proto.device_topic(device_id, proto.Down.DESIRED), message.to_json(), retain=True)
            log.info("%s: desired deployment %s sent again", device_id, event.deployment_id)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.ingest is not None:  # store (and ack) what is queued while the link is still up
            self.ingest.stop()
            self.ingest = None
        for hook in self.telemetry_hooks:
            close = getattr(hook, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - shutting down: log and go on
                    log.exception("closing telemetry hook %r failed", hook)
        state = read_own_serve_state(self.data_dir)
        if state is not None and state.get("pid") == os.getpid():
            (self.data_dir / SERVE_STATE_FILE).unlink(missing_ok=True)
        announcer = self._announcer if self._duties is not None else self.link
        if announcer is not None and self.leading:
            try:
                if announcer.connected:
                    announcer.publish(SERVE_TOPIC, self._serve_state("offline"), retain=True, timeout_s=2)
            except FleetError:
                pass
        if self._announcer is not None:
            self._announcer.close()
            self._announcer = None
        if self._duties is not None:
            self._duties.release()  # after the offline announcement: the next holder announces online
            self._duties = None
        self.leading = False
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def run_forever(self) -> None:
        try:
            while not self._stop_requested.wait(1.0):
                if self._duties is not None:
                    self.poll_duties()
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Ask ``run_forever`` to return (signal handlers call this)."""
        self._stop_requested.set()

    def __enter__(self) -> "FleetServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def message_errors(self) -> dict[tuple[str, str], int]:
        """Messages refused or failed so far, per (device id, message kind)."""
        return dict(self.link.mqtt.handler_errors) if self.link is not None else {}

    # -- ingest (network thread; ProtocolError goes to the client's dispatch: counted, logged) ---
    def _device(self, topic: str) -> str:
        return proto.parse_device_topic(topic)[0]

    def _on_hello(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if self.store is None:
            return
        hello = proto.Hello.from_json(payload)
        if hello.incarnation and self.link is not None:
            # "this host acknowledges telemetry": the agent keeps its reports until acked from now on
            ack = proto.TelemetryAck(incarnation=hello.incarnation, ranges=(), ts=proto.now_s())
            self.link.publish_nowait(proto.device_topic(device_id, proto.Down.ACK), ack.to_json())
        log.info("%s says hello: profile %s, %s, runtimes %s, agent %s", device_id, hello.profile, hello.machine,
                 ",".join(hello.runtimes) or "-", hello.agent_version)
        self.store.record_hello(device_id, agent_version=hello.agent_version, profile=hello.profile,
                                machine=hello.machine, runtimes=tuple(hello.runtimes),
                                execution_providers=tuple(hello.execution_providers),
                                active_artifact_id=hello.active_artifact_id)
        known = self.store.find_device(device_id)
        if known is not None and not known.registered:
            log.warning("%s is not registered (no `builder fleet add-device %s`): listed as unregistered, pushes refuse it",
                        device_id, device_id)
            return
        self._resend_desired(device_id, hello.active_artifact_id)

    def _on_status(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if self.store is None or not payload:
            return
        status = proto.DeviceStatus.from_json(payload)
        online = status.state == "online"
        log.info("%s %s, running %s", device_id, status.state, status.active_model or "no model")
        self.store.record_status(device_id, online=online, active_artifact_id=status.active_artifact_id,
                                 active_model=status.active_model, previous_artifact_id=status.previous_artifact_id,
                                 profile=status.profile, agent_version=status.agent_version,
                                 ts=time.time())

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        """Decode and queue only: the ingest worker stores, acks and runs the hooks."""
        device_id = self._device(topic)
        report = proto.TelemetryReport.from_json(payload)
        self.telemetry_received += 1  # delivered to this worker (a worker group shares them)
        if not self.ingest_queue.put(IncomingReport(device_id, report, time.time())):
            log.warning("ingest queue full (%d reports): %s's report %d dropped unacked (it will be resent)",
                        self.ingest_queue.max_items, device_id, report.seq)

    def _store_batch(self, batch: list[IncomingReport]) -> None:
        """The ingest worker: one transaction for the batch, then acks, then hooks for new reports."""
        store = self.store
        if store is None:
            return
        result = store.add_telemetry_batch([telemetry_row(i.device_id, i.report, i.received_at) for i in batch])
        for event in result.events:
            if event.kind == TELEMETRY_RESET:
                log.warning("%s started a new telemetry incarnation %s (previous %s up to seq %s): data dir wiped "
                            "or a new agent", event.device_id, event.detail.get("incarnation"),
                            event.detail.get("previous_incarnation") or "(none)", event.detail.get("previous_max_seq"))
            else:
                log.info("%s: telemetry gap of %s report(s) in incarnation %s (seq %s..%s; resends may fill it)",
                         event.device_id, event.detail.get("missing"), event.detail.get("incarnation") or "''",
                         event.detail.get("first_missing"), event.detail.get("last_missing"))
        link = self.link
        if link is not None:
            for ack in acks_for(batch, proto.now_s()):
                link.publish_nowait(ack.topic, ack.ack.to_json())
                self.acks_sent += 1
        for item, new in zip(batch, result.new):
            if not new:
                continue  # a re-sent report (acked again above)
            self.reports_ingested += 1
            report = item.report
            if report.event == "benchmark" and report.benchmark:
                store.add_benchmark(benchmark_row(item.device_id, dict(report.benchmark), report.ts,
                                                  report_artifact_id(report)))
            for hook in self.telemetry_hooks if self.leading else ():  # the loop: one worker of a group
                try:
                    hook(item.device_id, report)
                except Exception:  # noqa: BLE001 - a controller bug must not stop ingest
                    log.exception("telemetry hook %r failed", hook)

    def transfer_bytes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """A copy of the latest byte counts per (device, deployment), for the dashboard's thread."""
        return dict(self._transfer_bytes)

    def _on_progress(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if self.store is None:
            return
        progress = proto.TransferProgress.from_json(payload)
        key = (device_id, progress.deployment_id)
        self._transfer_bytes[key] = (int(progress.bytes_done), int(progress.bytes_total))
        if len(self._transfer_bytes) > MAX_TRACKED_TRANSFERS:  # oldest first (insertion order)
            self._transfer_bytes.pop(next(iter(self._transfer_bytes)), None)
        if self._last_state.get(key) == progress.state:
            return  # download percentages: one event per state is enough
        self._last_state[key] = progress.state
        if progress.state in FINAL_STATES:
            log.info("%s deployment %s: %s%s", device_id, progress.deployment_id, progress.state,
                     f" ({progress.error})" if progress.error else "")
        detail: dict[str, Any] = {"bytes_total": progress.bytes_total}
        if progress.error:
            detail["error"] = progress.error
        self.store.add_event(DeploymentEvent(device_id=device_id, ts=progress.ts or time.time(), kind=progress.state,
                                             deployment_id=progress.deployment_id, artifact_id=progress.artifact_id,
                                             detail=detail))


def read_own_serve_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((Path(data_dir) / SERVE_STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return None
