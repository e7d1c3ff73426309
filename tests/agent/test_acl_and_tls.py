"""Per-device pattern ACLs and TLS, tested by what arrives (Mosquitto's denials are silent)."""
from __future__ import annotations

import ssl
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as proto
from tests.agent.conftest import BUILDER_PASSWORD, DEVICES, WAIT_S, agent_config, make_artifact
from tests.support.broker import MosquittoBroker

pytestmark = pytest.mark.mosquitto


class Recorder:
    def __init__(self, port: int, username: str, password: str, subscriptions: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{username}-{time.time_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for topic in subscriptions:
            self._subscribed.clear()
            self.client.subscribe(topic, qos=1)
            assert self._subscribed.wait(60)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(60)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_device_cannot_read_other_devices_nor_publish_a_desired_deployment(broker):
    dev1 = Recorder(broker.port, "dev1", DEVICES["dev1"], [f"{proto.DEVICES_ROOT}/dev1/down/#"])
    dev2 = Recorder(broker.port, "dev2", DEVICES["dev2"], [f"{proto.DEVICES_ROOT}/dev1/#", f"{proto.TOPIC_ROOT}/#"])
    builder = Recorder(broker.port, "builder", BUILDER_PASSWORD, [f"{proto.TOPIC_ROOT}/#"])
    try:
        # The builder deploys to dev1 and dev1 reports: dev2 (subscribed to everything) must see none of it.
        builder.publish(proto.device_topic("dev1", proto.Down.DESIRED), b'{"from":"builder"}', retain=True)
        dev1.publish(proto.device_topic("dev1", proto.Up.TELEMETRY), b'{"from":"dev1"}')
        # dev2 tries to deploy to dev1 and to itself, and to write into dev1's reports: all silently dropped.
        dev2.publish(proto.device_topic("dev1", proto.Down.DESIRED), b'{"from":"dev2-forged"}', retain=True)
        dev2.publish(proto.device_topic("dev2", proto.Down.DESIRED), b'{"from":"dev2-self"}', retain=True)
        dev2.publish(proto.device_topic("dev1", proto.Up.TELEMETRY), b'{"from":"dev2-spoof"}')
        # Positive control: what dev2 may do arrives.
        dev2.publish(proto.device_topic("dev2", proto.Up.TELEMETRY), b'{"from":"dev2-own"}')
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p == b'{"from":"dev2-own"}' for _, p in builder.messages):
            time.sleep(0.05)
        time.sleep(0.5)  # grace for anything forged to arrive (it must not)
        builder_payloads = [p for _, p in builder.messages]
        assert b'{"from":"dev2-own"}' in builder_payloads and b'{"from":"dev1"}' in builder_payloads
        assert not any(b"dev2-forged" in p or b"dev2-self" in p or b"dev2-spoof" in p for p in builder_payloads)
        assert [p for _, p in dev1.messages] == [b'{"from":"builder"}']
        assert not any(t.startswith(f"{proto.DEVICES_ROOT}/dev1/") for t, _ in dev2.messages)
        # A late subscriber sees the builder's retained deployment, not a forged one.
        late = Recorder(broker.port, "dev1", DEVICES["dev1"], [proto.device_topic("dev1", proto.Down.DESIRED)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not late.messages:
            time.sleep(0.05)
        assert [p for _, p in late.messages] == [b'{"from":"builder"}']
        late.close()
    finally:
        for r in (dev1, dev2, builder):
            r.close()


def test_wrong_password_is_refused(broker):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
    client.username_pw_set("dev1", "wrong")
    results = []
    client.on_connect = lambda c, u, f, rc, p: results.append(rc)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    deadline = time.monotonic() + 60
    while not results and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    assert results and results[0].is_failure


def test_agent_pulls_over_tls_with_client_certificate(tmp_path, signing_key, host_factory, running_agents):
    key, pub = signing_key
    with MosquittoBroker(devices=DEVICES, builder_password=BUILDER_PASSWORD, tls=True, require_client_cert=True) as b:
        artifact = make_artifact(tmp_path / "art", key, seed=1)
        host = host_factory(b.url)
        certs = b.certs
        cfg = agent_config(b.tls_url, "dev1", DEVICES["dev1"], pub, tmp_path / "data", ca_file=str(certs.ca_file),
                           client_cert=str(certs.client_cert), client_key=str(certs.client_key))
        assert cfg.broker.tls and cfg.broker.host == "localhost"
        agent = running_agents(cfg)
        desired = host.deploy("dev1", artifact)
        host.wait_progress("dev1", desired.artifact_id, ("active",))
        assert agent.conn.protocol_in_use == "5"
        # Without the client certificate the TLS handshake is refused.
        plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="nocert", protocol=mqtt.MQTTv5)
        plain.tls_set(ca_certs=str(certs.ca_file), cert_reqs=ssl.CERT_REQUIRED)
        plain.username_pw_set("dev1", DEVICES["dev1"])
        with pytest.raises((ssl.SSLError, OSError)):
            plain.connect("localhost", b.tls_port)
            for _ in range(20):
                plain.loop(0.1)
                if plain.is_connected():
                    break
            assert not plain.is_connected()
            raise ssl.SSLError("not connected")


def test_agent_speaks_mqtt_311_with_persistent_session(tmp_path, broker, signing_key, host_factory, running_agents):
    key, pub = signing_key
    artifact = make_artifact(tmp_path / "art", key, seed=1)
    host = host_factory(broker.url)
    agent = running_agents(agent_config(broker.url, "dev1", DEVICES["dev1"], pub, tmp_path / "data",
                                        mqtt_protocol="3.1.1"))
    desired = host.deploy("dev1", artifact)
    host.wait_progress("dev1", desired.artifact_id, ("active",))
    assert agent.conn.protocol_in_use == "3.1.1"
    # The last will: an abrupt disconnect publishes the retained "offline" status.
    agent.conn._paho.socket().close()  # white box: drop the socket without a DISCONNECT
    host.wait(lambda: any(b'"state":"offline"' in p for p in host.of_kind("dev1", "up/status")), WAIT_S, "last will")


def test_tls_socket_is_only_touched_by_the_mqtt_thread_while_other_threads_publish():
    """OpenSSL forbids two threads in one SSL object; paho 2.x without loop_start() writes a publish
    from the calling thread while the MQTT thread reads. Every write must happen on the MQTT thread."""
    from agent.config import BrokerSettings
    from agent.connection import agent_connection

    with MosquittoBroker(devices=DEVICES, builder_password=BUILDER_PASSWORD, tls=True) as b:
        settings = BrokerSettings(host="localhost", port=b.tls_port, tls=True, username="dev1", password=DEVICES["dev1"],
                                  ca_file=b.certs.ca_file, client_cert=None, client_key=None, protocol="5",
                                  keepalive_s=5, reconnect_min_s=0.2, reconnect_max_s=1.0)
        builder = Recorder(b.port, "builder", BUILDER_PASSWORD, [f"{proto.DEVICES_ROOT}/dev1/up/#"])
        conn = agent_connection("dev1", settings)
        writers: set[str] = set()
        try:
            conn.start()
            assert conn.wait_connected(WAIT_S)
            real_loop_write = conn._paho.loop_write  # white box: record which threads write the socket

            def recording_loop_write():
                writers.add(threading.current_thread().name)
                return real_loop_write()

            conn._paho.loop_write = recording_loop_write
            topic = proto.device_topic("dev1", proto.Up.TELEMETRY)
            threads = [threading.Thread(target=lambda i=i: [conn.publish(topic, f"{i}-{n}".encode()).wait(WAIT_S)
                                                           for n in range(50)], name=f"worker-{i}") for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and len(builder.messages) < 150:
                time.sleep(0.05)
            assert len(builder.messages) == 150  # every publish went out...
            assert writers == {"mqtt"}, writers  # ...written by the MQTT thread only
        finally:
            conn.stop()
            builder.close()
