"""The agent killed (SIGKILL, a real subprocess) mid-install or mid-download restarts serving a
working model; A/B slot recovery when the active slot is damaged."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.agent.conftest import DEVICES, WAIT_S, agent_toml, make_artifact

pytestmark = pytest.mark.mosquitto


def _start_agent(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", "from agent.cli import app; app()", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env, cwd=Path(__file__).parents[2])


def _http(data_dir: Path, path: str, body: dict | None = None, timeout_s: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            url = json.loads((data_dir / "agent.json").read_text())["http_url"]
            data = json.dumps(body).encode() if body is not None else None
            with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError, KeyError) as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"agent endpoint {path} not answering: {last}")


def _wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.05)
    return value


def _health_ok_count(log: Path) -> int:
    return log.read_text(errors="replace").count("install stage: health_ok") if log.exists() else 0


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)


@pytest.mark.slow  # ~15-20 s: three agent subprocess starts
def test_agent_killed_during_install_restarts_with_working_model(tmp_path, broker, signing_key, host_factory):
    key, pub = signing_key
    v1 = make_artifact(tmp_path / "v1", key, seed=1, version="1")
    v2 = make_artifact(tmp_path / "v2", key, seed=2, version="2")
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    config = agent_toml(tmp_path / "agent.toml", broker.url, "dev1", DEVICES["dev1"], pub, data)
    host = host_factory(broker.url)
    proc = _start_agent(config, log)
    try:
        d1 = host.deploy("dev1", v1)
        host.wait_progress("dev1", d1.artifact_id, ("active",), WAIT_S)
        # install_pause_s: the agent pauses after v2's health check, before the pointer switch; it is
        # killed there as soon as it logs that stage (the pause is only a deadline, not a wait).
        _kill(proc)
        agent_toml(config, broker.url, "dev1", DEVICES["dev1"], pub, data, install_pause_s=WAIT_S)
        proc = _start_agent(config, log)
        assert _http(data, "/health")["artifact_id"] == d1.artifact_id
        stages_before = _health_ok_count(log)
        d2 = host.deploy("dev1", v2)
        host.wait_progress("dev1", d2.artifact_id, ("installing",), WAIT_S)
        _wait_until(lambda: _health_ok_count(log) > stages_before, WAIT_S, "v2 passes its health check")
        _kill(proc)  # inside install: v2 written to the inactive slot and checked, pointer not switched
        from builder.fleet.transport.chunk_server import clear_desired

        clear_desired(host.client, "dev1")  # so the restart shows what it serves before any new pull
        proc = _start_agent(config, log)
        health = _http(data, "/health")
        assert health["ok"] and health["artifact_id"] == d1.artifact_id
        with np.load(v1 / "sample.npz") as sample:
            answer = _http(data, "/infer", {"inputs": {"x": sample["in:x"].tolist()}})
            np.testing.assert_allclose(np.asarray(answer["outputs"]["y"], np.float32), sample["out:y"], rtol=1e-5, atol=1e-5)
        # Deploying v2 again completes normally on the restarted agent.
        _kill(proc)
        agent_toml(config, broker.url, "dev1", DEVICES["dev1"], pub, data)
        proc = _start_agent(config, log)
        host.deploy("dev1", v2, deployment_id="v2-retry")
        host.wait(lambda: [p for p in host.progress("dev1") if p.deployment_id == "v2-retry" and p.state == "active"],
                  WAIT_S, "v2 active after restart")
        assert _http(data, "/health")["artifact_id"] == d2.artifact_id
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def test_agent_killed_mid_download_resumes_from_partial_file(tmp_path, broker, signing_key, host_factory):
    key, pub = signing_key
    big = make_artifact(tmp_path / "big", key, seed=3, cols=32768)  # ~65 chunks of 16 KiB
    data = tmp_path / "data"
    config = agent_toml(tmp_path / "agent.toml", broker.url, "dev1", DEVICES["dev1"], pub, data, window_chunks=8)
    host = host_factory(broker.url, chunk_bytes=16 * 1024)
    # The kill must land mid-way whatever the machine's load: until then the host serves only windows
    # starting before chunk STALL_AT, so the agent stalls there (windows are contiguous).
    STALL_AT = 24
    killed = threading.Event()
    serve = host.server.on_request

    def gated(topic, payload):
        if killed.is_set() or json.loads(payload)["start_index"] < STALL_AT:
            serve(topic, payload)
    host.server.on_request = gated

    def model_requests(raw):
        unique = {r["request_id"]: r for r in map(json.loads, raw)}.values()
        return [r for r in unique if r["payload"] == "model.onnx"]

    def stalled():  # the agent re-requests (after chunk_timeout_s) from the chunk it misses: all before it arrived
        starts = [r["start_index"] for r in model_requests(host.of_kind("dev1", "up/chunkreq"))]
        return any(starts.count(s) >= 2 for s in starts if s >= STALL_AT)
    proc = _start_agent(config, tmp_path / "agent.log")
    try:
        desired = host.deploy("dev1", big)
        host.wait(stalled, WAIT_S, f"the download stalls at chunk {STALL_AT}+")
        _kill(proc)
        before = len(host.of_kind("dev1", "up/chunkreq"))
        killed.set()
        proc = _start_agent(config, tmp_path / "agent.log")
        host.wait_progress("dev1", desired.artifact_id, ("active",), WAIT_S)
        requests = host.of_kind("dev1", "up/chunkreq")
        assert any(r["start_index"] == 0 for r in model_requests(requests[:before]))
        after = [r["start_index"] for r in model_requests(requests[before:])]
        assert after and min(after) >= STALL_AT  # the restarted agent went on from its partial file
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def test_damaged_active_slot_falls_back_to_previous(tmp_path, signing_key):
    from agent.install import Installer

    key, pub = signing_key
    from agent.manifest import load_public_key

    installer = Installer(tmp_path / "data", load_public_key(pub), threads=1)
    for seed in (1, 2):
        art = make_artifact(tmp_path / f"a{seed}", key, seed=seed)
        incoming = tmp_path / f"in{seed}"
        shutil.copytree(art, incoming)
        installer.install(incoming)
    pointer = installer.store.read_pointer()
    assert pointer.active and pointer.previous
    (installer.store.slot_dir(pointer.active) / "model.onnx").write_bytes(b"torn write")  # power cut damage
    loaded, problems = installer.load_active()
    assert loaded is not None and loaded.slot == pointer.previous
    assert "payload model.onnx" in " ".join(problems)
    assert installer.store.read_pointer().active == pointer.previous
