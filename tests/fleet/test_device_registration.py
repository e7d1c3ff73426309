"""Who is in the fleet: a re-added id keeps its broker password (a running device stays
authorised), `remove-device` takes its Mosquitto user away, and a client that connects to the
embedded broker without `add-device` is listed as unregistered and refused by push."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as proto
from tests.fleet.conftest import Mosquitto, builder_cli, free_port, store_status, wait_for
from tests.support.broker import mosquitto_available


def _can_connect(port: int, user: str, password: str) -> bool:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}", protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)
    answer: dict = {}
    done = threading.Event()

    def on_connect(c, u, f, rc, p) -> None:
        answer["ok"] = not rc.is_failure
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return bool(answer["ok"])
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.mosquitto
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")
@pytest.mark.timeout(120)
def test_re_adding_keeps_the_password_and_remove_device_revokes_the_broker_user(fleet_home, world_readable_dir: Path) -> None:
    home, broker_dir, port = fleet_home.root, world_readable_dir / "broker", free_port()
    add = ("fleet", "add-device", "pi-01", "--profile", "raspberry-pi-4", "--broker-config-dir", str(broker_dir),
           "--broker-port", str(port))
    builder_cli(*add, home=home)
    folder = home / "devices" / "pi-01"
    password = (folder / "password").read_text().strip()
    assert 'password_file = "password"' in (folder / "agent.toml").read_text()
    broker = Mosquitto(broker_dir / "mosquitto.conf", [port]).start()
    try:
        assert _can_connect(port, "pi-01", password)
        again = builder_cli(*add, home=home, check=False)
        assert again.returncode != 0 and "--force" in again.stderr
        broker.reload()
        assert _can_connect(port, "pi-01", password)  # the running device is still authorised
        builder_cli("fleet", "remove-device", "pi-01", home=home)
        broker.reload()
        assert not _can_connect(port, "pi-01", password)
        assert "pi-01" not in (broker_dir / "passwd").read_text() and not folder.exists()
        assert "pi-01" not in store_status(home)
    finally:
        broker.stop()


@pytest.mark.timeout(120)
def test_unregistered_client_on_the_embedded_broker_is_marked_and_push_refuses_it(fleet_home) -> None:
    pytest.importorskip("iotcore")
    from builder.errors import UsageError
    from builder.fleet.rollout.push import Pusher
    from builder.fleet.rollout.status import status_cells, collect_status
    from builder.fleet.transport.embedded_broker import EmbeddedBrokerSettings
    from builder.fleet.transport.link import BrokerEndpoint, FleetLink
    from builder.fleet.transport.serve import FleetServer, ServeSettings
    from builder.fleet.transport.store import open_store

    artifact = fleet_home.artifact("raspberry-pi-4")
    with FleetServer(ServeSettings(data_dir=fleet_home.root, embedded=EmbeddedBrokerSettings(port=0))) as server:
        rogue = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rogue-1", protocol=mqtt.MQTTv311)
        rogue.connect("127.0.0.1", server.embedded.port)
        rogue.loop_start()
        try:
            hello = proto.Hello(device_id="rogue-1", agent_version="0.1.0", profile="raspberry-pi-4", ts=proto.now_s())
            rogue.publish(proto.device_topic("rogue-1", proto.Up.HELLO), hello.to_json(), qos=1).wait_for_publish(10)
            row = wait_for(lambda: store_status(fleet_home.root).get("rogue-1"), 30, "the hello to be stored")
            assert row["registered"] is False
            with open_store(fleet_home.root) as store:
                cells = status_cells(next(r for r in collect_status(store, time.time()) if r.device_id == "rogue-1"))
                assert cells[1] == "unregistered"
                with FleetLink(BrokerEndpoint(server.embedded.url)).connect() as link:
                    with pytest.raises(UsageError, match="not registered"):
                        Pusher(link, store, fleet_home.registry, fleet_home.root).push("rogue-1", artifact)
                assert store.events("rogue-1") == []  # nothing was published for it
        finally:
            rogue.loop_stop()
            rogue.disconnect()
