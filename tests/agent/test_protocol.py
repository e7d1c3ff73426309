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
    command = proto.Command.from_json(proto.Command.of("r", request).to_json())
    assert command.command == "trial" and "schema" not in command.args and command.parsed_args() == request
    desired = request.as_desired("trial-x")
    assert desired.artifact_id == request.artifact_id and desired.manifest == manifest
    for bad, words in (({"runs": 0}, "runs"), ({"warmup": -1}, "warmup"), ({"timeout_s": 0}, "timeout_s"),
                       ({"manifest": {"artifact_id": "b"}}, "artifact_id"), ({"signature": "x"}, "signature")):
        with pytest.raises(ProtocolError, match=words):
            proto.TrialRequest.from_payload({**request.to_payload(), **bad})
    with pytest.raises(ProtocolError, match="lacks"):
        proto.TrialRequest.from_payload({"artifact_id": "a"})


# The dict shapes hosts sent before the typed arguments (builder/fleet/push.py, cli/policy.py,
# fleet/trial.py): an old agent must read exactly these bytes, and a new agent an old host's.
LEGACY_COMMAND_ARGS = [
    (proto.StatusArgs(), "status", {}),
    (proto.BenchmarkArgs(runs=20, warmup=2), "benchmark", {"runs": 20, "warmup": 2}),
    (proto.RollbackArgs(reason="builder fleet rollback"), "rollback", {"reason": "builder fleet rollback"}),
    (proto.SetTelemetryIntervalArgs(seconds=60), "set_telemetry_interval", {"seconds": 60}),
    (proto.SetTelemetryIntervalArgs(seconds=0.5), "set_telemetry_interval", {"seconds": 0.5}),
    (proto.SetLoadArgs(slowdown_factor=4.0), "set_load", {"slowdown_factor": 4.0}),
    (proto.SetLoadArgs(slowdown_factor=2.0, cpu_burn_threads=1, cpu_burn_duty=0.5), "set_load",
     {"slowdown_factor": 2.0, "cpu_burn_threads": 1, "cpu_burn_duty": 0.5}),
]


@pytest.mark.parametrize("args, name, legacy", LEGACY_COMMAND_ARGS)
def test_command_args_round_trip_and_keep_the_wire_format(args, name, legacy):
    assert args.COMMAND == name and args.to_payload() == legacy
    typed = proto.Command.of("r1", args, ts=1.5)
    untyped = proto.Command(request_id="r1", command=name, args=legacy, ts=1.5)
    assert typed.to_json() == untyped.to_json()  # byte for byte what the host sent before
    received = proto.Command.from_json(untyped.to_json())
    assert received.parsed_args() == args and type(received.parsed_args()) is type(args)


def test_every_command_has_typed_args():
    assert set(proto.COMMANDS) == set(proto.COMMAND_ARGS) == {
        "benchmark", "rollback", "status", "set_telemetry_interval", "set_load", "trial"}
    assert proto.BenchmarkArgs.from_payload({}) == proto.BenchmarkArgs(runs=50, warmup=5)  # an old host's defaults
    assert proto.RollbackArgs.from_payload({}).reason == "rollback command"
    assert proto.SetLoadArgs.from_payload({"slowdown_factor": 3, "future_field": 1}) == proto.SetLoadArgs(slowdown_factor=3)


@pytest.mark.parametrize("cls, payload, words", [
    (proto.BenchmarkArgs, {"runs": "20"}, "runs"),
    (proto.BenchmarkArgs, {"runs": 0}, "runs"),
    (proto.BenchmarkArgs, {"warmup": True}, "warmup"),
    (proto.RollbackArgs, {"reason": 3}, "reason"),
    (proto.SetTelemetryIntervalArgs, {}, "lacks"),
    (proto.SetTelemetryIntervalArgs, {"seconds": 0}, "seconds"),
    (proto.SetLoadArgs, {"slowdown_factor": "fast"}, "slowdown_factor"),
    (proto.SetLoadArgs, {"cpu_burn_threads": 1.5}, "cpu_burn_threads"),
])
def test_bad_command_args_raise_protocol_error(cls, payload, words):
    with pytest.raises(ProtocolError, match=words):
        cls.from_payload(payload)
    with pytest.raises(ProtocolError, match="object"):
        cls.from_payload(["not", "an", "object"])  # type: ignore[arg-type]


def test_host_refuses_to_send_malformed_args():
    with pytest.raises(ProtocolError, match="seconds"):
        proto.Command.of("r", proto.SetTelemetryIntervalArgs(seconds=-1))
