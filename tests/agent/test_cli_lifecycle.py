"""`agent run` as a process: SIGTERM/SIGINT stop it cleanly (retained "offline" status published by the
agent itself, exit code 0, no traceback); --help works without a broker or config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.conftest import DEVICES, WAIT_S, agent_toml, make_artifact

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).parents[2]


def _states(host) -> list[tuple[str, str]]:
    return [(json.loads(p)["state"], p.decode()) for p in host.of_kind("dev1", "up/status")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_agent_run_stops_cleanly_on_signal(tmp_path, broker, signing_key, host_factory, signum):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "art", key, seed=1)
    data = tmp_path / "data"
    config = agent_toml(tmp_path / "agent.toml", broker.url, "dev1", DEVICES["dev1"], pub, data,
                        telemetry_interval_s=0.2)
    host = host_factory(broker.url)
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", "from agent.cli import app; app()", "run", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    try:
        desired = host.deploy("dev1", artifact)
        host.wait_progress("dev1", desired.artifact_id, ("active",), WAIT_S)
        host.wait(lambda: len(host.of_kind("dev1", "up/telemetry")) >= 2, WAIT_S, "telemetry flowing")
        seen = len(host.of_kind("dev1", "up/status"))
        proc.send_signal(signum)
        assert proc.wait(WAIT_S) == 0
        host.wait(lambda: any(s == "offline" for s, _ in _states(host)[seen:]), WAIT_S, "offline status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    stderr = log.read_text(errors="replace")
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr
    # The retained status a late subscriber (the fleet view) sees says offline.
    late = host_factory(broker.url)
    late.wait(lambda: late.of_kind("dev1", "up/status"), WAIT_S, "retained status")
    assert json.loads(late.of_kind("dev1", "up/status")[-1])["state"] == "offline", (_states(host), late.of_kind("dev1", "up/status"))


def test_agent_help_lists_commands_without_config():
    out = subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    assert all(name in out.stdout for name in ("run", "bench", "status", "detect"))
