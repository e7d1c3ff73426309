"""An agent killed (SIGKILL) mid-download on the embedded broker resumes from its .part file when
restarted, and the push that was waiting completes. rumqttd does not resend retained messages to a
reconnecting persistent session, so the agent must re-read the desired state on every connect."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.agent.conftest import make_artifact
from tests.fleet.conftest import CHILD_ENV, PY, REPO, slow_serve_with_one_agent, start_agent, wait_for

pytest.importorskip("iotcore")


def _part_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "downloads").glob("*/*.part")) if (data_dir / "downloads").is_dir() else 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_agent_killed_mid_download_resumes_on_the_embedded_broker(tmp_path: Path, fleet_home, processes) -> None:
    home = fleet_home.root
    # ~64 chunks of 128 KiB of random weights (incompressible); 0.1 s per chunk: a 6 s download to interrupt
    big = make_artifact(tmp_path / "big", fleet_home.private_key, seed=5, cols=262144)
    record, _ = fleet_home.registry.add_artifact(big)
    data_dir = tmp_path / "agent-data"
    toml, agent = slow_serve_with_one_agent(processes, home, "host-01", "x86-64-host", data_dir)

    push_log = open(tmp_path / "push.log", "wb")
    push = subprocess.Popen([PY, "-m", "builder.cli.main", "push", "--device", "host-01", "--artifact", record.artifact_id,
                             "--json", "--benchmark-runs", "0", "--timeout-s", "150", "--data-dir", str(home)],
                            cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=push_log)
    try:
        total = record.size_bytes
        wait_for(lambda: 0 < _part_bytes(data_dir) < total // 2, 90, "the download to be under way: " + processes.log("agent"),
                 interval_s=0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        kept = _part_bytes(data_dir)
        assert kept > 0  # the partial file survives the kill
        start_agent(processes, "agent2", toml, data_dir)
        out, _ = push.communicate(timeout=200)
    finally:
        if push.poll() is None:
            push.kill()
        push_log.close()
    outcome = json.loads(out)["outcomes"][0]
    assert push.returncode == 0 and outcome["state"] == "active", (outcome, processes.log("agent2"))
    log = processes.log("agent2")
    assert "resuming" in log  # it went on from the .part file, not from chunk 0
    assert _part_bytes(data_dir) == 0 and not list((data_dir / "downloads").glob("*/*"))  # nothing stale left
