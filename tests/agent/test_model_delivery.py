"""A model pulled over a real Mosquitto, verified, activated and served; tampering refused."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.errors import RuntimeBackendError
from tests.agent.conftest import DEVICES, agent_config, make_artifact

pytestmark = pytest.mark.mosquitto
WAIT_S = 120.0  # a deadline, not an expectation: a loaded machine stalls threads for seconds


def _infer(agent, x: np.ndarray) -> dict:
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    req = urllib.request.Request(agent.endpoint.url + "/infer", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _expected(artifact: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(artifact / "sample.npz") as data:
        return data["in:x"], data["out:y"]


def test_model_pulled_verified_activated_and_served(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "art1", key, seed=1, cols=4096)  # ~130 KiB: several chunks
    host = host_factory(broker.url, chunk_bytes=32 * 1024)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data"))
    desired = host.deploy("dev1", artifact)
    host.wait_progress("dev1", desired.artifact_id, ("active",), WAIT_S)

    states = [p.state for p in host.progress("dev1") if p.artifact_id == desired.artifact_id]
    assert states[0] == "verifying" and "downloading" in states and "installing" in states
    assert host.server.chunks_sent >= 2  # really chunked
    x, y = _expected(artifact)
    answer = _infer(agent, x)
    np.testing.assert_allclose(np.asarray(answer["outputs"]["y"], dtype=np.float32), y, rtol=1e-5, atol=1e-5)
    assert answer["artifact_id"] == desired.artifact_id
    with urllib.request.urlopen(agent.endpoint.url + "/health", timeout=60) as resp:
        assert json.loads(resp.read())["artifact_id"] == desired.artifact_id
    status = [json.loads(s) for s in host.of_kind("dev1", "up/status")]
    assert status[-1]["state"] == "online" and status[-1]["active_artifact_id"] == desired.artifact_id
    assert json.loads((tmp_path / "data" / "active.json").read_text())["active"] in ("a", "b")


def test_tampered_manifest_and_payload_refused_previous_model_kept(tmp_path, broker, signing_key, host_factory,
                                                                     running_agents):
    key, pub = signing_key
    good = make_artifact(tmp_path / "good", key, seed=1)
    host = host_factory(broker.url)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data"))
    first = host.deploy("dev1", good)
    host.wait_progress("dev1", first.artifact_id, ("active",))

    # 1. Manifest altered after signing (a looser tolerance): refused before any chunk is requested.
    forged = make_artifact(tmp_path / "forged", key, seed=2)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["verify_tolerance"]["atol"] = 1.0
    (forged / "manifest.json").write_text(json.dumps(manifest))
    chunks_before = host.server.chunks_sent
    second = host.deploy("dev1", forged)
    rejected = host.wait_progress("dev1", second.artifact_id, ("rejected",))
    assert "signature" in rejected.error
    assert host.server.chunks_sent == chunks_before

    # 2. Payload swapped on the server after signing: downloaded, fails its sha256, never installed.
    swapped = make_artifact(tmp_path / "swapped", key, seed=3)
    other = make_artifact(tmp_path / "other", key, seed=4)
    (swapped / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    third = host.deploy("dev1", swapped)
    failed = host.wait_progress("dev1", third.artifact_id, ("failed",))
    assert "sha256" in failed.error or "bytes" in failed.error

    # 3. Signed by another key: refused.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    foreign = make_artifact(tmp_path / "foreign", Ed25519PrivateKey.generate(), seed=5)
    fourth = host.deploy("dev1", foreign)
    assert "key" in host.wait_progress("dev1", fourth.artifact_id, ("rejected",)).error

    x, y = _expected(good)
    answer = _infer(agent, x)
    assert answer["artifact_id"] == first.artifact_id
    np.testing.assert_allclose(np.asarray(answer["outputs"]["y"], dtype=np.float32), y, rtol=1e-5, atol=1e-5)


def test_health_check_failure_keeps_previous_model(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    good = make_artifact(tmp_path / "good", key, seed=1)
    wrong = make_artifact(tmp_path / "wrong", key, seed=2, expected_scale=1.5)  # validly signed, wrong outputs
    host = host_factory(broker.url)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data"))
    first = host.deploy("dev1", good)
    host.wait_progress("dev1", first.artifact_id, ("active",))
    second = host.deploy("dev1", wrong)
    failed = host.wait_progress("dev1", second.artifact_id, ("failed",))
    assert "health check" in failed.error and "differs" in failed.error
    assert agent.active.model.manifest.artifact_id == first.artifact_id
    pointer = json.loads((tmp_path / "data" / "active.json").read_text())
    assert (tmp_path / "data" / "slots" / pointer["active"] / "manifest.json").read_text().count(first.artifact_id)


def test_rollback_command_and_automatic_rollback_on_runtime_failures(tmp_path, broker, signing_key, host_factory,
                                                                      running_agents):
    key, pub = signing_key
    v1 = make_artifact(tmp_path / "v1", key, seed=1, version="1")
    v2 = make_artifact(tmp_path / "v2", key, seed=2, version="2")
    host = host_factory(broker.url)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data",
                                        rollback_after_errors=3))
    d1 = host.deploy("dev1", v1)
    host.wait_progress("dev1", d1.artifact_id, ("active",))
    d2 = host.deploy("dev1", v2)
    host.wait_progress("dev1", d2.artifact_id, ("active",))

    reply = host.command("dev1", "rollback")
    assert reply.ok and reply.result["active_artifact_id"] == d1.artifact_id
    assert agent.active.model.manifest.artifact_id == d1.artifact_id

    # Back to v2 via a new deployment, then make it fail at run time: three bad requests roll it back.
    d3 = host.deploy("dev1", v2, deployment_id="v2-again")
    host.wait_progress("dev1", d2.artifact_id, ("active",))
    host.wait(lambda: agent.active.model.manifest.artifact_id == d2.artifact_id, WAIT_S, "v2 active again")
    # A bad request is the caller's fault (400) and never counts against the model...
    for _ in range(3):
        body = json.dumps({"inputs": {"x": [[1.0, 2.0]]}}).encode()  # wrong shape
        req = urllib.request.Request(agent.endpoint.url + "/infer", data=body)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
    assert agent.active.model.manifest.artifact_id == d2.artifact_id
    # ...while the model failing on valid requests does: the runtime breaks (as a lost accelerator
    # would), three requests answer 500, and v2 is rolled back.
    runtime = agent.active.model.runtime

    def broken_run(feeds):
        raise RuntimeBackendError("inference failed: simulated device fault")
    runtime.run = broken_run
    x, _ = _expected(v2)
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as err:
            _infer(agent, x)
        assert err.value.code == 500
    rolled = host.wait(lambda: [p for p in host.progress("dev1")
                                if p.deployment_id == d3.deployment_id and p.state == "rolled_back"], WAIT_S,
                       "auto rollback")[0]
    assert "consecutive inference failures" in rolled.error and "simulated device fault" in rolled.error
    host.wait(lambda: agent.active.model.manifest.artifact_id == d1.artifact_id, WAIT_S, "v1 active after rollback")
    host.wait(lambda: "rollback" in [json.loads(t)["event"] for t in host.of_kind("dev1", "up/telemetry")], WAIT_S,
              "rollback telemetry event")


def test_not_enough_disk_is_refused_before_any_download(tmp_path, signing_key):
    from dataclasses import replace

    from agent.errors import TransferError
    from agent.manifest import Manifest
    from agent.transfer import check_free_disk

    key, _ = signing_key
    art = make_artifact(tmp_path / "art", key, seed=1)
    manifest = Manifest.from_bytes((art / "manifest.json").read_bytes())
    check_free_disk(tmp_path / "dl", manifest)  # a small model fits
    huge = replace(manifest, payloads=tuple(replace(p, size_bytes=1 << 50) for p in manifest.payloads))
    with pytest.raises(TransferError, match="not enough disk"):
        check_free_disk(tmp_path / "dl", huge)
