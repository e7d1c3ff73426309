"""Transfers resume after a broker restart; telemetry produced while the broker is down arrives
afterwards, complete and in order."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tests.agent.conftest import BUILDER_PASSWORD, DEVICES, agent_config, make_artifact
from tests.support.broker import MosquittoBroker

pytestmark = pytest.mark.mosquitto

# Deadlines, not expectations: on a loaded 2-core machine threads can stall for seconds. A passing
# run returns as soon as the condition holds, so a generous deadline costs nothing.
WAIT_S = 120.0


def _wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.05)
    return value


def test_pull_resumes_after_broker_restart(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "big", key, seed=7, cols=32768)  # ~1 MiB of random weights: ~65 chunks
    host = host_factory(broker.url, chunk_bytes=16 * 1024)
    # The restart must land mid-way whatever the machine's load: until it happens the host serves only
    # windows starting before chunk STALL_AT, so the agent stalls there (windows are contiguous), then resumes.
    STALL_AT = 24
    restarted = threading.Event()
    serve = host.server.on_request

    def gated(topic, payload):
        if restarted.is_set() or json.loads(payload)["start_index"] < STALL_AT:
            serve(topic, payload)
    host.server.on_request = gated
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data",
                                        window_chunks=8))
    desired = host.deploy("dev1", artifact)

    def model_requests(raw):
        unique = {r["request_id"]: r for r in map(json.loads, raw)}.values()
        return [r for r in unique if r["payload"] == "model.onnx"]

    def stalled():
        # The agent re-requests from the chunk it misses (after chunk_timeout_s): everything before it
        # is verified. (Progress is not a signal here: the agent publishes it at most every 0.5 s.)
        starts = [r["start_index"] for r in model_requests(host.of_kind("dev1", "up/chunkreq"))]
        return any(starts.count(s) >= 2 for s in starts if s >= STALL_AT)
    host.wait(stalled, WAIT_S, f"the download stalls at chunk {STALL_AT}+")
    before = len(host.of_kind("dev1", "up/chunkreq"))
    restarted.set()
    broker.restart()  # in-memory broker: retained desired and queued chunks are gone
    host.wait(lambda: host.client.connected, WAIT_S, "host reconnects")
    host.wait_progress("dev1", desired.artifact_id, ("active",), WAIT_S)

    requests = host.of_kind("dev1", "up/chunkreq")
    assert any(r["start_index"] == 0 for r in model_requests(requests[:before]))
    after = [r["start_index"] for r in model_requests(requests[before:])]
    # Never restarted from scratch: every request after the restart goes on from the stall point
    # (a start_index 0 request before it is only ever a re-request while nothing had arrived yet).
    assert after and min(after) >= STALL_AT
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
    host.wait_progress("dev1", desired.artifact_id, ("active",), WAIT_S)
    host.wait(lambda: len(host.of_kind("dev1", "up/telemetry")) >= 2, WAIT_S, "telemetry flowing")

    broker.stop()
    down_at = time.time()
    with np.load(artifact / "sample.npz") as sample:
        x = sample["in:x"]
    for _ in range(20):  # real requests while offline: they must show up in the buffered windows
        agent.active.infer({"x": x})
        time.sleep(0.05)

    def offline_windows_buffered():
        # Wait for the windows (not a fixed time: a loaded machine delays the telemetry thread):
        # at least 3 reports held while offline, whose periodic windows count all 20 requests.
        reports = [json.loads(body) for _, body in agent.outbox.peek(10_000)]
        counted = sum(r["requests"] for r in reports if r["event"] == "periodic" and r["ts"] > down_at)
        return len(reports) >= 3 and counted == 20
    _wait_until(offline_windows_buffered, WAIT_S, "3+ reports buffered offline, counting the 20 requests")
    up_at = time.time()
    buffered = len(agent.outbox)
    assert buffered >= 3
    broker.start()

    def received():
        return [json.loads(t) for t in host.of_kind("dev1", "up/telemetry")]
    host.wait(lambda: any(r["ts"] > up_at for r in received()) and len(agent.outbox) == 0, WAIT_S,
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
