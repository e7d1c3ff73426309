"""Fixtures for the agent tests: signing keys, small real ONNX artifacts, a real Mosquitto, a host
side (builder user + chunk server) that records what devices publish."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests.support.broker import MosquittoBroker, mosquitto_available

DEVICES = {"dev1": "pw-dev1", "dev2": "pw-dev2"}
BUILDER_PASSWORD = "pw-builder"
# Default deadline for waits on another thread or process: generous, because on a loaded 2-core
# machine a thread can stall for seconds; a passing wait returns as soon as its condition holds.
WAIT_S = 120.0


def pytest_collection_modifyitems(config, items):
    if not mosquitto_available():
        skip = pytest.mark.skip(reason="mosquitto binary not installed (apt-get install mosquitto)")
        for item in items:
            if "mosquitto" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def signing_key(tmp_path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "trusted.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def build_linear_onnx(path: Path, seed: int, cols: int = 16, rows: int = 8) -> None:
    """y = relu(x @ W + b): a real ONNX model whose size grows with ``cols`` (random weights do not
    compress, so a big one really takes many chunks)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    b = rng.standard_normal((cols,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def make_artifact(dest: Path, private_key: Any, *, seed: int = 0, cols: int = 16, version: str = "1",
                  expected_scale: float = 1.0, profile: str = "x86-64-host") -> Path:
    """Package a signed artifact (model + sample.npz with the model's real outputs) with the builder's
    own packaging. ``expected_scale != 1`` ships wrong expected outputs (fails the health check)."""
    import onnxruntime as ort

    from agent.manifest import Target, TensorSpec
    from builder.artifacts.packaging import package_artifact

    work = dest.parent / f".src-{dest.name}"
    work.mkdir(parents=True, exist_ok=True)
    model_path = work / "model.onnx"
    build_linear_onnx(model_path, seed, cols)
    x = np.random.default_rng(seed + 100).standard_normal((1, 8)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(work / "sample.npz", **{"in:x": x, "out:y": (y * expected_scale).astype(np.float32)})
    package_artifact(dest, {"model.onnx": (model_path, "model"), "sample.npz": (work / "sample.npz", "sample")},
                     model_name="linear", model_version=version,
                     target=Target(profile=profile, runtime="onnxruntime",
                                   execution_providers=("CPUExecutionProvider",), precision="fp32", format="onnx",
                                   runtime_options={"intra_op_num_threads": 1}),
                     inputs=[TensorSpec("x", (1, 8), "float32")], outputs=[TensorSpec("y", (1, cols), "float32")],
                     private_key=private_key)
    return dest


def agent_config(broker_url: str, device_id: str, password: str, trusted_key: Path, data_dir: Path, **extra: Any):
    from agent.config import config_from_dict

    data = {"device_id": device_id, "broker_url": broker_url, "password": password,
            "trusted_key": str(trusted_key), "data_dir": str(data_dir), "http_port": 0,
            "telemetry_interval_s": 60.0, "threads": 1, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
            "chunk_timeout_s": 3.0, "profile": "x86-64-host"}
    data.update(extra)
    return config_from_dict(data)


def agent_toml(path: Path, broker_url: str, device_id: str, password: str, trusted_key: Path, data_dir: Path,
               **extra: Any) -> Path:
    values: dict[str, Any] = {"device_id": device_id, "broker_url": broker_url, "password": password,
                              "trusted_key": str(trusted_key), "data_dir": str(data_dir), "http_port": 0, "threads": 1,
                              "telemetry_interval_s": 60.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                              "chunk_timeout_s": 3.0, "profile": "x86-64-host"}
    values.update(extra)
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Host:
    """The builder side in tests: connects as the builder user, serves chunks, records device messages."""

    def __init__(self, broker_url: str, artifacts: dict[str, Path], *, username: str = "builder",
                 password: str = BUILDER_PASSWORD, chunk_bytes: int | None = None, delay_per_chunk_s: float = 0.0,
                 persistent_session: bool = False) -> None:
        from agent import protocol as proto
        from agent.mqtt import ClientSettings, MqttClient, MqttVersion
        from builder.fleet.transport.chunk_server import ChunkServer

        self.proto = proto
        self.artifacts = artifacts
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        host, port = broker_url.replace("mqtt://", "").split(":")
        # persistent_session as `builder serve` should: reports sent while the host is away are queued.
        self.client = MqttClient(ClientSettings(host, int(port), f"host-{time.time_ns()}", username, password,
                                                version=MqttVersion.V5, persistent_session=persistent_session,
                                                session_expiry_s=3600, max_inflight=64,  # paho's 20 throttles chunks
                                                reconnect_min_s=0.1, reconnect_max_s=0.5))
        kwargs = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
        self.server = ChunkServer(self.client, lambda aid: self.artifacts.get(aid), delay_per_chunk_s=delay_per_chunk_s, **kwargs)
        self.client.subscribe(self.proto.all_devices_topic("up/#"), self._on_message)
        self.client.connect(WAIT_S)

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()
        if topic.endswith("/" + self.proto.Up.CHUNK_REQUEST):
            self.server.on_request(topic, payload)  # looked up per message: tests wrap it

    def of_kind(self, device_id: str, suffix: str) -> list[bytes]:
        topic = self.proto.device_topic(device_id, suffix)
        with self._cond:
            return [p for t, p in self.messages if t == topic]

    def progress(self, device_id: str) -> list:
        return [self.proto.TransferProgress.from_json(p) for p in self.of_kind(device_id, self.proto.Up.PROGRESS)]

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
                self._cond.wait(min(remaining, 0.2))

    def wait_progress(self, device_id: str, artifact_id: str, states: tuple[str, ...], timeout_s: float = WAIT_S):
        def find():
            for p in self.progress(device_id):
                if p.artifact_id == artifact_id and p.state in states:
                    return p
            return None
        return self.wait(find, timeout_s, f"{device_id} reports {states} for {artifact_id[:12]}")

    def deploy(self, device_id: str, artifact_dir: Path, deployment_id: str | None = None):
        from builder.fleet.transport.chunk_server import publish_desired

        message = publish_desired(self.client, device_id, artifact_dir, deployment_id)
        self.artifacts[message.artifact_id] = artifact_dir
        return message

    def command(self, device_id: str, command: str, args: dict | None = None, timeout_s: float = WAIT_S):
        import uuid

        request_id = uuid.uuid4().hex
        msg = self.proto.Command(request_id=request_id, command=command, args=args or {}, ts=self.proto.now_s())
        self.client.publish(self.proto.device_topic(device_id, self.proto.Down.COMMAND), msg.to_json(), qos=1)

        def find():
            for raw in self.of_kind(device_id, self.proto.Up.REPLY):
                reply = self.proto.CommandReply.from_json(raw)
                if reply.request_id == request_id:
                    return reply
            return None
        return self.wait(find, timeout_s, f"reply to {command}")

    def close(self) -> None:
        self.client.stop()


@pytest.fixture
def broker():
    b = MosquittoBroker(devices=DEVICES, builder_password=BUILDER_PASSWORD).start()
    yield b
    b.close()


@pytest.fixture
def host_factory():
    hosts: list[Host] = []

    def make(broker_url: str, artifacts: dict[str, Path] | None = None, **kwargs: Any) -> Host:
        host = Host(broker_url, artifacts if artifacts is not None else {}, **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()


@pytest.fixture
def running_agents():
    agents = []

    def start(cfg):
        from agent.daemon import Agent

        agent = Agent(cfg).start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
