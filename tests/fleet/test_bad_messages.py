"""No message, however malformed or large, stops a handler: the whole bad-message matrix on every
topic `builder serve` and a real `agent run` subscribe to, then chunks, ingest and commands still
work. A real Mosquitto with the fleet's config, its message size limit raised so that the 1 MB and
10 MB payloads reach the handlers (other brokers allow more than ours)."""
from __future__ import annotations

import json
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from agent import protocol as proto
from agent.mqtt import ClientSettings, MqttClient, MqttVersion
from tests.support.broker import MosquittoBroker, mosquitto_available
from tests.support.processes import AGENT_CMD, CHILD_ENV, wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")]

REPO = Path(__file__).resolve().parents[2]
AGENT, OTHER, EVIL = "pi-1", "pi-2", "evil"


def bad_messages() -> dict[str, bytes]:
    """~25 kinds of bad payload: not JSON, not an object, wrong schema, wrong types, NaN,
    unhashable ids, huge, deep."""
    chunkreq = {"schema": 1, "request_id": "r", "artifact_id": "a", "payload": "model.onnx", "start_index": 0, "count": 1}
    return {
        "empty": b"",
        "whitespace": b"   ",
        "binary": bytes(range(256)) * 4,
        "bad-utf8": b"\xff\xfe{\"schema\": 1}",
        "truncated": b'{"schema": 1, "device_id": ',
        "not-an-object": b"[1, 2, 3]",
        "a-string": b'"hello"',
        "null": b"null",
        "no-schema": b'{"device_id": "x"}',
        "schema-2": b'{"schema": 2, "device_id": "x", "seq": 1}',
        "schema-as-list": b'{"schema": [1]}',
        "nan": b'{"schema": 1, "device_id": "evil", "seq": 1, "ts": NaN, "event": "periodic"}',
        "infinity": b'{"schema": 1, "device_id": "evil", "seq": 1, "ts": 1e999, "event": "periodic"}',
        "wrong-types": json.dumps({"schema": 1, "device_id": 5, "seq": "x", "ts": "now", "event": 3, "state": 1,
                                   "request_id": 7, "command": [], "incarnation": {}, "ranges": "all"}).encode(),
        "unhashable-ids": json.dumps({**chunkreq, "request_id": ["x"], "artifact_id": {"a": 1}, "payload": [1],
                                      "deployment_id": ["d"], "command": ["status"], "incarnation": ["i"]}).encode(),
        "unhashable-chunkreq": json.dumps({**chunkreq, "request_id": {"id": 1}}).encode(),
        "negative-seq": b'{"schema": 1, "device_id": "evil", "seq": -5, "ts": 1, "event": "periodic"}',
        "bool-as-int": json.dumps({**chunkreq, "start_index": True, "count": True}).encode(),
        "huge-int": b'{"schema": 1, "seq": ' + b"9" * 5000 + b"}",
        "bad-ack-ranges": b'{"schema": 1, "incarnation": "abc", "ranges": [[5, 1], [1], "x"]}',
        "deep-200kB": b"[" * 100_000 + b"]" * 100_000,
        "deep-object": b'{"schema": 1, "a": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        "deep-in-field": json.dumps({**chunkreq}).encode()[:-1] + b', "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "1MB": b'{"schema": 1, "pad": "' + b"x" * (1 << 20) + b'"}',
        "10MB": b"[" + b"1," * (5 << 20) + b"1]",
        "chunk-frame-deep-header": proto.CHUNK_MAGIC + (8000).to_bytes(4, "big") + b"[" * 4000 + b"]" * 4000,
    }


def client(broker: MosquittoBroker, user: str, password: str) -> MqttClient:
    c = MqttClient(ClientSettings(host="127.0.0.1", port=broker.port, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                                  username=user, password=password, version=MqttVersion.V311))
    return c.connect(10)


