"""The running agent: wires connection, transfer, install, local endpoint, telemetry and commands.

Threads: the MQTT loop (callbacks only enqueue), a deployment worker (pull + install, one at a
time; a newer desired deployment cancels the one in progress), a command worker, the telemetry
loop, and the HTTP server. State that must survive restarts lives in the data dir: the A/B slots
and ``active.json`` (install.py), partial downloads, the telemetry outbox and ``state.json``
(deployments already tried, so a failed one is not retried in a loop).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent import protocol as proto
from agent.active import ActiveModel
from agent.bench import run_benchmark
from agent.config import AgentConfig, LoadSettings
from agent.connection import agent_connection
from agent.detect import detect_device
from agent.errors import AgentError, InstallError, ProtocolError, SignatureError, TransferError
from agent.install import Installer, benchmark_feeds
from agent.load import LoadController
from agent.manifest import load_public_key
from agent.mqtt import Delivery, Will
from agent.sensors import power_sensors_for, profile_power_estimate_w, read_power, read_temperature
from agent.serve import LocalEndpoint
from agent.telemetry import FieldStats, TelemetryOutbox, TelemetrySender
from agent.transfer import ChunkPuller, Progress, TransferCancelled, verify_desired
from agent.trial import TrialRunner

log = logging.getLogger(__name__)

RUNTIME_FILE = "agent.json"  # pid + local endpoint URL, for `agent status`
STATE_FILE = "state.json"


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.device_id = cfg.device_id
        self.data_dir = Path(cfg.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _check_trusted_key_file(cfg.trusted_key)
        self._public_key: Any = None  # loaded on first use: cryptography's OpenSSL costs ~9 MB of RSS
        self.profile = cfg.profile or detect_device().profile
        self.power_sensors = power_sensors_for(self.profile)
        self.stats = FieldStats()
        self.load = LoadController(cfg.load)
        self.active = ActiveModel(self.stats, self.load, rollback_after_errors=cfg.rollback_after_errors,
                                  latency_regression_factor=cfg.latency_regression_factor,
                                  latency_min_requests=cfg.latency_min_requests,
                                  on_unhealthy=lambda reason: self._events.put(("unhealthy", reason)))
        self.installer = Installer(self.data_dir, self._trusted_key, threads=cfg.threads,
                                   pause_before_switch_s=cfg.install_pause_s,
                                   on_stage=lambda stage: log.info("install stage: %s", stage))
        self.outbox = TelemetryOutbox(self.data_dir / "telemetry.db", cfg.telemetry_buffer_max_bytes,
                                      cfg.telemetry_buffer_max_age_s)
        self.telemetry_interval_s = cfg.telemetry_interval_s
        telemetry_topic = proto.device_topic(self.device_id, proto.Up.TELEMETRY)
        self._state = self._read_state()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._commands: queue.Queue[bytes] = queue.Queue()
        self._desired_lock = threading.Condition()
        self._pending_desired: proto.DesiredDeployment | None = None
        self._deploying: str | None = None
        self._stop = threading.Event()
        self._telemetry_wakeup = threading.Event()
        self._last_progress_pub = 0.0
        self._current_desired: proto.DesiredDeployment | None = None  # the one being downloaded
        self.endpoint: LocalEndpoint | None = None
        # The will is fixed at connect time, so it carries only who and "offline" (no stale model fields).
        will = proto.DeviceStatus(device_id=self.device_id, state="offline", agent_version=__version__)
        self.conn = agent_connection(self.device_id, cfg.broker, will=Will(self._topic(proto.Up.STATUS), will.to_json()),
                                     on_connected=self._on_connected)
        self.sender = TelemetrySender(self.outbox, lambda body: self.conn.publish(telemetry_topic, body, qos=1),
                                      lambda: self.conn.connected, window=cfg.telemetry_window,
                                      resend_after_s=cfg.telemetry_resend_s)
        self.puller = ChunkPuller(self.device_id, self.data_dir / "downloads", self._publish_bytes,
                                  lambda: self.conn.connected, lambda: self.conn.connect_count,
                                  window_chunks=cfg.window_chunks, timeout_s=cfg.chunk_timeout_s,
                                  on_progress=self._on_transfer_progress)
        # Benchmark-only trials of candidate models (the builder's search): own puller, own scratch folder.
        self.trials = TrialRunner(self.data_dir, self.device_id, self._trusted_key, self._publish_bytes,
                                  lambda: self.conn.connected, lambda: self.conn.connect_count, load=self.load,
                                  power_sensors=self.power_sensors, profile=self.profile, threads=cfg.threads,
                                  window_chunks=cfg.window_chunks, chunk_timeout_s=cfg.chunk_timeout_s,
                                  on_done=self._on_trial_done)
        self.conn.subscribe(self._topic(proto.Down.DESIRED), lambda t, p: self._on_desired(p))
        self.conn.subscribe(self._topic(proto.Down.CHUNKS), self._on_chunk_frame)
        self.conn.subscribe(self._topic(proto.Down.COMMAND), lambda t, p: self._commands.put(p))
        self.conn.subscribe(self._topic(proto.Down.ACK), self._on_ack)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Agent":
        import sys

        # The MQTT thread must get the GIL back quickly after each socket read while chunks are being
        # hashed and decompressed; the default 5 ms switch interval starves it (a GIL convoy).
        sys.setswitchinterval(0.0005)
        loaded, problems = self.installer.load_active()
        for problem in problems:
            log.warning("start-up: %s", problem)
        if loaded is not None:
            self.active.swap(loaded)
            log.info("serving %s (%s) from slot %s", loaded.label, loaded.manifest.artifact_id[:12], loaded.slot)
        self.endpoint = LocalEndpoint(self.active, self.cfg.http_port).start()
        self._write_runtime_file()
        for target, name in ((self._deploy_loop, "deploy"), (self._command_loop, "commands"),
                             (self._event_loop, "events"), (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.conn.start()
        if problems:
            self._emit_telemetry("error", details={"startup_problems": problems})
        return self

    def stop(self) -> None:
        self._stop.set()
        self.puller.cancel.set()
        with self._desired_lock:
            self._desired_lock.notify_all()
        self._telemetry_wakeup.set()
        self.trials.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        # Workers first: none of them may publish an "online" status after the final "offline" one.
        for thread in self._threads:
            thread.join(timeout=30)
        self.conn.stop(final=Will(self._topic(proto.Up.STATUS), self._status("offline").to_json()))
        self.load.close()
        self.outbox.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    # -- helpers --------------------------------------------------------------------------------
    def _trusted_key(self) -> Any:
        if self._public_key is None:
            self._public_key = load_public_key(self.cfg.trusted_key)
        return self._public_key

    def _topic(self, suffix: str) -> str:
        return proto.device_topic(self.device_id, suffix)

    def _publish_bytes(self, topic: str, payload: bytes) -> Delivery:
        return self.conn.publish(topic, payload, qos=1)

    def _publish(self, suffix: str, message: Any, retain: bool = False) -> None:
        if self.conn.connected:
            self.conn.publish(self._topic(suffix), message.to_json(), qos=1, retain=retain)

    def _status(self, state: str) -> proto.DeviceStatus:
        model = self.active.model if hasattr(self, "active") else None
        pointer = self.installer.store.read_pointer() if hasattr(self, "installer") else None
        previous = None
        if pointer is not None and pointer.previous is not None:
            previous = _artifact_id_of(self.installer.store.slot_dir(pointer.previous))
        return proto.DeviceStatus(device_id=self.device_id, state=state,
                                  active_artifact_id=model.manifest.artifact_id if model else None,
                                  active_model=model.label if model else None, previous_artifact_id=previous,
                                  profile=self.profile, agent_version=__version__,
                                  load=self.load.as_dict() if hasattr(self, "load") else {}, ts=proto.now_s())

    def publish_status(self) -> None:
        self._publish(proto.Up.STATUS, self._status("online"), retain=True)

    def _write_runtime_file(self) -> None:
        info = {"pid": os.getpid(), "device_id": self.device_id,
                "http_url": self.endpoint.url if self.endpoint else None, "started": proto.now_s()}
        tmp = self.data_dir / (RUNTIME_FILE + ".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.data_dir / RUNTIME_FILE)

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.data_dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {"failed_deployments": [], "active_deployment": None}
        return state

    def _save_state(self) -> None:
        self._state["failed_deployments"] = self._state.get("failed_deployments", [])[-100:]
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self._state), encoding="utf-8")
        os.replace(tmp, self.data_dir / STATE_FILE)

    def _progress(self, desired: proto.DesiredDeployment, state: str, done: int = 0, total: int = 0,
                  error: str | None = None) -> None:
        percent = round(100.0 * done / total, 2) if total else (100.0 if state == "active" else 0.0)
        self._publish(proto.Up.PROGRESS, proto.TransferProgress(
            deployment_id=desired.deployment_id, artifact_id=desired.artifact_id, state=state, bytes_done=done,
            bytes_total=total, percent=percent, error=error, ts=proto.now_s()))

    # -- MQTT callbacks (network thread: enqueue only) -------------------------------------------
    def _on_connected(self) -> None:
        self.sender.on_connect()
        self._events.put(("connected", None))

    def _on_ack(self, topic: str, payload: bytes) -> None:
        # A malformed ack raises ProtocolError: the client's dispatch counts and logs it.
        if self.sender.on_ack(payload):
            self._telemetry_wakeup.set()  # room in the window: send the next reports

    def _on_chunk_frame(self, topic: str, payload: bytes) -> None:
        # Each puller queues frames only while it pulls and skips frames of other artifacts.
        self.puller.on_frame(topic, payload)
        self.trials.on_frame(topic, payload)

    def _on_desired(self, payload: bytes) -> None:
        if not payload:
            # Cleared (a cancelled push with nothing to restore): keep running what we have and
            # stop pulling what is no longer wanted.
            with self._desired_lock:
                self._pending_desired = None
                if self._deploying is not None:
                    self.puller.cancel.set()
            return
        desired = proto.DesiredDeployment.from_json(payload)  # ProtocolError: counted and logged by the client
        with self._desired_lock:
            if self._deploying == desired.deployment_id:
                return  # re-read on reconnect while it is being pulled: carry on
            if self._deploying is not None:
                self.puller.cancel.set()
            self._pending_desired = desired
            self._desired_lock.notify_all()

    # -- workers --------------------------------------------------------------------------------
    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kind, value = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if kind == "connected":
                    self._publish(proto.Up.HELLO, self._hello())
                    self.publish_status()
                    self._telemetry_wakeup.set()  # flush the outbox now
                elif kind == "unhealthy":
                    self._auto_rollback(str(value))
            except Exception:  # noqa: BLE001 - keep the agent alive; the log has the trace
                log.exception("event %s failed", kind)

    def _hello(self) -> proto.Hello:
        import importlib.util
        import sys

        runtimes = [name for name, module in (("onnxruntime", "onnxruntime"), ("litert", "ai_edge_litert"),
                                               ("litert", "tflite_runtime")) if importlib.util.find_spec(module)]
        providers: tuple[str, ...] = ()
        if "onnxruntime" in sys.modules:  # not imported just for this: an idle agent stays small
            providers = tuple(sys.modules["onnxruntime"].get_available_providers())
        model = self.active.model
        return proto.Hello(device_id=self.device_id, agent_version=__version__, profile=self.profile,
                           machine=platform.machine(), runtimes=tuple(dict.fromkeys(runtimes)), execution_providers=providers,
                           active_artifact_id=model.manifest.artifact_id if model else None,
                           free_disk_bytes=shutil.disk_usage(self.data_dir).free, ts=proto.now_s(),
                           incarnation=self.outbox.incarnation)

    def _deploy_loop(self) -> None:
        while not self._stop.is_set():
            with self._desired_lock:
                while self._pending_desired is None and not self._stop.is_set():
                    self._desired_lock.wait(0.5)
                if self._stop.is_set():
                    return
                desired, self._pending_desired = self._pending_desired, None
                if desired is None:  # woken by stop
                    continue
                self._deploying = desired.deployment_id
                self.puller.cancel.clear()
            try:
                self._deploy(desired)
            except Exception as exc:  # noqa: BLE001
                log.exception("deployment %s crashed", desired.deployment_id)
                self._progress(desired, "failed", error=f"agent error: {exc}")
            finally:
                with self._desired_lock:
                    self._deploying = None

    def _deploy(self, desired: proto.DesiredDeployment) -> None:
        model = self.active.model
        if model is not None and model.manifest.artifact_id == desired.artifact_id:
            self._progress(desired, "active")
            return
        if desired.deployment_id in self._state.get("failed_deployments", []):
            log.info("deployment %s already failed here; not retrying (publish a new deployment to retry)",
                     desired.deployment_id)
            return
        self._progress(desired, "verifying")
        try:
            manifest = verify_desired(desired, self._trusted_key())
        except (SignatureError, ProtocolError) as exc:
            self._fail(desired, "rejected", str(exc))
            return
        total = manifest.total_size_bytes
        self._current_desired = desired
        _remove_stale(self.data_dir, keep=manifest.artifact_id)  # partial pulls of replaced deployments
        self._progress(desired, "downloading", 0, total)
        incoming = self.data_dir / "incoming" / manifest.artifact_id
        attempts = 0
        while True:
            try:
                directory = self.puller.pull_artifact(desired, manifest, incoming)
                break
            except TransferCancelled:
                log.info("deployment %s cancelled (withdrawn or replaced)", desired.deployment_id)
                with self._desired_lock:
                    next_artifact = self._pending_desired.artifact_id if self._pending_desired else None
                if not self._stop.is_set() and next_artifact != manifest.artifact_id:
                    _remove_partial(self.data_dir, manifest.artifact_id)  # a stop keeps it to resume from
                return
            except SignatureError as exc:
                _remove_partial(self.data_dir, manifest.artifact_id)
                self._fail(desired, "failed", str(exc))
                return
            except TransferError as exc:
                attempts += 1
                if attempts >= 3 or self._stop.is_set():
                    if not self._stop.is_set():  # given up: no stale .part on a small disk
                        _remove_partial(self.data_dir, manifest.artifact_id)
                    self._fail(desired, "failed", str(exc))
                    return
                log.warning("transfer attempt %d failed: %s; retrying", attempts, exc)
                self._stop.wait(2.0)
        self._progress(desired, "installing", total, total)
        try:
            loaded = self.installer.install(directory)
        except InstallError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            self._fail(desired, "failed", f"health check failed, previous model kept: {exc}")
            return
        self.active.swap(loaded)
        self._state["active_deployment"] = desired.deployment_id
        self._save_state()
        log.info("now serving %s (%s)", loaded.label, loaded.manifest.artifact_id[:12])
        self._progress(desired, "active", total, total)
        self.publish_status()
        self._emit_telemetry("install", details={"deployment_id": desired.deployment_id,
                                                 "baseline_p50_ms": loaded.health.baseline_p50_ms,
                                                 "transfer": dict(self.puller.stats)})

    def _fail(self, desired: proto.DesiredDeployment, state: str, reason: str) -> None:
        log.warning("deployment %s %s: %s", desired.deployment_id, state, reason)
        self._state.setdefault("failed_deployments", []).append(desired.deployment_id)
        self._save_state()
        self._progress(desired, state, error=reason)
        self._emit_telemetry("error", details={"deployment_id": desired.deployment_id, "state": state, "reason": reason})

    def _on_transfer_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        desired = self._current_desired
        if desired is None or (now - self._last_progress_pub < 0.5 and progress.bytes_done < progress.bytes_total):
            return
        self._last_progress_pub = now
        self._progress(desired, "downloading", progress.bytes_done, progress.bytes_total)

    def _auto_rollback(self, reason: str) -> dict[str, Any]:
        failed_deployment = self._state.get("active_deployment")
        try:
            loaded = self.installer.rollback()
        except InstallError as exc:
            log.error("active model unhealthy (%s) and rollback impossible: %s", reason, exc)
            self._emit_telemetry("error", details={"unhealthy": reason, "rollback": str(exc)})
            raise
        bad = self.active.swap(loaded)
        if failed_deployment:
            self._state.setdefault("failed_deployments", []).append(failed_deployment)
        self._state["active_deployment"] = None
        self._save_state()
        if bad is not None and failed_deployment:
            self._publish(proto.Up.PROGRESS, proto.TransferProgress(
                deployment_id=failed_deployment, artifact_id=bad.manifest.artifact_id, state="rolled_back",
                error=reason, ts=proto.now_s()))
        self.publish_status()
        self._emit_telemetry("rollback", details={"reason": reason, "from": bad.manifest.artifact_id if bad else None,
                                                  "to": loaded.manifest.artifact_id})
        return {"active_artifact_id": loaded.manifest.artifact_id, "reason": reason}

    # -- commands -------------------------------------------------------------------------------
    def _command_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._handle_command(raw)
            except Exception as exc:  # noqa: BLE001 - the command thread must outlive any message
                self.conn.count_error(self._topic(proto.Down.COMMAND), exc)

    def _handle_command(self, raw: bytes) -> None:
        """Decode (bounded: size and depth before parsing), run and answer one command."""
        try:
            command = proto.Command.from_json(raw)
        except ProtocolError as exc:
            self.conn.count_error(self._topic(proto.Down.COMMAND), exc)
            request_id = proto.request_id_of(raw, proto.Command.KIND, proto.Command.MAX_BYTES)
            if request_id is not None:
                self._publish(proto.Up.REPLY, proto.CommandReply(request_id=request_id, command="unknown", ok=False,
                                                                 error=str(exc), ts=proto.now_s()))
            return
        try:
            args = command.parsed_args()
            if isinstance(args, proto.TrialRequest):  # runs in its own thread and replies when done
                self.trials.start(command.request_id, args, lambda reply: self._publish(proto.Up.REPLY, reply))
                return
            result = self.execute(args)
            reply = proto.CommandReply(request_id=command.request_id, command=command.command, ok=True,
                                       result=result, ts=proto.now_s())
        except (AgentError, ValueError, TypeError) as exc:
            reply = proto.CommandReply(request_id=command.request_id, command=command.command, ok=False,
                                       error=str(exc), ts=proto.now_s())
        self._publish(proto.Up.REPLY, reply)

    def execute(self, args: proto.CommandArgs) -> dict[str, Any]:
        if isinstance(args, proto.StatusArgs):
            status = self._status("online").to_dict()
            window = self.sender.stats()
            status.update({"telemetry_interval_s": self.telemetry_interval_s, "outbox_reports": len(self.outbox),
                           "telemetry": {"incarnation": self.outbox.incarnation, "in_flight": window.in_flight,
                                         "sent": window.sent, "resent": window.resent, "acked": window.acked,
                                         "host_acks": self.sender.host_acks, "dropped": self.outbox.dropped},
                           "deploying": self._deploying, "trial": self.trials.running,
                           "http_url": self.endpoint.url if self.endpoint else None})
            return status
        if isinstance(args, proto.BenchmarkArgs):
            return self.benchmark(runs=args.runs, warmup=args.warmup)
        if isinstance(args, proto.RollbackArgs):
            return self._auto_rollback(args.reason)
        if isinstance(args, proto.SetTelemetryIntervalArgs):
            seconds = float(args.seconds)
            self.telemetry_interval_s = seconds
            self._telemetry_wakeup.set()
            return {"telemetry_interval_s": seconds}
        if isinstance(args, proto.SetLoadArgs):
            current = self.load.settings
            settings = LoadSettings(
                slowdown_factor=float(current.slowdown_factor if args.slowdown_factor is None else args.slowdown_factor),
                cpu_burn_threads=int(current.cpu_burn_threads if args.cpu_burn_threads is None else args.cpu_burn_threads),
                cpu_burn_duty=float(current.cpu_burn_duty if args.cpu_burn_duty is None else args.cpu_burn_duty))
            self.load.apply(settings)
            self.publish_status()
            return {"load": self.load.as_dict()}
        raise ValueError(f"unknown command {args.COMMAND!r}")

    def benchmark(self, runs: int = 50, warmup: int = 5) -> dict[str, Any]:
        model = self.active.model
        if model is None:
            raise AgentError("no model active to benchmark")
        feeds = benchmark_feeds(model)
        result = run_benchmark(lambda f: self.active.infer(f, record=False), feeds, runs=runs, warmup=warmup,
                               backend=model.runtime.backend, artifact_id=model.manifest.artifact_id,
                               power_sensors=self.power_sensors, profile=self.profile)
        data = result.to_dict()
        data["load"] = self.load.as_dict()
        self._emit_telemetry("benchmark", benchmark=data)
        return data

    def _on_trial_done(self, artifact_id: str, result: dict[str, Any] | None, error: str | None) -> None:
        if result is not None:
            self._emit_telemetry("trial", benchmark=result, details={"trial_artifact_id": artifact_id})
        else:
            self._emit_telemetry("error", details={"trial_artifact_id": artifact_id, "reason": error})

    # -- telemetry ------------------------------------------------------------------------------
    def _emit_telemetry(self, event: str, benchmark: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> None:
        report = self.build_report(event, benchmark=benchmark, details=details)
        self.outbox.put(report)
        self._telemetry_wakeup.set()

    def build_report(self, event: str, benchmark: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> proto.TelemetryReport:
        import psutil

        window_s, requests, errors, latency = (0.0, 0, 0, None)
        if event == "periodic":
            window_s, requests, errors, latency = self.stats.take_window()
        proc = psutil.Process()
        temp = read_temperature()
        power = read_power(self.power_sensors)
        details = dict(details or {})
        if not power.available:
            estimate = profile_power_estimate_w(self.profile, busy=requests > 0)
            if estimate is not None:
                details["estimated_power_w"] = estimate
                details["power_estimate_basis"] = f"profile {self.profile} {'typical' if requests else 'idle'}_w (ESTIMATE, not measured)"
        details["load"] = self.load.as_dict()
        model = self.active.model
        return proto.TelemetryReport(
            device_id=self.device_id, seq=self.outbox.next_seq(), ts=proto.now_s(), event=event,
            artifact_id=model.manifest.artifact_id if model else None, model=model.label if model else None,
            window_s=round(window_s, 3), requests=requests, errors=errors,
            latency_ms=latency.as_dict() if latency is not None and latency.count else {},
            cpu_percent=proc.cpu_percent(None), memory_rss_bytes=proc.memory_info().rss,
            memory_available_bytes=psutil.virtual_memory().available, temperature_c=temp.celsius,
            power_w=power.watts if power.available else None, power_source=power.source,
            benchmark=benchmark, details=details, incarnation=self.outbox.incarnation)

    def _telemetry_loop(self) -> None:
        interval = self.telemetry_interval_s
        next_periodic = time.monotonic() + interval
        while not self._stop.is_set():
            if self.telemetry_interval_s != interval:  # set_telemetry_interval: applies now, not after the old period
                interval = self.telemetry_interval_s
                next_periodic = min(next_periodic, time.monotonic() + interval)
            timeout = max(0.0, next_periodic - time.monotonic())
            resend_in = self.sender.next_due_in_s()  # unacknowledged reports time out: wake to resend them
            if resend_in is not None:
                timeout = min(timeout, resend_in + 0.05)
            if not self.sender.host_acks:
                timeout = min(timeout, 1.0)  # the legacy (PUBACK) grace period ends without an event
            self._telemetry_wakeup.wait(timeout)
            self._telemetry_wakeup.clear()
            if self._stop.is_set():
                return
            if time.monotonic() >= next_periodic:
                try:
                    self.outbox.put(self.build_report("periodic"))
                except Exception:  # noqa: BLE001
                    log.exception("building telemetry failed")
                next_periodic = time.monotonic() + interval
            try:
                self.sender.pump()
            except Exception:  # noqa: BLE001
                log.exception("sending telemetry failed")


def _check_trusted_key_file(path: Path) -> None:
    """Fail at start-up, not at the first deployment, when the trusted key is missing."""
    try:
        head = Path(path).read_bytes()[:64]
    except OSError as exc:
        raise SignatureError(f"cannot read trusted public key {path}: {exc.strerror}; copy the builder's "
                             "signing_key.pub.pem there") from exc
    if b"-----BEGIN PUBLIC KEY-----" not in head:
        raise SignatureError(f"{path} is not a PEM public key; use the signing_key.pub.pem `builder keys init` wrote")


def _remove_stale(data_dir: Path, keep: str) -> None:
    """Delete partial downloads and incoming dirs of other artifacts (a device's disk is small)."""
    for parent in (data_dir / "downloads", data_dir / "incoming"):
        if parent.is_dir():
            for child in parent.iterdir():
                if child.name != keep:
                    shutil.rmtree(child, ignore_errors=True)


def _remove_partial(data_dir: Path, artifact_id: str) -> None:
    """Drop a pull that will not be resumed (its .part, .meta.json and incoming dir)."""
    for parent in (data_dir / "downloads", data_dir / "incoming"):
        shutil.rmtree(parent / artifact_id, ignore_errors=True)


def _artifact_id_of(directory: Path) -> str | None:
    try:
        artifact_id = json.loads((directory / "manifest.json").read_text(encoding="utf-8")).get("artifact_id")
        return str(artifact_id) if artifact_id is not None else None
    except (OSError, json.JSONDecodeError):
        return None
