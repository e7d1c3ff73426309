"""Benchmark-only trials: measure a signed artifact on this device without installing it.

The builder's search sends candidates here (``trial`` command, ``protocol.TrialRequest``). A trial
reuses the install path's checks, in the same order: the manifest's signature against the trusted
key before any byte is requested, free disk, each chunk's sha256, each payload's size and sha256
(``transfer.ChunkPuller``), then the health check on the shipped sample. It differs in where
things go: payloads land in ``<data dir>/trials/<id>/`` (never the A/B slots, never
``active.json`` or the retained desired state), the model gets its own runtime session, and the
folder is deleted afterwards, whatever happened. The active model keeps serving meanwhile.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from agent import protocol as proto
from agent.bench import run_benchmark
from agent.errors import AgentError, InstallError, SignatureError
from agent.install import LoadedModel, benchmark_feeds, health_check
from agent.load import LoadController
from agent.runtime import open_runtime
from agent.sensors import PowerSensor
from agent.transfer import ChunkPuller, TransferCancelled, verify_desired

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
RSS_SAMPLE_INTERVAL_S = 0.02

Reply = Callable[[proto.CommandReply], None]


class _RssPeak(threading.Thread):
    """Samples this process's RSS while a trial loads and runs its model: the peak it added is what
    the model would cost next to the agent (``ru_maxrss`` is a lifetime peak, useless for a delta)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="trial-rss")
        import psutil

        self._process = psutil.Process()
        self.before_bytes = self._process.memory_info().rss
        self.peak_bytes = self.before_bytes
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(RSS_SAMPLE_INTERVAL_S):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def stop(self) -> int:
        """Stop sampling; returns the RSS now (the model still loaded)."""
        self._stop_event.set()
        self.join(timeout=1)
        now = int(self._process.memory_info().rss)
        self.peak_bytes = max(self.peak_bytes, now)
        return now


def benchmark_artifact(manifest: Any, directory: Path, *, runs: int, warmup: int, threads: int,
                       load: LoadController, power_sensors: Sequence[PowerSensor], profile: str | None) -> dict[str, Any]:
    """Open the verified artifact in ``directory`` in a session of its own, health-check it on its
    sample, benchmark it; the session is closed before returning. InstallError on a failed load or
    health check."""
    rss = _RssPeak()
    rss.start()
    runtime = None
    try:
        started = time.perf_counter()
        try:
            runtime = open_runtime(manifest, directory / manifest.model_payload.name, directory / ".cache", threads)
        except AgentError as exc:
            raise InstallError(f"cannot load the trial model: {exc}") from exc
        session_load_ms = (time.perf_counter() - started) * 1000.0
        health = health_check(runtime, manifest, directory)
        model = LoadedModel(manifest, runtime, "trial", directory, health)

        def run(feeds: Any) -> None:
            t0 = time.perf_counter()
            runtime.run(feeds)
            load.after_inference(time.perf_counter() - t0, model_key=id(runtime))  # the same artificial load the active model gets

        try:
            result = run_benchmark(run, benchmark_feeds(model), runs=runs, warmup=warmup, backend=runtime.backend,
                                   artifact_id=manifest.artifact_id, power_sensors=power_sensors, profile=profile)
        except AgentError as exc:
            raise InstallError(f"the trial model fails while benchmarking: {exc}") from exc
        rss_loaded = rss.stop()
    finally:
        rss.stop()
        if runtime is not None:
            runtime.close()
    data = result.to_dict()
    data.update(session_load_ms=round(session_load_ms, 3), rss_before_bytes=rss.before_bytes,
                rss_delta_bytes=rss_loaded - rss.before_bytes, peak_rss_delta_bytes=rss.peak_bytes - rss.before_bytes,
                health_max_abs_error=health.max_abs_error, health_min_cosine=health.min_cosine,
                load=load.as_dict())
    return data


