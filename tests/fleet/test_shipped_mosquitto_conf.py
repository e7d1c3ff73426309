"""deploy/mosquitto.conf and deploy/acl start a real Mosquitto as shipped (only paths and ports
substituted), and the ACL'd users connect: the builder over loopback, a device over TLS."""
from __future__ import annotations

import os
import shutil
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as proto
from tests.fleet.conftest import Mosquitto, free_port
from tests.support.broker import make_test_certs, mosquitto_available

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEVICE, DEVICE_PW, OTHER, OTHER_PW, BUILDER_PW = "pi-kitchen-01", "pw-pi", "pi-hall-02", "pw-hall", "pw-builder"


def shipped_config_for(workdir: Path, port: int, tls_port: int) -> Path:
    """The shipped file with /etc/mosquitto/edgefleet and /var/lib/mosquitto moved into ``workdir``
    and the two listeners on free loopback ports; nothing else changed."""
    text = (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8")
    text = text.replace("/etc/mosquitto/edgefleet/", f"{workdir}/").replace("/var/lib/mosquitto/", f"{workdir}/db/")
    text = text.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    text = text.replace("listener 8883 0.0.0.0", f"listener {tls_port} 127.0.0.1")
    assert str(port) in text and str(tls_port) in text and "/etc/" not in text.replace("# ", "#").split("#")[0]
    path = workdir / "mosquitto.conf"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)
    return path


def _client(port: int, user: str, password: str, tls_ca: Path | None = None) -> tuple[mqtt.Client, list]:
    messages: list[tuple[str, bytes]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.time_ns()}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    if tls_ca is not None:
        client.tls_set(ca_certs=str(tls_ca), cert_reqs=ssl.CERT_REQUIRED)
    result: dict = {}
    connected = threading.Event()

    def on_connect(c, u, f, rc, p) -> None:
        result["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: messages.append((m.topic, bytes(m.payload)))
    client.connect("localhost" if tls_ca else "127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), f"{user}: no CONNACK"
    if result["rc"].is_failure:
        client.loop_stop()
        raise ConnectionRefusedError(str(result["rc"]))
    return client, messages


def test_shipped_config_has_no_trailing_comments() -> None:
    for line in (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        assert stripped.startswith("#") or "#" not in stripped, f"Mosquitto would read this comment as a value: {line!r}"


@pytest.mark.timeout(120)
def test_shipped_mosquitto_conf_starts_and_the_acl_confines_devices(world_readable_dir: Path) -> None:
    from builder.fleet.transport.broker_config import write_password_file

    work = world_readable_dir
    certs = make_test_certs(work)  # ca.pem, server.pem, server.key: the names the shipped file uses
    shutil.copyfile(DEPLOY / "acl", work / "acl")
    os.chmod(work / "acl", 0o644)
    write_password_file(work / "passwd", {"builder": BUILDER_PW, DEVICE: DEVICE_PW, OTHER: OTHER_PW})
    (work / "db").mkdir()
    os.chmod(work / "db", 0o777)
    port, tls_port = free_port(), free_port()
    broker = Mosquitto(shipped_config_for(work, port, tls_port), [port, tls_port]).start()
    clients = []
    try:
        builder, seen_by_builder = _client(port, "builder", BUILDER_PW)
        device, seen_by_device = _client(tls_port, DEVICE, DEVICE_PW, tls_ca=certs.ca_file)
        other, seen_by_other = _client(tls_port, OTHER, OTHER_PW, tls_ca=certs.ca_file)
        clients = [builder, device, other]
        with pytest.raises(ConnectionRefusedError):
            _client(tls_port, DEVICE, "wrong", tls_ca=certs.ca_file)
        with pytest.raises(ConnectionRefusedError):
            _client(port, "anonymous-nobody", "")
        builder.subscribe(f"{proto.TOPIC_ROOT}/#", qos=1)
        device.subscribe(proto.device_topic(DEVICE, "down/#"), qos=1)
        other.subscribe(f"{proto.TOPIC_ROOT}/#", qos=1)  # granted, but the ACL delivers only its own down/
        time.sleep(0.5)
        builder.publish(proto.device_topic(DEVICE, proto.Down.DESIRED), b"desired-by-builder", qos=1, retain=True).wait_for_publish(10)
        device.publish(proto.device_topic(DEVICE, proto.Up.TELEMETRY), b"telemetry-of-device", qos=1).wait_for_publish(10)
        other.publish(proto.device_topic(DEVICE, proto.Down.DESIRED), b"forged-by-other", qos=1, retain=True).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (any(p == b"telemetry-of-device" for _, p in seen_by_builder)
                                                   and any(p == b"desired-by-builder" for _, p in seen_by_device)):
            time.sleep(0.05)
        time.sleep(0.5)
        assert any(p == b"telemetry-of-device" for _, p in seen_by_builder)
        assert [p for _, p in seen_by_device] == [b"desired-by-builder"]
        assert not seen_by_other  # neither the builder's deployment nor the device's telemetry
    finally:
        for client in clients:
            client.loop_stop()
            client.disconnect()
        broker.stop()
