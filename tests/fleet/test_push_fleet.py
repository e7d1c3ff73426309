"""Fleet pushes on a real Mosquitto with a real `builder serve` (in this process) and 20 real agents
(``agent.daemon.Agent`` in threads): `builder push --all` with a canary, a group push through
``push_fleet``, two pushes at the same instant, and progress routed by (device, deployment)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as proto
from tests.fleet.conftest import builder_cli, wait_for
from tests.support.broker import MosquittoBroker, mosquitto_available

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")]

PROFILE = "x86-64-host"
DEVICES = [f"dev-{i:02d}" for i in range(20)]


class PushWorld:
    """Mosquitto + FleetServer + agents in this process; torn down in reverse."""

    def __init__(self, home, tmp_path: Path) -> None:
        from builder.fleet.transport.link import BrokerEndpoint
        from builder.fleet.transport.serve import FleetServer, ServeSettings
        from builder.fleet.transport.store import open_store

        self.home = home
        self.broker = MosquittoBroker().start()
        self.endpoint = BrokerEndpoint(self.broker.url)
        with open_store(home.root) as store:
            for i, device_id in enumerate(DEVICES):
                store.register_device(device_id, PROFILE, group="even" if i % 2 == 0 else "odd")
        self.server = FleetServer(ServeSettings(data_dir=home.root, broker=self.endpoint)).start()
        self.agents: list = []
        self.tmp_path = tmp_path

    def start_agents(self, device_ids: list[str]) -> None:
        from agent.config import config_from_dict
        from agent.daemon import Agent

        for device_id in device_ids:
            cfg = config_from_dict({"device_id": device_id, "broker_url": self.broker.url, "password": "x",
                                    "trusted_key": str(self.home.keys.public), "data_dir": str(self.tmp_path / device_id),
                                    "http_port": 0, "telemetry_interval_s": 60.0, "threads": 1, "reconnect_min_s": 0.2,
                                    "reconnect_max_s": 1.0, "chunk_timeout_s": 5.0, "profile": PROFILE})
            self.agents.append(Agent(cfg).start())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            online = {d.device_id for d in self.store_devices() if d.online}
            if set(device_ids) <= online:
                return
            time.sleep(0.1)
        raise AssertionError(f"agents not online: {sorted(set(device_ids) - online)}")

    def store_devices(self):
        from builder.fleet.transport.store import open_store

        with open_store(self.home.root) as store:
            return store.devices()

    def link(self):
        from builder.fleet.transport.link import FleetLink

        return FleetLink(self.endpoint).connect()

    def close(self) -> None:
        stopping = [threading.Thread(target=agent.stop) for agent in self.agents]  # ~0.5 s each: all at once
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join(60)
        self.server.stop()
        self.broker.close()


@pytest.fixture
def world(fleet_home, tmp_path: Path):
    w = PushWorld(fleet_home, tmp_path)
    yield w
    w.close()


def _active_deployments(home: Path, expected: dict[str, str]) -> dict[str, set[str]]:
    """Per device, the deployment ids serve recorded as "active" (from the devices' own progress),
    once serve has stored each ``expected`` one (serve ingests the same messages the push saw, on
    its own thread, so it may be a moment behind)."""
    from builder.fleet.transport.store import open_store

    def read() -> dict[str, set[str]] | None:
        with open_store(home) as store:
            seen = {d: {e.deployment_id for e in store.events(d, kinds=("active",)) if e.deployment_id} for d in DEVICES}
        return seen if all(dep in seen[d] for d, dep in expected.items()) else None

    return wait_for(read, 30, f"serve to store the active events of {sorted(expected)}")


@pytest.mark.timeout(300)
def test_push_all_with_a_canary_then_a_group_then_two_pushes_at_once(world, fleet_home) -> None:
    from builder.fleet.rollout.push import PushOptions, Pusher, push_fleet
    from builder.fleet.transport.store import open_store

    v1 = fleet_home.artifact(PROFILE, version="1")
    v2 = fleet_home.artifact(PROFILE, version="2", width=12)
    world.start_agents(DEVICES[:-1])  # the last one stays offline: "pending", never a timeout

    # 1. `builder push --all`: one process for the whole fleet; 10% canaries first, then the rest
    result = builder_cli("push", "--all", "--artifact", v1, "--canary", "10%", "--benchmark-runs", "0", "--json",
                         "--broker", world.broker.url, home=fleet_home.root)
    report = json.loads(result.stdout)
    states = {o["device_id"]: o["state"] for o in report["outcomes"]}
    assert states == {**{d: "active" for d in DEVICES[:-1]}, DEVICES[-1]: "pending"}, result.stderr
    assert report["canary"]["proceed"]
    assert [o["device_id"] for o in report["outcomes"][:2]] == DEVICES[:2]  # ⌈10% of 19 online⌉ canaries first
    ids = [o["deployment_id"] for o in report["outcomes"]]
    assert len(set(ids)) == len(DEVICES)
    # each device was judged on its own deployment's progress, which serve stored too
    _active_deployments(fleet_home.root, {o["device_id"]: o["deployment_id"] for o in report["outcomes"][:-1]})
    with open_store(fleet_home.root) as store:  # the push as the dashboard's pushes table shows it
        (logged,) = store.pushes()
    assert (logged.target, logged.state, logged.plan["stage"]) == ("all", "done", "fleet")
    assert logged.plan["canaries"] == DEVICES[:2] and logged.plan["devices"] == sorted(DEVICES)

    # 2. push_fleet (the benchable API) to one group, in this process
    with open_store(fleet_home.root) as store, world.link() as link:
        odd = [d.device_id for d in store.devices(group="odd")]
        fleet = push_fleet(link, store, fleet_home.registry, fleet_home.root, odd, v2)
    assert {o.device_id: o.state for o in fleet.outcomes} == {**{d: "active" for d in odd[:-1]}, odd[-1]: "pending"}
    assert all(o.previous_artifact_id == v1 for o in fleet.outcomes[:-1]) and fleet.ok

    # 3. two pushes started at the same instant, from two builder connections: each device its own id
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def push_one(device_id: str, artifact_id: str) -> None:
        with open_store(fleet_home.root) as store, world.link() as link:
            pusher = Pusher(link, store, fleet_home.registry, fleet_home.root, PushOptions(benchmark_runs=0))
            barrier.wait()
            outcomes[device_id] = pusher.push(device_id, artifact_id)

    threads = [threading.Thread(target=push_one, args=(d, v2)) for d in ("dev-00", "dev-02")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    a, b = outcomes["dev-00"], outcomes["dev-02"]
    assert (a.state, b.state) == ("active", "active")  # type: ignore[attr-defined]
    assert a.deployment_id != b.deployment_id  # type: ignore[attr-defined]
    active = _active_deployments(fleet_home.root, {"dev-00": a.deployment_id, "dev-02": b.deployment_id})  # type: ignore[attr-defined]
    assert a.deployment_id not in active["dev-02"] and b.deployment_id not in active["dev-00"]  # type: ignore[attr-defined]


def _device_client(port: int, device_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(5)
    return client


def test_progress_reaches_only_the_watcher_of_that_device_and_deployment() -> None:
    from builder.fleet.rollout.watch import DeviceWatch
    from builder.fleet.transport.link import BrokerEndpoint, FleetLink

    with MosquittoBroker() as broker:
        endpoint = BrokerEndpoint(broker.url)
        with FleetLink(endpoint).connect() as link_a, FleetLink(endpoint).connect() as link_b:
            watch_a, watch_b = DeviceWatch(link_a), DeviceWatch(link_b)
            shared = "same-id"  # the old ids collided like this
            qa = watch_a.follow("dev-a", shared)
            qb = watch_b.follow("dev-b", shared)
            dev_a, dev_b = _device_client(broker.port, "dev-a"), _device_client(broker.port, "dev-b")
            try:
                def send(client: mqtt.Client, device_id: str, deployment_id: str, state: str) -> None:
                    message = proto.TransferProgress(deployment_id=deployment_id, artifact_id="art", state=state)
                    client.publish(proto.device_topic(device_id, proto.Up.PROGRESS), message.to_json(),
                                   qos=1).wait_for_publish(5)

                send(dev_b, "dev-b", shared, "failed")  # dev-b's failure: never dev-a's outcome
                send(dev_a, "dev-a", "other", "failed")  # dev-a, another deployment: nobody follows it
                send(dev_a, "dev-a", shared, "active")
                got_a = qa.get(timeout=10)
                got_b = qb.get(timeout=10)
                assert (got_a.state, got_b.state) == ("active", "failed")
                time.sleep(0.3)
                assert qa.empty() and qb.empty()
                assert watch_a.misrouted == 2 and watch_b.misrouted == 2  # each saw the other two and dropped them
            finally:
                for client in (dev_a, dev_b):
                    client.disconnect()
                    client.loop_stop()


def test_a_fleet_asking_for_an_uncompressed_payload_at_once_costs_one_compression(fleet_home, tmp_path: Path) -> None:
    from agent.mqtt import ClientSettings, MqttClient, MqttVersion
    from builder.fleet.transport.chunk_server import ChunkServer
    from builder.fleet.transport.serve import ArtifactDirectories

    artifact = fleet_home.artifact(PROFILE, version="1")
    payload = fleet_home.registry.manifest(artifact).payloads[0].name
    devices = [f"dev-{i:02d}" for i in range(30)]
    with MosquittoBroker() as broker:
        def client(name: str) -> MqttClient:
            return MqttClient(ClientSettings("127.0.0.1", broker.port, name, version=MqttVersion.V311,
                                             max_inflight=64)).connect(10)

        host, listener = client("host"), client("listener")
        frames: dict[str, list[proto.ChunkFrame]] = {d: [] for d in devices}
        done = threading.Event()

        def on_frame(topic: str, data: bytes) -> None:
            frames[proto.parse_device_topic(topic)[0]].append(proto.decode_chunk_frame(data))
            if all(frames[d] for d in devices):
                done.set()

        listener.subscribe(proto.all_devices_topic(proto.Down.CHUNKS), on_frame)
        server = ChunkServer(host, ArtifactDirectories(fleet_home.registry, tmp_path / "serve-cache"))
        try:
            for device_id in devices:  # as the network thread would: one after the other, before any is served
                request = proto.ChunkRequest(request_id=f"r-{device_id}", artifact_id=artifact, payload=payload,
                                             start_index=0, count=64)
                server.on_request(proto.device_topic(device_id, proto.Up.CHUNK_REQUEST), request.to_json())
            assert done.wait(30), f"unanswered: {[d for d in devices if not frames[d]]}"
        finally:
            host.stop()
            listener.stop()
    assert server.payloads_loaded == 1  # not one compression (and one thread) per device
    for device_id in devices:
        frame = frames[device_id][0]
        frame.verify()
        assert (frame.header.request_id, frame.header.index, frame.header.error) == (f"r-{device_id}", 0, None)
