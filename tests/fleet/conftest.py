"""Fleet end-to-end fixtures: digits-CNN artifacts in a real registry, `builder` and `agent`
subprocesses, a Mosquitto started from the config `builder fleet add-device` writes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.support.broker import free_port
from tests.support.processes import AGENT_CMD, wait_for
from tests.support.processes import CHILD_ENV as ONE_THREAD_ENV

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CHILD_ENV = {**ONE_THREAD_ENV, "COLUMNS": "250"}


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """ONNX exports of the digits CNN by width (untrained, seed 0: only speed and outputs matter here)."""
    import torch

    from builder.zoo.digits_cnn import DigitsCNN

    root = tmp_path_factory.mktemp("digits-onnx")
    cache: dict[int, Path] = {}

    def export(width: int) -> Path:
        if width not in cache:
            torch.manual_seed(0)
            model = DigitsCNN(width=width).eval()
            path = root / f"digits-w{width}.onnx"
            with torch.no_grad():
                torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"], output_names=["logits"],
                                  dynamo=False, opset_version=17)
            cache[width] = path
        return cache[width]

    return export


class FleetHome:
    """One data dir (registry + fleet store + signing keys) with helpers to register artifacts."""

    def __init__(self, root: Path, digits_onnx: Callable[[int], Path]) -> None:
        from builder.artifacts.registry import Registry
        from builder.artifacts.signing import init_keys, load_private_key

        self.root = root
        self.keys = init_keys(root / "keys")
        self.private_key = load_private_key(self.keys.private)
        self.registry = Registry(root)
        self._digits_onnx = digits_onnx

    def artifact(self, profile: str, *, version: str = "1", width: int = 8, broken: bool = False) -> str:
        """A signed digits-CNN artifact for ``profile`` (ONNX Runtime CPU), registered. ``broken`` ships
        wrong expected outputs, so the device's health check fails."""
        import onnxruntime as ort

        from agent.manifest import Target, TensorSpec
        from builder.artifacts.packaging import package_artifact

        onnx_path = self._digits_onnx(width)
        work = Path(tempfile.mkdtemp(prefix="art-", dir=self.root))
        x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        y = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        if broken:
            y = y + 5.0
        np.savez(work / "sample.npz", **{"in:x": x, "out:logits": y.astype(np.float32)})
        package_artifact(work / "artifact", {"model.onnx": (onnx_path, "model"), "sample.npz": (work / "sample.npz", "sample")},
                         model_name="digits-cnn", model_version=version,
                         target=Target(profile=profile, runtime="onnxruntime", execution_providers=("CPUExecutionProvider",),
                                       precision="fp32", format="onnx", runtime_options={"intra_op_num_threads": 1}),
                         inputs=[TensorSpec("x", (1, 1, 8, 8), "float32")],
                         outputs=[TensorSpec("logits", (1, 10), "float32")], private_key=self.private_key,
                         verify_tolerance={"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.999})
        record, _ = self.registry.add_artifact(work / "artifact")
        shutil.rmtree(work, ignore_errors=True)
        return record.artifact_id


@pytest.fixture
def fleet_home(tmp_path: Path, digits_onnx: Callable[[int], Path]) -> FleetHome:
    return FleetHome(tmp_path / "home", digits_onnx)


def builder_cli(*args: str, home: Path, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "builder.cli.main", *args]
    if "--data-dir" not in args:
        cmd += ["--data-dir", str(home)]
    result = subprocess.run(cmd, cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args[:2])} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class Processes:
    """Child processes of one test, stopped (SIGTERM, then SIGKILL) at the end, logs kept for failures."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=REPO, env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self, name: str) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def processes(tmp_path: Path):
    procs = Processes(tmp_path / "logs")
    yield procs
    procs.stop_all()


def start_agent(processes: Processes, name: str, agent_toml: Path, data_dir: Path) -> subprocess.Popen:
    """`agent run` for a device whose agent.toml `builder fleet add-device` wrote (plus test settings)."""
    text = agent_toml.read_text(encoding="utf-8")
    if "http_port" not in text:
        text += "http_port = 0\nthreads = 1\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\nchunk_timeout_s = 5.0\n"
        agent_toml.write_text(text, encoding="utf-8")
    (data_dir / "agent.json").unlink(missing_ok=True)
    return processes.start(name, AGENT_CMD + ["run", "--config", str(agent_toml), "--log-level", "INFO"])


def agent_http_url(data_dir: Path, timeout_s: float = 30) -> str:
    def read() -> str | None:
        try:
            return json.loads((data_dir / "agent.json").read_text()).get("http_url")
        except (OSError, ValueError):
            return None
    return wait_for(read, timeout_s, f"agent in {data_dir} to start its endpoint")


def infer(http_url: str, count: int = 1) -> dict:
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32).tolist()
    body = json.dumps({"inputs": {"x": x}}).encode()
    answer: dict = {}
    for _ in range(count):
        req = urllib.request.Request(http_url + "/infer", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
    return answer


def fleet_status(home: Path) -> dict[str, dict]:
    result = builder_cli("fleet", "status", "--json", home=home)
    return {row["device_id"]: row for row in json.loads(result.stdout)}


def store_status(home: Path) -> dict[str, dict]:
    """What `builder fleet status --json` prints, read in-process (cheap enough to poll)."""
    from builder.fleet.rollout.status import collect_status
    from builder.fleet.transport.store import open_store

    with open_store(home) as store:
        return {r.device_id: r.to_dict() for r in collect_status(store, time.time())}


class Mosquitto:
    """mosquitto -c <the config add-device wrote>, on its own ports."""

    def __init__(self, config_file: Path, ports: list[int]) -> None:
        self.config_file = config_file
        self.ports = ports
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([mosquitto, "-c", str(self.config_file)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode(errors='replace')}")
            for port in self.ports:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                except OSError:
                    return False
            return True

        wait_for(listening, 10, "mosquitto to listen", 0.05)
        return self

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


@pytest.fixture
def world_readable_dir():
    """Mosquitto drops to its own user: its config, passwd, ACL and certs must be readable by it
    (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="edgefleet-fleet-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def slow_serve_with_one_agent(processes: Processes, home: Path, device: str, profile: str,
                              data_dir: Path) -> tuple[Path, subprocess.Popen]:
    """`builder serve` (embedded broker, 0.1 s per chunk: downloads long enough to interrupt) and one
    agent registered by `builder fleet add-device`, online. Returns its agent.toml and process."""
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--port", str(free_port()), "--data-dir", str(home),
                              "--chunk-delay", "100ms", "--no-loop"])
    wait_for(lambda: (home / "serve.json").is_file(), 30, "builder serve to start: " + processes.log("serve"))
    builder_cli("fleet", "add-device", device, "--profile", profile, "--agent-data-dir", str(data_dir), home=home)
    toml = home / "devices" / device / "agent.toml"
    agent = start_agent(processes, "agent", toml, data_dir)
    wait_for(lambda: store_status(home).get(device, {}).get("online"), 60, "agent online: " + processes.log("agent"))
    return toml, agent
