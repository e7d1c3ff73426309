"""The shared MQTT client (``agent/mqtt.py``) against a real Mosquitto: a refused SUBACK raises,
publishes carry QoS and retain, connection failures are typed."""
from __future__ import annotations

import threading

import pytest

from agent.errors import MqttConnectError, SubscribeRefusedError
from agent.mqtt import ClientSettings, MqttClient, MqttVersion, Will, topic_matches
from tests.agent.conftest import BUILDER_PASSWORD, DEVICES, WAIT_S
from tests.support.broker import MosquittoBroker, dynsec_plugin, free_port

pytestmark = pytest.mark.mosquitto
needs_dynsec = pytest.mark.skipif(dynsec_plugin() is None, reason="Mosquitto's dynamic-security plugin is not installed")


def _client(port: int, version: MqttVersion = MqttVersion.V5, client_id: str = "c", **kwargs) -> MqttClient:
    return MqttClient(ClientSettings("127.0.0.1", port, client_id, version=version, reconnect_min_s=0.1,
                                     reconnect_max_s=0.5, **kwargs))


@pytest.fixture
def acl_broker():
    with MosquittoBroker(subscribe_allowed=["allowed/#"]) as broker:
        yield broker


@needs_dynsec
@pytest.mark.parametrize("version, code", [(MqttVersion.V5, 0x87), (MqttVersion.V311, 0x80)])
def test_subscribe_raises_when_the_broker_refuses_the_filter(acl_broker, version, code):
    client = _client(acl_broker.port, version).connect(WAIT_S)
    try:
        got: list[bytes] = []
        client.subscribe("allowed/x", lambda topic, payload: got.append(payload))  # the positive control
        with pytest.raises(SubscribeRefusedError, match="denied/#") as refused:
            client.subscribe("denied/#", lambda topic, payload: got.append(b"must not be called"))
        assert refused.value.reason_code == code and refused.value.topic_filter == "denied/#"
        client.publish("allowed/x", b"ok", qos=1).wait(WAIT_S)
        # A refused filter is not kept: a message matching it is handed to no handler.
        client.publish("denied/x", b"nope", qos=1).wait(WAIT_S)
        deadline = threading.Event()
        while not got and not deadline.wait(0.05):
            pass
        assert got == [b"ok"]
    finally:
        client.stop()


@needs_dynsec
def test_refused_subscription_on_connect_is_reported(acl_broker):
    """Filters registered before start() are subscribed in the network thread: a refusal cannot
    raise there, so it lands in last_error (and the log)."""
    client = _client(acl_broker.port)
    client.subscribe("denied/#", lambda topic, payload: None)
    client.start()
    try:
        assert client.wait_connected(WAIT_S)
        deadline = threading.Event()
        while not (client.last_error or "").startswith("subscription to denied/#") and not deadline.wait(0.05):
            pass
        assert "refused" in (client.last_error or "")
    finally:
        client.stop()


def test_publish_with_qos_and_retain_reaches_a_late_subscriber(broker):
    publisher = MqttClient(ClientSettings("127.0.0.1", broker.port, "builder-x", "builder", BUILDER_PASSWORD,
                                          version=MqttVersion.V311)).connect(WAIT_S)
    topic = "edgefleet/v1/devices/dev1/down/desired"
    try:
        assert publisher.publish(topic, b"retained", qos=1, retain=True).wait(WAIT_S)
        device = MqttClient(ClientSettings("127.0.0.1", broker.port, "dev1", "dev1", DEVICES["dev1"])).connect(WAIT_S)
        got: list[tuple[str, bytes]] = []
        arrived = threading.Event()
        device.subscribe("edgefleet/v1/devices/dev1/down/#", lambda t, p: (got.append((t, p)), arrived.set()))
        assert arrived.wait(WAIT_S) and got == [(topic, b"retained")]
        device.stop()
    finally:
        publisher.publish(topic, b"", qos=1, retain=True).wait(WAIT_S)
        publisher.stop()


def test_last_will_fires_on_a_dropped_connection_not_on_stop(broker):
    watcher = MqttClient(ClientSettings("127.0.0.1", broker.port, "watch", "builder", BUILDER_PASSWORD)).connect(WAIT_S)
    seen: list[bytes] = []
    changed = threading.Condition()

    def record(topic: str, payload: bytes) -> None:
        with changed:
            seen.append(payload)
            changed.notify_all()
    watcher.subscribe("edgefleet/v1/devices/dev1/up/status", record)
    will = Will("edgefleet/v1/devices/dev1/up/status", b"offline-by-will", qos=1, retain=False)
    try:
        clean = MqttClient(ClientSettings("127.0.0.1", broker.port, "dev1", "dev1", DEVICES["dev1"], will=will)).connect(WAIT_S)
        clean.stop(final=Will(will.topic, b"offline-by-stop", retain=False))
        dropped = MqttClient(ClientSettings("127.0.0.1", broker.port, "dev1", "dev1", DEVICES["dev1"], will=will,
                                            keepalive_s=5)).connect(WAIT_S)
        dropped._stop.set()  # white box: end the network thread, then drop the socket without a DISCONNECT
        dropped._thread.join(WAIT_S)
        dropped._paho.socket().close()
        with changed:
            assert changed.wait_for(lambda: b"offline-by-will" in seen, WAIT_S)
        assert seen == [b"offline-by-stop", b"offline-by-will"]
    finally:
        watcher.stop()


def test_connect_errors_say_unreachable_or_refused(broker):
    with pytest.raises(MqttConnectError) as unreachable:
        _client(free_port()).connect(5)
    assert not unreachable.value.reachable
    with pytest.raises(MqttConnectError, match="refused") as refused:
        MqttClient(ClientSettings("127.0.0.1", broker.port, "dev1", "dev1", "wrong")).connect(WAIT_S)
    assert refused.value.reachable and refused.value.refused


def test_topic_matches_wildcards():
    assert topic_matches("edgefleet/v1/devices/+/up/#", "edgefleet/v1/devices/d1/up/status")
    assert not topic_matches("edgefleet/v1/devices/+/up/#", "edgefleet/v1/devices/d1/down/cmd")
