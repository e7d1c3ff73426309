"""Transfers resume after a broker restart; telemetry produced while the broker is down arrives
afterwards, complete and in order."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.agent.conftest import BUILDER_PASSWORD, DEVICES, agent_config, make_artifact
from tests.support.broker import MosquittoBroker

pytestmark = pytest.mark.mosquitto


def test_pull_resumes_after_broker_restart(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "big", key, seed=7, cols=32768)  # ~1 MiB of random weights
    # 16 KiB chunks, rate-limited: ~65 chunks over a few seconds, so the restart lands mid-way.
    host = host_factory(broker.url, chunk_bytes=16 * 1024, delay_per_chunk_s=0.03)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data",
                                        window_chunks=8))
    desired = host.deploy("dev1", artifact)

    def percent():
        progress = [p.percent for p in host.progress("dev1") if p.state == "downloading"]
        return progress and progress[-1] >= 25
    host.wait(percent, 30, "download a quarter of the way")
    broker.restart()  # in-memory broker: retained desired and queued chunks are gone
    host.wait(lambda: host.client.is_connected(), 15, "host reconnects")
    host.wait_progress("dev1", desired.artifact_id, ("active",), 60)

    requests = list({r["request_id"]: r for r in map(json.loads, host.of_kind("dev1", "up/chunkreq"))}.values())
    model_requests = [r for r in requests if r["payload"] == "model.onnx"]
    assert sum(1 for r in model_requests if r["start_index"] == 0) == 1  # never restarted from scratch
    starts = [r["start_index"] for r in model_requests]
    assert max(starts) > 16  # and it did carry on past the restart
    assert agent.conn.connect_count >= 2
    with np.load(artifact / "sample.npz") as sample:
        out, _ = agent.active.infer({"x": sample["in:x"]}, record=False)
        np.testing.assert_allclose(out["y"], sample["out:y"], rtol=1e-5, atol=1e-5)


def test_telemetry_buffered_while_broker_down_arrives_in_order(tmp_path, request, signing_key, host_factory,
                                                                running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "art", key, seed=1)
    # A persistent broker and a persistent host session: whoever reconnects first, nothing is lost.
    broker = MosquittoBroker(devices=DEVICES, builder_password=BUILDER_PASSWORD, persistence=True).start()
    request.addfinalizer(broker.close)
    host = host_factory(broker.url, persistent_session=True)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data",
                                        telemetry_interval_s=0.25))
    desired = host.deploy("dev1", artifact)
    host.wait_progress("dev1", desired.artifact_id, ("active",))
    host.wait(lambda: len(host.of_kind("dev1", "up/telemetry")) >= 2, 10, "telemetry flowing")

    broker.stop()
    down_at = time.time()
    with np.load(artifact / "sample.npz") as sample:
        x = sample["in:x"]
    for _ in range(20):  # real requests while offline: they must show up in the buffered windows
        agent.active.infer({"x": x})
        time.sleep(0.05)
    time.sleep(1.5)
    up_at = time.time()
    buffered = len(agent.outbox)
    assert buffered >= 3
    broker.start()

    def received():
        return [json.loads(t) for t in host.of_kind("dev1", "up/telemetry")]
    host.wait(lambda: any(r["ts"] > up_at for r in received()) and len(agent.outbox) == 0, 30,
              "outbox flushed after reconnect")
    reports = received()
    first_seen: list[int] = []
    for report in reports:
        if report["seq"] not in first_seen:
            first_seen.append(report["seq"])
    assert first_seen == sorted(first_seen)  # in order
    assert first_seen == list(range(first_seen[0], first_seen[-1] + 1))  # complete: no gaps
    offline = [r for r in reports if down_at < r["ts"] < up_at]
    assert len({r["seq"] for r in offline}) >= buffered - 1
    assert sum(r["requests"] for r in offline if r["event"] == "periodic") == 20
    assert all(r["power_w"] is None and r["power_source"] == "not measured" for r in reports)
