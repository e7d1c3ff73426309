"""No telemetry lost, end to end: a real Mosquitto, `FleetServer` in this process, and devices that
send through the agent's own outbox code (``TelemetryOutbox`` + ``TelemetrySender`` + ``AckWindow``
over the agent's ``MqttClient``), many of them in one process."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent import protocol as proto
from agent.mqtt import ClientSettings, MqttClient, MqttVersion, Will
from agent.telemetry import TelemetryOutbox, TelemetrySender
from tests.support.broker import MosquittoBroker, mosquitto_available
from tests.support.processes import wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")]

BUILDER_PW = "pw-builder"


class Device:
    """One device's telemetry path, as the agent wires it: hello with the incarnation on connect,
    ``down/ack`` into the sender, reports into the SQLite outbox."""

    def __init__(self, device_id: str, password: str, broker: MosquittoBroker, data_dir: Path,
                 resend_after_s: float = 1.0) -> None:
        self.device_id = device_id
        self.outbox = TelemetryOutbox(data_dir / device_id / "telemetry.db")
        settings = ClientSettings(host="127.0.0.1", port=broker.port, client_id=device_id, username=device_id,
                                  password=password, version=MqttVersion.V5, persistent_session=True,
                                  reconnect_min_s=0.2, reconnect_max_s=1.0,
                                  will=Will(proto.device_topic(device_id, proto.Up.STATUS), b"", retain=False))
        self.client = MqttClient(settings, on_connect=self._on_connect)
        topic = proto.device_topic(device_id, proto.Up.TELEMETRY)
        self.sender = TelemetrySender(self.outbox, lambda body: self.client.publish(topic, body, qos=1),
                                      lambda: self.client.connected, resend_after_s=resend_after_s)
        self.client.subscribe(proto.device_topic(device_id, proto.Down.ACK), lambda t, p: self.sender.on_ack(p))
        self.sent_seqs: list[int] = []

    def _on_connect(self) -> None:
        self.sender.on_connect()
        hello = proto.Hello(device_id=self.device_id, agent_version="test", incarnation=self.outbox.incarnation,
                            ts=proto.now_s())
        self.client.publish(proto.device_topic(self.device_id, proto.Up.HELLO), hello.to_json())

    def report(self) -> int:
        seq = self.outbox.next_seq()
        self.outbox.put(proto.TelemetryReport(device_id=self.device_id, seq=seq, ts=proto.now_s(), event="periodic",
                                              requests=1, incarnation=self.outbox.incarnation))
        self.sent_seqs.append(seq)
        return seq

    def close(self) -> None:
        self.client.stop()
        self.outbox.close()


class Fleet:
    """Devices plus one thread pumping every outbox (as each agent's telemetry loop does)."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self) -> None:
        while not self._stop.wait(0.05):
            for device in self.devices:
                device.sender.pump()

    def start(self) -> "Fleet":
        """Devices come up one after the other (a hello lost in a burst would leave a device in the
        PUBACK mode of agents that never met an acking host, until its first ack)."""
        for device in self.devices:
            device.client.start()
            wait_for(lambda d=device: d.sender.host_acks, 30, f"{device.device_id} to learn the host acks", 0.02)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for device in self.devices:
            device.close()


def _server(broker: MosquittoBroker, home: Path):
    from builder.fleet.transport.link import BrokerEndpoint
    from builder.fleet.transport.serve import FleetServer, ServeSettings

    return FleetServer(ServeSettings(data_dir=home, broker=BrokerEndpoint(broker.url, "builder", BUILDER_PW))).start()


def _stored_seqs(server, device_id: str, incarnation: str) -> list[int]:
    return sorted(r.seq for r in server.store.telemetry(device_id) if r.incarnation == incarnation)


def test_a_fleet_wide_flush_larger_than_the_broker_queue_is_stored_completely(tmp_path: Path) -> None:
    """30 devices x 50 buffered reports at once (1,500) into a broker that queues at most 100
    messages (+ 10 in flight) for serve: Mosquitto drops the overflow for serve while every device
    gets its PUBACK. The dropped reports are never acked, so they are sent again: stored == sent."""
    names = [f"dev-{i:02d}" for i in range(30)]
    broker = MosquittoBroker(devices={n: f"pw-{n}" for n in names}, builder_password=BUILDER_PW,
                             extra_lines=("max_queued_messages 100", "max_inflight_messages 10")).start()
    server = _server(broker, tmp_path / "home")
    fleet = Fleet([Device(n, f"pw-{n}", broker, tmp_path / "devices") for n in names]).start()
    try:
        wait_for(lambda: all(d.sender.host_acks for d in fleet.devices), 60, "every device to learn the host acks")
        for _ in range(50):
            for device in fleet.devices:
                device.report()
        wait_for(lambda: all(len(d.outbox) == 0 for d in fleet.devices), 120,
                 "every outbox to be acknowledged empty", 0.5)
        for device in fleet.devices:
            assert _stored_seqs(server, device.device_id, device.outbox.incarnation) == list(range(50))
        assert sum(server.store.telemetry_missing().values()) == 0
        resent = sum(d.sender.stats().resent for d in fleet.devices)
        assert resent > 0, "the broker dropped nothing: the test did not exercise a lossy flush"
    finally:
        fleet.close()
        server.stop()
        broker.close()


def test_reports_buffered_through_a_broker_restart_are_all_stored(tmp_path: Path) -> None:
    """The broker goes away; devices keep reporting into their outboxes; the broker comes back and
    the devices flush at once, typically before serve has reconnected and subscribed again (serve's
    session is clean, so the broker drops those): acks decide, and everything ends up stored."""
    names = ["pi-a", "pi-b", "pi-c"]
    broker = MosquittoBroker(devices={n: f"pw-{n}" for n in names}, builder_password=BUILDER_PW).start()
    server = _server(broker, tmp_path / "home")
    fleet = Fleet([Device(n, f"pw-{n}", broker, tmp_path / "devices") for n in names]).start()
    try:
        wait_for(lambda: all(d.sender.host_acks for d in fleet.devices), 30, "the devices to learn the host acks")
        for device in fleet.devices:
            device.report()
        wait_for(lambda: all(len(d.outbox) == 0 for d in fleet.devices), 30, "the first reports to be acked")
        broker.stop()
        wait_for(lambda: not any(d.client.connected for d in fleet.devices), 10, "the devices to notice")
        for _ in range(20):
            for device in fleet.devices:
                device.report()
        assert all(len(d.outbox) == 20 for d in fleet.devices)
        broker.start()
        wait_for(lambda: all(len(d.outbox) == 0 for d in fleet.devices), 120,
                 "the buffered reports to be stored and acked")
        for device in fleet.devices:
            assert _stored_seqs(server, device.device_id, device.outbox.incarnation) == list(range(21))
        assert server.store.telemetry_missing() == {n: 0 for n in names}
    finally:
        fleet.close()
        server.stop()
        broker.close()


def test_a_wiped_outbox_is_a_new_incarnation_reported_as_a_reset_not_deduplicated(tmp_path: Path) -> None:
    broker = MosquittoBroker(devices={"pi": "pw-pi"}, builder_password=BUILDER_PW).start()
    server = _server(broker, tmp_path / "home")
    first = Fleet([Device("pi", "pw-pi", broker, tmp_path / "one")]).start()
    try:
        wait_for(lambda: first.devices[0].sender.host_acks, 30, "the device to learn the host acks")
        for _ in range(5):
            first.devices[0].report()
        wait_for(lambda: len(first.devices[0].outbox) == 0, 30, "the reports to be acked")
        old = first.devices[0].outbox.incarnation
        first.close()
        second = Fleet([Device("pi", "pw-pi", broker, tmp_path / "wiped")]).start()  # a fresh data dir
        try:
            new = second.devices[0].outbox.incarnation
            assert new != old
            wait_for(lambda: second.devices[0].sender.host_acks, 30, "the new outbox to learn the host acks")
            for _ in range(3):
                second.devices[0].report()  # seq 0, 1, 2 again: under the old scheme all three were "duplicates"
            wait_for(lambda: len(second.devices[0].outbox) == 0, 30, "the new reports to be acked")
            assert _stored_seqs(server, "pi", old) == [0, 1, 2, 3, 4]
            assert _stored_seqs(server, "pi", new) == [0, 1, 2]
            resets = server.store.events("pi", kinds=("telemetry.reset",))
            assert [(e.detail["incarnation"], e.detail["previous_incarnation"], e.detail["previous_max_seq"])
                    for e in resets] == [(new, old, 4)]
            assert server.store.telemetry_missing("pi") == {"pi": 0}
        finally:
            second.close()
    finally:
        server.stop()
        broker.close()
