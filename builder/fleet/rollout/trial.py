"""Host side of on-device trials: benchmark a registered artifact on one device without deploying it.

The device pulls the artifact's chunks like a deployment, but into a scratch folder, benchmarks it
in a session of its own and deletes it (``agent/trial.py``; protocol: ``TrialRequest``). Chunks come
from the `builder serve` of this data dir when one runs on the same broker (it serves every
registered artifact); otherwise this object answers the chunk requests itself, exactly as serve
would (``ChunkServer`` over the registry). Each result is stored as a benchmark row in the fleet
store, so ``objectives.fleet_calibration`` learns the device's latency factor from it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from agent import protocol as proto
from builder.errors import BuilderError, DeviceUnavailableError, FleetError
from builder.fleet.transport.link import BrokerEndpoint, FleetLink, read_serve_state

log = logging.getLogger(__name__)

BUSY_RETRY_S = 1.0


@dataclass(frozen=True)
class TrialSettings:
    runs: int = 50
    warmup: int = 5
    timeout_s: float = 300.0  # the whole trial: transfer, load, benchmark (also sent to the agent)
    status_timeout_s: float = 10.0  # how long a device may take to answer `status` before it counts as offline


@dataclass(frozen=True)
class TrialMeasurement:
    """One trial's outcome as the search uses it; ``result`` is the agent's full reply."""

    device_id: str
    artifact_id: str
    p50_ms: float
    p95_ms: float
    seconds: float
    result: Mapping[str, Any] = field(default_factory=dict)


class DeviceTrials:
    """Trials on one device: ``open()`` checks it answers, ``measure(artifact_id)`` runs one trial."""

    def __init__(self, endpoint: BrokerEndpoint, data_dir: Path, device_id: str,
                 settings: TrialSettings | None = None, store_url: str | None = None) -> None:
        proto.validate_device_id(device_id)
        self.store_url = store_url  # None: the data dir's SQLite file
        self.endpoint = endpoint
        self.data_dir = Path(data_dir)
        self.device_id = device_id
        self.settings = settings or TrialSettings()
        self.link: FleetLink | None = None
        self.chunk_server: Any = None
        self.device_status: Mapping[str, Any] = {}
        # Artifacts whose chunks this process serves: other search workers (--jobs) run their own
        # servers on the same broker, and each answers only for its own trials.
        self._offered: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> "DeviceTrials":
        """Connect, serve chunks unless this data dir's `builder serve` does, and require the
        device to answer ``status`` (DeviceUnavailableError naming the device and the fix)."""
        from builder.fleet.transport.store import open_store

        self.link = FleetLink(self.endpoint, client_id=f"edgefleet-trials-{self.device_id}-{time.time_ns() % 10**9}")
        try:
            self.link.connect()
            if not self._serve_running():
                self._serve_chunks()
            with open_store(self.data_dir, self.store_url) as store:
                known = store.find_device(self.device_id)
                self.device_status = self._status(known is not None)
                if known is None:  # as `builder serve` would on its retained status
                    store.record_status(self.device_id, online=True, profile=self.device_status.get("profile"),
                                        agent_version=self.device_status.get("agent_version"),
                                        active_artifact_id=self.device_status.get("active_artifact_id"),
                                        active_model=self.device_status.get("active_model"))
                elif known.runtimes and "onnxruntime" not in known.runtimes:
                    raise FleetError(f"{self.device_id} has no ONNX Runtime ({', '.join(known.runtimes)}); on-device "
                                     "trials ship ONNX candidates: measure on a device with onnxruntime")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.link is not None:
            try:
                self.link.close()
            finally:
                self.link = None

    def __enter__(self) -> "DeviceTrials":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve_running(self) -> bool:
        """A `builder serve` of this data dir on the same broker answers the chunk requests itself
        (two servers would send every chunk twice)."""
        state = read_serve_state(self.data_dir)
        if state is None:
            return False
        try:
            return BrokerEndpoint(str(state.get("url", ""))).public_url() == self.endpoint.public_url()
        except BuilderError:  # an unparsable serve.json: serve the chunks ourselves
            return False

    def _serve_chunks(self) -> None:
        from builder.artifacts.registry import Registry
        from builder.fleet.transport.chunk_server import ChunkServer
        from builder.fleet.transport.serve import ArtifactDirectories

        assert self.link is not None
        self.chunk_server = ChunkServer(self.link.mqtt, ArtifactDirectories(Registry(self.data_dir),
                                                                              self.data_dir / "serve-cache"),
                                        cache_dir=self.data_dir / "chunk-cache")
        self.link.subscribe(proto.all_devices_topic(proto.Up.CHUNK_REQUEST), self._on_chunk_request)
        log.info("no `builder serve` for %s on %s: serving trial chunks from this process", self.data_dir,
                 self.endpoint.public_url())

    def _on_chunk_request(self, topic: str, payload: bytes) -> None:
        try:
            request = proto.ChunkRequest.from_json(payload)
        except Exception:  # noqa: BLE001 - the chunk server logs malformed requests itself
            request = None
        if request is None or request.artifact_id in self._offered:
            self.chunk_server.on_request(topic, payload)

    def offer(self, artifact_id: str) -> None:
        """Answer chunk requests for this registered artifact (trials call it for theirs)."""
        self._offered.add(artifact_id)

    def _status(self, known: bool) -> Mapping[str, Any]:
        assert self.link is not None
        try:
            reply = self.link.command(self.device_id, proto.StatusArgs(), timeout_s=self.settings.status_timeout_s)
        except FleetError as exc:
            where = self.endpoint.public_url()
            if known:
                raise DeviceUnavailableError(
                    f"device '{self.device_id}' is offline: no answer to status within "
                    f"{self.settings.status_timeout_s:g} s on {where}; start its agent (`agent run --config agent.toml`) "
                    "or measure on another device") from exc
            raise DeviceUnavailableError(
                f"unknown device '{self.device_id}': not in the fleet store of {self.data_dir} and no answer on {where}; "
                f"add it with `builder fleet add-device {self.device_id} --profile P` and start its agent, "
                "or check --measure-on / --data-dir") from exc
        if not reply.ok:
            raise FleetError(f"{self.device_id} refused status: {reply.error}")
        return dict(reply.result)

    # -- trials -----------------------------------------------------------------------------
    def measure(self, artifact_id: str) -> TrialMeasurement:
        """Run one trial of a registered artifact; a busy device is asked again until the timeout.

        FleetError when the device refuses (bad signature, model fails to load); DeviceUnavailableError
        when it stops answering.
        """
        from builder.artifacts.registry import Registry
        from builder.fleet.transport.chunk_server import desired_message

        if self.link is None:
            raise FleetError("internal: DeviceTrials.measure before open()")
        registry = Registry(self.data_dir)
        directory = registry.manifest_dir(registry.resolve(artifact_id))
        desired = desired_message(directory)
        request = proto.TrialRequest(artifact_id=desired.artifact_id, manifest=desired.manifest,
                                     signature=desired.signature, runs=self.settings.runs, warmup=self.settings.warmup,
                                     timeout_s=self.settings.timeout_s)
        return self.send(request)

    def send(self, request: proto.TrialRequest) -> TrialMeasurement:
        """Send a trial request as is (``measure`` builds it from the registry) and wait for its result."""
        assert self.link is not None
        self.offer(request.artifact_id)
        started = time.monotonic()
        deadline = started + self.settings.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = self.link.command(self.device_id, request, timeout_s=max(1.0, remaining) + 5.0)
            except FleetError as exc:
                self._still_there(exc)
                raise FleetError(f"{self.device_id} sent no trial result for {request.artifact_id[:12]} within "
                                 f"{self.settings.timeout_s:g} s; raise the trial timeout for big models") from exc
            if reply.ok:
                break
            if reply.result.get("busy") and time.monotonic() + BUSY_RETRY_S < deadline:
                time.sleep(BUSY_RETRY_S)  # another search worker's trial: one at a time on a device
                continue
            if reply.error and "command must be one of" in reply.error:
                raise FleetError(f"{self.device_id}'s agent does not know on-device trials ({reply.error}); upgrade the agent")
            hint = ""
            if reply.error and "server cannot send" in reply.error:
                hint = (" (is a `builder serve` of another data dir on this broker? measure with its --data-dir, "
                        "so it knows the trial artifacts)")
            raise FleetError(f"trial of {request.artifact_id[:12]} on {self.device_id} failed: {reply.error}{hint}")
        result = dict(reply.result)
        latency = dict(result.get("latency") or {})
        measurement = TrialMeasurement(self.device_id, request.artifact_id, float(latency.get("p50", 0.0)),
                                       float(latency.get("p95", 0.0)), time.monotonic() - started, result)
        self._record(measurement)
        return measurement

    def _still_there(self, cause: Exception) -> None:
        assert self.link is not None
        try:
            self.link.command(self.device_id, proto.StatusArgs(), timeout_s=self.settings.status_timeout_s)
        except FleetError:
            raise DeviceUnavailableError(f"device '{self.device_id}' stopped answering during a trial (offline?); "
                                         "restart its agent and run the search again (finished trials are kept)") from cause

    def _record(self, measurement: TrialMeasurement) -> None:
        """Benchmark row in the fleet store: `builder fleet status` shows it, calibration learns from it."""
        from builder.fleet.transport.serve import benchmark_row
        from builder.fleet.transport.store import open_store

        with open_store(self.data_dir, self.store_url) as store:
            store.add_benchmark(benchmark_row(self.device_id, dict(measurement.result), time.time(), measurement.artifact_id))
