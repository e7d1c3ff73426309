"""The embedded broker (rumqttd via iotcore) carries what a fleet needs, configured as we ship it."""
from __future__ import annotations

import os
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from builder.errors import FleetError
from builder.fleet.transport.embedded_broker import EmbeddedBroker, EmbeddedBrokerSettings, rumqttd_config

pytest.importorskip("iotcore")


def _client(port: int, client_id: str, **kw) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, **kw)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_embedded_broker_config_binds_loopback_and_raises_limits() -> None:
    text = rumqttd_config(EmbeddedBrokerSettings(), 1883, 1884)
    assert 'listen = "127.0.0.1:1883"' in text and 'listen = "127.0.0.1:1884"' in text
    assert "0.0.0.0" not in text
    assert "max_payload_size = 1048576" in text  # rumqttd's 20 KiB default drops chunks silently
    assert "max_segment_size = 33554432" in text


@pytest.mark.timeout(120)
def test_embedded_broker_delivers_large_qos1_messages_in_order_to_a_slow_subscriber_under_churn() -> None:
    count, size = 200, 128 * 1024
    with EmbeddedBroker(EmbeddedBrokerSettings(port=0)) as broker:
        assert broker.url.startswith("mqtt://127.0.0.1:")
        got: list[int] = []
        done, subscribed = threading.Event(), threading.Event()

        def on_message(client, userdata, msg) -> None:
            time.sleep(0.003)  # a lagging subscriber: rumqttd drops what falls out of its in-memory log
            got.append(int.from_bytes(msg.payload[:4], "big"))
            if len(got) == count:
                done.set()

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub", protocol=mqtt.MQTTv311)
        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        sub.subscribe("edgefleet/v1/devices/d1/down/chunks", qos=1)
        assert subscribed.wait(5)
        stop = threading.Event()

        def churn() -> None:
            i = 0
            while not stop.is_set():
                c = _client(broker.port, f"churn-{i % 4}")
                c.subscribe("edgefleet/#", 1)
                c.publish("edgefleet/v1/devices/x/up/telemetry", b"t" * 2000, qos=1)
                time.sleep(0.02)
                c.disconnect()
                c.loop_stop()
                i += 1

        churner = threading.Thread(target=churn)
        churner.start()
        pub = _client(broker.port, "pub")
        try:
            infos = [pub.publish("edgefleet/v1/devices/d1/down/chunks", i.to_bytes(4, "big") + os.urandom(size - 4), qos=1)
                     for i in range(count)]
            for info in infos:
                info.wait_for_publish(30)
            assert done.wait(60), f"received {len(got)} of {count}"
        finally:
            stop.set()
            churner.join()
            for c in (pub, sub):
                c.disconnect()
                c.loop_stop()
        assert got == list(range(count))


def test_embedded_broker_keeps_retained_desired_state_and_publishes_last_will() -> None:
    with EmbeddedBroker(EmbeddedBrokerSettings(port=0)) as broker:
        host = _client(broker.port, "host")
        host.publish("edgefleet/v1/devices/d1/down/desired", b"x" * 60_000, qos=1, retain=True).wait_for_publish(5)
        seen: list[tuple[str, int, bool]] = []
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="d1", protocol=mqtt.MQTTv311)
        dev.on_message = lambda c, u, m: seen.append((m.topic, len(m.payload), m.retain))
        dev.will_set("edgefleet/v1/devices/d1/up/status", b"offline", qos=1, retain=True)
        dev.connect("127.0.0.1", broker.port, keepalive=2)
        dev.loop_start()
        dev.subscribe("edgefleet/v1/devices/d1/down/#", 1)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [("edgefleet/v1/devices/d1/down/desired", 60_000, True)]
        wills: list[bytes] = []
        host.on_message = lambda c, u, m: wills.append(m.payload)
        host.subscribe("edgefleet/v1/devices/+/up/status", 1)
        time.sleep(0.3)
        dev.loop_stop()
        dev._sock.close()  # vanish without DISCONNECT: the broker must publish the will
        deadline = time.monotonic() + 10
        while not wills and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wills == [b"offline"]
        host.disconnect()
        host.loop_stop()


def test_embedded_broker_port_in_use_is_a_clear_error() -> None:
    with EmbeddedBroker(EmbeddedBrokerSettings(port=0)) as first:
        with pytest.raises(FleetError, match="--port"):
            EmbeddedBroker(EmbeddedBrokerSettings(port=first.port)).start()


@pytest.mark.parametrize("listen", ["0.0.0.0", "192.168.1.10", "::"])
def test_serve_refuses_to_open_the_embedded_broker_to_the_lan(tmp_path, listen: str) -> None:
    from tests.fleet.conftest import builder_cli

    result = builder_cli("serve", "--listen", listen, "--port", "0", home=tmp_path, check=False, timeout_s=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no passwords or ACLs" in lines[0] and "--broker-config-dir" in lines[0]
    assert not (tmp_path / "serve.json").exists()  # nothing started