class TrialRunner:
    """Runs at most one trial at a time, each in its own thread; replies through ``reply``.

    ``on_frame`` must receive every ``down/chunks`` frame (the daemon fans them out to the install
    puller and this one; each ignores frames of other transfers).
    """

    def __init__(self, data_dir: Path, device_id: str, public_key: Callable[[], Any],
                 publish: Callable[[str, bytes], Any], is_connected: Callable[[], bool],
                 connect_count: Callable[[], int], *, load: LoadController, power_sensors: Sequence[PowerSensor],
                 profile: str | None, threads: int = 0, window_chunks: int = proto.DEFAULT_WINDOW_CHUNKS,
                 chunk_timeout_s: float = 10.0, on_done: Callable[[str, dict[str, Any] | None, str | None], None] | None = None) -> None:
        self.root = Path(data_dir) / TRIALS_DIR
        shutil.rmtree(self.root, ignore_errors=True)  # left by a crash mid-trial: never reused
        self.device_id = device_id
        self._public_key = public_key
        self._publish = publish
        self._is_connected = is_connected
        self._connect_count = connect_count
        self.load = load
        self.power_sensors = power_sensors
        self.profile = profile
        self.threads = threads
        self.window_chunks = window_chunks
        self.chunk_timeout_s = chunk_timeout_s
        self.on_done = on_done  # (artifact_id, result or None, error or None): the daemon's telemetry
        self._lock = threading.Lock()
        self._running: str | None = None  # artifact id of the trial in progress
        self._puller: ChunkPuller | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def running(self) -> str | None:
        return self._running

    def on_frame(self, topic: str, payload: bytes) -> None:
        puller = self._puller
        if puller is not None:
            puller.on_frame(topic, payload)

    def start(self, request_id: str, request: proto.TrialRequest, reply: Reply) -> None:
        """Run in a thread; a busy or stopping device is answered at once."""
        def answer(ok: bool, result: dict[str, Any] | None = None, error: str | None = None) -> None:
            reply(proto.CommandReply(request_id=request_id, command="trial", ok=ok, result=result or {},
                                     error=error, ts=proto.now_s()))

        with self._lock:
            if self._stopping.is_set():
                answer(False, error="the agent is stopping; send the trial again when it is back")
                return
            if self._running is not None:
                answer(False, {"busy": True, "running_artifact_id": self._running},
                       f"busy: a trial of {self._running[:12]} is running on {self.device_id}; one at a time, "
                       "send it again when that one has answered")
                return
            self._running = request.artifact_id
            self._thread = threading.Thread(target=self._run, args=(request, answer), daemon=True, name="trial")
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abandon a transfer in progress and wait for the trial thread (it cleans up and replies)."""
        self._stopping.set()
        puller = self._puller
        if puller is not None:
            puller.cancel.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self, request: proto.TrialRequest, answer: Callable[..., None]) -> None:
        trial_id = uuid.uuid4().hex[:16]
        scratch = self.root / trial_id
        started = time.monotonic()
        puller = ChunkPuller(self.device_id, scratch / "downloads", self._publish, self._is_connected,
                             self._connect_count, window_chunks=self.window_chunks, timeout_s=self.chunk_timeout_s)
        timer = threading.Timer(request.timeout_s, puller.cancel.set)  # the host has stopped waiting by then
        timer.daemon = True
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            desired = request.as_desired(f"trial-{trial_id}")
            manifest = verify_desired(desired, self._public_key())
            self._puller = puller
            timer.start()
            log.info("trial %s: pulling %s (%d bytes)", trial_id, manifest.artifact_id[:12], manifest.total_size_bytes)
            directory = puller.pull_artifact(desired, manifest, scratch / "artifact")
            self._puller = None
            timer.cancel()
            result = benchmark_artifact(manifest, directory, runs=request.runs, warmup=request.warmup,
                                        threads=self.threads, load=self.load, power_sensors=self.power_sensors,
                                        profile=self.profile)
            result.update(trial=True, transfer_s=round(puller.stats.get("pull_s", 0.0), 4),
                          download_bytes=int(puller.stats.get("compressed_bytes", 0)),
                          trial_s=round(time.monotonic() - started, 3))
            log.info("trial %s: %s p50 %.3f ms", trial_id, manifest.artifact_id[:12], result["latency"]["p50"])
        except TransferCancelled:
            error = (f"trial abandoned: the transfer did not finish within {request.timeout_s:g} s"
                     if not self._stopping.is_set() else "trial abandoned: the agent is stopping")
        except SignatureError as exc:
            error = f"refused: {exc}"
        except AgentError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a trial must never take the agent down; the log has the trace
            log.exception("trial %s crashed", trial_id)
            error = f"agent error: {exc}"
        finally:
            timer.cancel()
            self._puller = None
            shutil.rmtree(scratch, ignore_errors=True)
            with self._lock:  # free before replying: the host may send the next trial right away
                self._running = None
        if error is not None:
            log.warning("trial %s of %s failed: %s", trial_id, request.artifact_id[:12], error)
        answer(error is None, result, error)
        if self.on_done is not None:
            self.on_done(request.artifact_id, result, error)
