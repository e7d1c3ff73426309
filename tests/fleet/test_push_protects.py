"""`builder push` protects the user, with a real `builder serve` (embedded broker) and a real agent
registered as a Raspberry Pi 4: an artifact built for another profile is refused in one line
(--force overrides), `--model` takes `--precision`, and Ctrl-C (SIGINT) during a push withdraws the
desired deployment so the device keeps its model."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent.conftest import make_artifact
from tests.fleet.conftest import CHILD_ENV, PY, REPO, agent_http_url, builder_cli, slow_serve_with_one_agent, wait_for

pytest.importorskip("iotcore")


def _health(data_dir: Path) -> dict:
    import urllib.request

    with urllib.request.urlopen(agent_http_url(data_dir) + "/health", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_push_refuses_other_profiles_takes_precision_and_ctrl_c_withdraws(tmp_path: Path, fleet_home, processes) -> None:
    home = fleet_home.root
    data_dir = tmp_path / "pi-data"
    slow_serve_with_one_agent(processes, home, "pi-01", "raspberry-pi-4", data_dir)

    # 1. a Jetson build (TensorRT, fp16) to a Pi: refused before anything is published; --force pushes it
    from builder.targets.profile_build import build_for_profile

    jetson = str(build_for_profile(str(fleet_home._digits_onnx(8)), "jetson-orin-nano", registry_dir=home).artifact_id)
    assert fleet_home.registry.get(jetson).runtime == "onnxruntime-tensorrt"
    refused = builder_cli("push", "--device", "pi-01", "--artifact", jetson, "--benchmark-runs", "0", home=home, check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "jetson-orin-nano" in lines[0] and "raspberry-pi-4" in lines[0] and "--force" in lines[0]
    from builder.fleet.transport.store import open_store

    with open_store(home) as store:
        assert store.events("pi-01") == []  # nothing was published
    forced = json.loads(builder_cli("push", "--device", "pi-01", "--artifact", jetson, "--force", "--json",
                                    "--benchmark-runs", "0", home=home).stdout)["outcomes"][0]
    assert forced["state"] == "active"

    # 2. --model with --precision: the Pi's default (int8) is overridden, built for the Pi's profile
    built = json.loads(builder_cli("push", "--device", "pi-01", "--model", str(fleet_home._digits_onnx(8)),
                                   "--precision", "fp32", "--json", "--benchmark-runs", "0", home=home).stdout)["outcomes"][0]
    assert built["state"] == "active", built
    record = fleet_home.registry.get(built["artifact_id"])
    assert (record.profile, record.precision) == ("raspberry-pi-4", "fp32")
    assert _health(data_dir)["artifact_id"] == built["artifact_id"]

    # 3. Ctrl-C while the device downloads a big model: one line, the desired state is restored, no install
    big_dir = make_artifact(tmp_path / "big", fleet_home.private_key, seed=7, cols=262144, profile="raspberry-pi-4")
    big, _ = fleet_home.registry.add_artifact(big_dir)
    push = subprocess.Popen([PY, "-m", "builder.cli.main", "push", "--device", "pi-01", "--artifact", big.artifact_id,
                             "--benchmark-runs", "0", "--data-dir", str(home)], cwd=REPO, env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def parts() -> list[Path]:
            downloads = data_dir / "downloads"
            return [p for p in downloads.glob("*/*.part") if p.stat().st_size > 0] if downloads.is_dir() else []

        wait_for(parts, 90, "the big download to start: " + processes.log("agent"), interval_s=0.05)
        push.send_signal(signal.SIGINT)
        out, err = push.communicate(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
    assert push.returncode == 130, (push.returncode, err)
    last = err.strip().splitlines()[-1]
    assert "cancelled" in last and "withdrawn" in last and "Traceback" not in err, err
    with open_store(home) as store:
        assert store.latest_desired()["pi-01"].artifact_id == built["artifact_id"]  # restored, not the big one
    # the agent drops the withdrawn pull and keeps serving the previous model
    wait_for(lambda: not parts() and not (data_dir / "downloads" / big.artifact_id).exists(), 60,
             "the withdrawn download to be dropped: " + processes.log("agent"))
    time.sleep(2.0)
    assert _health(data_dir)["artifact_id"] == built["artifact_id"]
    assert not (data_dir / "incoming" / big.artifact_id).exists()
