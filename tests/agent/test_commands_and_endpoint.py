"""Remote commands (replies carry the request id), the local HTTP endpoint, the telemetry outbox
bounds, and the chunk server's own rules."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.agent.conftest import DEVICES, WAIT_S, agent_config, make_artifact


@pytest.mark.mosquitto
def test_remote_commands_status_load_benchmark_interval(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "art", key, seed=1, cols=512)
    host = host_factory(broker.url)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data"))
    desired = host.deploy("dev1", artifact)
    host.wait_progress("dev1", desired.artifact_id, ("active",))

    status = host.command("dev1", "status")
    assert status.ok and status.result["active_artifact_id"] == desired.artifact_id

    base = host.command("dev1", "benchmark", {"runs": 20, "warmup": 2})
    assert base.ok and base.result["latency"]["p95"] > 0 and base.result["artifact_id"] == desired.artifact_id
    assert base.result["power_w"] is None and base.result["power_source"] == "not measured"
    assert base.result["estimated_power_w"] == pytest.approx(35.0)  # x86-64-host typical_w, labelled estimate

    reply = host.command("dev1", "set_load", {"slowdown_factor": 4.0})
    assert reply.ok and reply.result["load"]["slowdown_factor"] == 4.0
    slow = host.command("dev1", "benchmark", {"runs": 20, "warmup": 2})
    assert slow.result["latency"]["p50"] > 2.5 * base.result["latency"]["p50"]
    assert json.loads(host.of_kind("dev1", "up/status")[-1])["load"]["slowdown_factor"] == 4.0

    bad = host.command("dev1", "set_telemetry_interval", {"seconds": -1})
    assert not bad.ok and "seconds" in bad.error
    assert host.command("dev1", "set_telemetry_interval", {"seconds": 0.2}).ok
    with np.load(artifact / "sample.npz") as sample:
        for _ in range(5):
            agent.active.infer({"x": sample["in:x"]})

    def periodic_with_requests():
        reports = [json.loads(raw) for raw in host.of_kind("dev1", "up/telemetry")]
        counted = [r for r in reports if r["event"] == "periodic" and r["requests"] > 0]
        return counted if sum(r["requests"] for r in counted) == 5 else None
    report = host.wait(periodic_with_requests, WAIT_S, "periodic reports counting the 5 requests")[0]
    assert report["artifact_id"] == desired.artifact_id and report["latency_ms"]["p95"] > 0
    assert report["details"]["load"]["slowdown_factor"] == 4.0
    assert any(json.loads(t)["event"] == "benchmark" for t in host.of_kind("dev1", "up/telemetry"))


def test_local_endpoint_infer_health_model_and_errors(tmp_path, signing_key):
    import shutil

    from agent.active import ActiveModel
    from agent.install import Installer
    from agent.load import LoadController
    from agent.manifest import load_public_key
    from agent.serve import LocalEndpoint
    from agent.telemetry import FieldStats

    key, pub = signing_key
    stats = FieldStats()
    active = ActiveModel(stats, LoadController())
    endpoint = LocalEndpoint(active, port=0).start()
    try:
        assert endpoint._server.server_address[0] == "127.0.0.1"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(endpoint.url + "/health", timeout=60)
        assert err.value.code == 503

        art = make_artifact(tmp_path / "art", key, seed=2)
        shutil.copytree(art, tmp_path / "incoming")
        active.swap(Installer(tmp_path / "data", load_public_key(pub), threads=1).install(tmp_path / "incoming"))
        with urllib.request.urlopen(endpoint.url + "/model", timeout=60) as resp:
            model = json.loads(resp.read())
        assert model["inputs"] == [{"name": "x", "shape": [1, 8], "dtype": "float32"}]
        with np.load(art / "sample.npz") as sample:
            body = json.dumps({"inputs": {"x": sample["in:x"].tolist()}}).encode()
            with urllib.request.urlopen(urllib.request.Request(endpoint.url + "/infer", data=body), timeout=60) as resp:
                answer = json.loads(resp.read())
            np.testing.assert_allclose(np.asarray(answer["outputs"]["y"], np.float32), sample["out:y"], rtol=1e-5)
        assert answer["latency_ms"] > 0
        for path, data, code in (("/infer", b"{not json", 400), ("/nope", None, 404)):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(endpoint.url + path, data=data), timeout=60)
            assert err.value.code == code
        window_s, requests, errors, latency = stats.take_window()
        assert requests == 1 and errors == 0 and latency.count == 1  # only the real infer was timed
    finally:
        endpoint.stop()


def test_telemetry_outbox_bounded_by_size_and_age(tmp_path):
    from agent.protocol import TelemetryReport
    from agent.telemetry import TelemetryOutbox

    outbox = TelemetryOutbox(tmp_path / "t.db", max_bytes=5000, max_age_s=3600)
    for _ in range(100):
        seq = outbox.next_seq()
        outbox.put(TelemetryReport(device_id="d", seq=seq, ts=time.time(), event="periodic", details={"pad": "x" * 100}))
    rows = outbox.peek(1000)
    assert 0 < len(rows) < 100 and sum(len(b) for _, b in rows) <= 5000
    assert [s for s, _ in rows] == list(range(100 - len(rows), 100))  # the newest kept, in order
    assert outbox.dropped == 100 - len(rows)
    outbox.put(TelemetryReport(device_id="d", seq=outbox.next_seq(), ts=time.time() - 7200, event="periodic"))
    assert all(json.loads(b)["ts"] > time.time() - 3600 for _, b in outbox.peek(1000))  # too old: dropped
    outbox.close()
    reopened = TelemetryOutbox(tmp_path / "t.db")
    assert reopened.next_seq() == 101  # seq survives restarts
    reopened.close()


class _FakeClient:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.published.append((topic, payload))


def test_chunk_server_compresses_once_and_refuses_unlisted_payloads(tmp_path, signing_key):
    import zstandard

    from agent import protocol as proto
    from builder.fleet.transport.chunk_server import ChunkServer

    key, _ = signing_key
    art = make_artifact(tmp_path / "art", key, seed=3, cols=8192)
    aid = json.loads((art / "manifest.json").read_text())["artifact_id"]
    client = _FakeClient()
    server = ChunkServer(client, {aid: art}.get, chunk_bytes=8192, cache_dir=tmp_path / "cache")
    req = proto.ChunkRequest(request_id="r1", artifact_id=aid, payload="model.onnx", start_index=0, count=256)
    sent = server.serve_request("dev1", req)
    frames = [proto.decode_chunk_frame(p) for _, p in client.published]
    assert sent == len(frames) == frames[0].header.chunk_count > 1
    assert all(t == "edgefleet/v1/devices/dev1/down/chunks" for t, _ in client.published)
    for frame in frames:
        frame.verify()
        assert len(frame.data) <= 8192
    stream = b"".join(f.data for f in frames)
    assert zstandard.ZstdDecompressor().decompress(stream) == (art / "model.onnx").read_bytes()
    assert (tmp_path / "cache" / aid / "model.onnx.zst").read_bytes() == stream  # cached compressed form
    assert server.compressed(aid, "model.onnx") is server.compressed(aid, "model.onnx")

    client.published.clear()
    for name, artifact_id in (("../../etc/passwd", aid), ("manifest.json", aid), ("model.onnx", "f" * 64)):
        server.serve_request("dev1", proto.ChunkRequest(request_id="r", artifact_id=artifact_id, payload=name,
                                                        start_index=0, count=1))
    errors = [proto.decode_chunk_frame(p).header.error for _, p in client.published]
    assert len(errors) == 3 and all(errors) and all(f.data == b"" for f in map(proto.decode_chunk_frame, (p for _, p in client.published)))


def test_broker_config_writes_hashed_passwords_and_pattern_acl(tmp_path):
    from builder.fleet.transport.broker_config import add_password, write_broker_config

    cfg = write_broker_config(tmp_path / "conf", port=18830, devices={"pi-1": "secret1"}, builder_password="bpw")
    passwd = cfg.password_file.read_text()
    assert "pi-1:" in passwd and "builder:" in passwd and "secret1" not in passwd
    acl = cfg.acl_file.read_text()
    assert "pattern write edgefleet/v1/devices/%u/up/#" in acl and "pattern read edgefleet/v1/devices/%u/down/#" in acl
    assert "pattern write edgefleet/v1/devices/%u/down" not in acl
    conf = cfg.config_file.read_text()
    assert "allow_anonymous false" in conf and "listener 18830 127.0.0.1" in conf
    add_password(cfg.password_file, "pi-2", "secret2")
    users = [line.split(":")[0] for line in cfg.password_file.read_text().splitlines()]
    assert sorted(users) == ["builder", "pi-1", "pi-2"]
    assert oct(cfg.password_file.stat().st_mode & 0o777) == "0o644"  # readable by the mosquitto user


def test_latency_regression_beyond_bound_triggers_rollback_but_artificial_slowdown_does_not():
    from agent.active import ActiveModel
    from agent.config import LoadSettings
    from agent.install import HealthReport, LoadedModel
    from agent.load import LoadController
    from agent.telemetry import FieldStats

    class SlowRuntime:
        backend = "fake"
        inputs = outputs = ()

        def __init__(self, delay_s: float) -> None:
            self.delay_s = delay_s

        def run(self, feeds):
            time.sleep(self.delay_s)
            return {}

    reasons: list[str] = []
    load = LoadController()
    active = ActiveModel(FieldStats(), load, latency_regression_factor=2.0, latency_min_requests=5,
                         on_unhealthy=reasons.append)
    model = LoadedModel(manifest=None, runtime=SlowRuntime(0.002), slot="a", directory=Path("."),  # type: ignore[arg-type]
                        health=HealthReport(True, baseline_p50_ms=50.0, max_abs_error=0.0, min_cosine=1.0))
    active.swap(model)
    for _ in range(10):
        active.infer({})
    assert reasons == []  # ~2 ms: within 2x of the install-time p50 of 50 ms (50x margin for a loaded machine)
    load.apply(LoadSettings(slowdown_factor=3.0))
    for _ in range(10):
        active.infer({})
    assert reasons == []  # artificial load is not a regression of the model
    load.apply(LoadSettings())
    model.runtime.delay_s = 0.25  # 5x the install-time p50 (a sleep never returns early)
    for _ in range(10):
        active.infer({})
    assert len(reasons) == 1 and "exceeds 2.0x" in reasons[0]