@pytest.fixture
def world(tmp_path: Path):
    from builder.artifacts.signing import init_keys
    from builder.fleet.transport.link import BrokerEndpoint, FleetLink
    from builder.fleet.transport.serve import FleetServer, ServeSettings

    broker = MosquittoBroker(devices={AGENT: "pw-1", OTHER: "pw-2", EVIL: "pw-evil"}, builder_password="pw-b",
                             extra_lines=("message_size_limit 16777216",)).start()
    home = tmp_path / "home"
    keys = init_keys(home / "keys")
    endpoint = BrokerEndpoint(broker.url, "builder", "pw-b")
    server = FleetServer(ServeSettings(data_dir=home, broker=endpoint)).start()
    toml = tmp_path / "agent.toml"
    toml.write_text("\n".join([
        f'device_id = "{AGENT}"', f'broker_url = "{broker.url}"', 'password = "pw-1"', f'trusted_key = "{keys.public}"',
        f'data_dir = "{tmp_path / "agent"}"', "http_port = 0", "threads = 1", "telemetry_interval_s = 0.5",
        "reconnect_min_s = 0.2", "reconnect_max_s = 1.0", 'profile = "x86-64-host"']) + "\n")
    log = open(tmp_path / "agent.log", "ab")
    agent = subprocess.Popen(AGENT_CMD + ["run", "--config", str(toml)], cwd=REPO, env=CHILD_ENV, stdout=log,
                             stderr=subprocess.STDOUT)
    link = FleetLink(endpoint).connect()
    try:
        yield {"broker": broker, "server": server, "link": link, "agent": agent, "log": tmp_path / "agent.log"}
    finally:
        link.close()
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        server.stop()
        broker.close()


def test_the_bad_message_matrix_stops_no_handler_on_either_side(world) -> None:
    server, link, broker = world["server"], world["link"], world["broker"]
    store = server.store

    def agent_rows() -> int:
        return len(store.telemetry(AGENT))

    wait_for(lambda: agent_rows() >= 2, 60, "the agent's first reports: " + world["log"].read_text()[-2000:])
    bad = bad_messages()
    up = [proto.Up.HELLO, proto.Up.STATUS, proto.Up.TELEMETRY, proto.Up.PROGRESS, proto.Up.CHUNK_REQUEST, proto.Up.REPLY]
    down = [proto.Down.DESIRED, proto.Down.CHUNKS, proto.Down.COMMAND, proto.Down.ACK]
    link.watch_replies()  # serve's link does not listen for replies; this one does
    sender = link.mqtt
    deliveries = []
    for payload in bad.values():
        for suffix in up:
            deliveries.append(sender.publish(proto.device_topic(EVIL, suffix), payload))
        for suffix in down:
            deliveries.append(sender.publish(proto.device_topic(AGENT, suffix), payload))
    assert all(d.wait(60) for d in deliveries)

    # serve counted the refusals per device and kind, and still serves chunks and ingests...
    wait_for(lambda: server.message_errors().get((EVIL, proto.Up.TELEMETRY), 0) >= len(bad) - 2, 60,
             f"serve to refuse the bad telemetry: {server.message_errors()}")
    errors = server.message_errors()
    for suffix in (proto.Up.HELLO, proto.Up.STATUS, proto.Up.PROGRESS, proto.Up.CHUNK_REQUEST):
        assert errors.get((EVIL, suffix), 0) >= len(bad) - 3, (suffix, errors)
    assert store.telemetry(EVIL) == []
    other = client(broker, OTHER, "pw-2")
    frames: list[bytes] = []
    got = threading.Event()
    other.subscribe(proto.device_topic(OTHER, proto.Down.CHUNKS), lambda t, p: (frames.append(p), got.set()))
    request = proto.ChunkRequest(request_id="after-matrix", artifact_id="f" * 64, payload="model.onnx",
                                 start_index=0, count=1)
    other.publish(proto.device_topic(OTHER, proto.Up.CHUNK_REQUEST), request.to_json()).wait(10)
    assert got.wait(20), "serve answered no chunk request after the matrix"
    frame = proto.decode_chunk_frame(frames[0])
    assert frame.header.request_id == "after-matrix" and frame.header.error  # unknown artifact: an error frame
    report = proto.TelemetryReport(device_id=OTHER, seq=0, ts=proto.now_s(), event="periodic", incarnation="other1")
    other.publish(proto.device_topic(OTHER, proto.Up.TELEMETRY), report.to_json()).wait(10)
    wait_for(lambda: len(store.telemetry(OTHER)) == 1, 20, "serve to store another device's report after the matrix")
    other.stop()

    # ... and the agent, which got the same matrix on its own topics, still answers commands and reports.
    before = agent_rows()
    reply = link.command(AGENT, proto.StatusArgs(), timeout_s=30)
    assert reply.ok and reply.result["telemetry"]["host_acks"] is True
    wait_for(lambda: agent_rows() >= before + 3, 30, "the agent's reports to keep arriving after the matrix")
    assert world["agent"].poll() is None
    log_text = world["log"].read_text(errors="replace")
    assert "refused a message from pi-1 on down/cmd" in log_text and "refused a message from pi-1 on down/ack" in log_text
