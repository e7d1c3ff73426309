"""The wire protocol: topics, JSON messages with a schema version, binary chunk frames."""
from __future__ import annotations

import hashlib
import json

import pytest

from agent import protocol as proto
from agent.errors import ProtocolError


def test_topics_split_device_up_and_down():
    assert proto.device_topic("pi-1", proto.Up.STATUS) == "edgefleet/v1/devices/pi-1/up/status"
    assert proto.device_topic("pi-1", proto.Down.DESIRED) == "edgefleet/v1/devices/pi-1/down/desired"
    assert proto.parse_device_topic("edgefleet/v1/devices/pi-1/up/telemetry") == ("pi-1", "up/telemetry")
    assert proto.all_devices_topic(proto.Up.CHUNK_REQUEST) == "edgefleet/v1/devices/+/up/chunkreq"
    for bad in ("a/b", "+", "#", "", "x" * 65, "has space"):
        with pytest.raises(ProtocolError):
            proto.device_topic(bad, proto.Up.STATUS)
    with pytest.raises(ProtocolError):
        proto.parse_device_topic("other/v1/devices/x/up/status")


def test_messages_round_trip_with_schema_version():
    messages = [
        proto.DeviceStatus(device_id="d", state="online", active_artifact_id="a" * 64, ts=1.0),
        proto.Hello(device_id="d", agent_version="0.1.0", runtimes=("onnxruntime",)),
        proto.ChunkRequest(request_id="r", artifact_id="a", payload="model.onnx", start_index=3, count=16),
        proto.TransferProgress(deployment_id="x", artifact_id="a", state="downloading", bytes_done=5, bytes_total=10, percent=50.0),
        proto.TelemetryReport(device_id="d", seq=4, ts=2.0, event="periodic", latency_ms={"p50": 1.0, "p95": 2.0}),
        proto.Command(request_id="r1", command="set_load", args={"slowdown_factor": 2.0}),
        proto.CommandReply(request_id="r1", command="set_load", ok=True, result={"load": {}}),
        proto.DesiredDeployment(deployment_id="x", artifact_id="a", manifest={"artifact_id": "a"}, signature={"alg": "ed25519"}),
    ]
    for message in messages:
        raw = message.to_json()
        assert json.loads(raw)["schema"] == proto.SCHEMA
        assert type(message).from_json(raw) == message


def test_bad_messages_raise_protocol_error():
    with pytest.raises(ProtocolError, match="schema"):
        proto.Command.from_json(b'{"schema": 2, "request_id": "r", "command": "status"}')
    with pytest.raises(ProtocolError, match="lacks"):
        proto.Command.from_json(b'{"schema": 1, "command": "status"}')
    with pytest.raises(ProtocolError, match="command must be"):
        proto.Command.from_json(b'{"schema": 1, "request_id": "r", "command": "format_disk"}')
    with pytest.raises(ProtocolError, match="JSON"):
        proto.Command.from_json(b"\xff not json")
    with pytest.raises(ProtocolError, match="count"):
        proto.ChunkRequest.from_json({"schema": 1, "request_id": "r", "artifact_id": "a", "payload": "p",
                                      "start_index": 0, "count": 100000})
    with pytest.raises(ProtocolError, match="artifact_id"):
        proto.DesiredDeployment.from_json({"schema": 1, "deployment_id": "x", "artifact_id": "a",
                                           "manifest": {"artifact_id": "b"}, "signature": {}})
    # Unknown fields from a newer minor revision are ignored, not fatal.
    assert proto.Command.from_json({"schema": 1, "request_id": "r", "command": "status", "extra": 1}).command == "status"


def test_chunk_frame_round_trip_and_integrity():
    data = bytes(range(256)) * 10
    header = proto.ChunkHeader(request_id="r", artifact_id="a", payload="model.onnx", index=0, chunk_count=2,
                               offset=0, compressed_size=len(data) + 7, sha256=hashlib.sha256(data).hexdigest(),
                               chunk_bytes=len(data))
    frame = proto.decode_chunk_frame(proto.encode_chunk_frame(header, data))
    assert frame.header == header and frame.data == data
    frame.verify()
    with pytest.raises(ProtocolError, match="sha256"):
        proto.ChunkFrame(header, data[:-1] + b"\x00").verify()
    with pytest.raises(ProtocolError, match="magic"):
        proto.decode_chunk_frame(b"XXXX" + proto.encode_chunk_frame(header, data)[4:])
    assert len(proto.encode_chunk_frame(header, b"x" * proto.MAX_CHUNK_BYTES)) <= 128 * 1024


def test_trial_request_travels_as_command_args_and_is_validated():
    manifest = {"artifact_id": "a" * 64, "payloads": []}
    request = proto.TrialRequest(artifact_id="a" * 64, manifest=manifest, signature={"alg": "ed25519"}, runs=7,
                                 warmup=1, timeout_s=30.0)
    command = proto.Command.from_json(proto.Command(request_id="r", command="trial", args=request.to_args()).to_json())
    assert "schema" not in command.args and proto.TrialRequest.from_args(command.args) == request
    desired = request.as_desired("trial-x")
    assert desired.artifact_id == request.artifact_id and desired.manifest == manifest
    for bad, words in (({"runs": 0}, "runs"), ({"warmup": -1}, "warmup"), ({"timeout_s": 0}, "timeout_s"),
                       ({"manifest": {"artifact_id": "b"}}, "artifact_id"), ({"signature": "x"}, "signature")):
        with pytest.raises(ProtocolError, match=words):
            proto.TrialRequest.from_args({**request.to_args(), **bad})
    with pytest.raises(ProtocolError, match="lacks"):
        proto.TrialRequest.from_args({"artifact_id": "a"})
