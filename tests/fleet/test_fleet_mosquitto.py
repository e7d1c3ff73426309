"""The fleet on a real Mosquitto configured by `builder fleet add-device`: per-device credentials,
pattern ACL, TLS; group push with a canary, an offline device, a canary that regresses, a model
that fails the device's health check."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as proto
from tests.fleet.conftest import (PY, Mosquitto, agent_http_url, builder_cli, free_port, infer, start_agent,
                                  store_status, wait_for)
from tests.support.broker import make_test_certs, mosquitto_available

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")]

DEVICES = {"pi-01": "raspberry-pi-4", "pi-02": "raspberry-pi-4", "phone-01": "android-arm64"}


def _add_devices(home: Path, broker_dir: Path, certs, port: int, tls_port: int, agents_root: Path) -> None:
    for device, profile in DEVICES.items():
        builder_cli("fleet", "add-device", device, "--profile", profile, "--group", "lab",
                    "--broker-config-dir", str(broker_dir), "--broker-port", str(port),
                    "--tls-port", str(tls_port), "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                    "--ca-file", str(certs.ca_file), "--broker-url", f"mqtts://localhost:{tls_port}",
                    "--agent-data-dir", str(agents_root / device), "--telemetry-interval", "1s", home=home)


@pytest.fixture
def mosquitto_fleet(tmp_path: Path, fleet_home, world_readable_dir: Path):
    """Broker config, users and agent.toml files all written by `builder fleet add-device`."""
    certs = make_test_certs(world_readable_dir / "certs")
    port, tls_port = free_port(), free_port()
    _add_devices(fleet_home.root, world_readable_dir / "broker", certs, port, tls_port, tmp_path / "agents")
    broker = Mosquitto(world_readable_dir / "broker" / "mosquitto.conf", [port, tls_port]).start()
    yield {"home": fleet_home.root, "certs": certs, "port": port, "tls_port": tls_port, "broker": broker,
           "agents": tmp_path / "agents"}
    broker.stop()


def _toml(home: Path, device: str) -> Path:
    return home / "devices" / device / "agent.toml"


def _client(port: int, username: str, password: str, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(5), f"{username} could not connect"
    return client


def test_device_cannot_read_other_devices_topics_nor_publish_a_deployment(mosquitto_fleet) -> None:
    home, port = mosquitto_fleet["home"], mosquitto_fleet["port"]
    creds = json.loads((home / "broker-credentials.json").read_text())
    assert oct((home / "broker-credentials.json").stat().st_mode)[-3:] == "600"
    pw = {d: (_toml(home, d).parent / "password").read_text().strip() for d in DEVICES}
    assert pw["pi-01"] not in (mosquitto_fleet["broker"].config_file.parent / "passwd").read_text()  # hashed only

    seen: dict[str, list[str]] = {"pi-01": [], "pi-02": [], "builder": []}

    def recorder(name: str):
        return lambda c, u, m: seen[name].append(m.topic)

    spy = _client(port, "pi-01", pw["pi-01"], "pi-01")
    spy.on_message = recorder("pi-01")
    victim = _client(port, "pi-02", pw["pi-02"], "pi-02")
    victim.on_message = recorder("pi-02")
    host = _client(port, creds["username"], creds["password"], "host-test")
    host.on_message = recorder("builder")
    for client, filters in ((spy, ["edgefleet/#"]), (victim, [proto.device_topic("pi-02", "down/#")]),
                            (host, [proto.all_devices_topic("up/#"), proto.all_devices_topic("down/desired")])):
        for f in filters:
            client.subscribe(f, qos=1)
    time.sleep(0.5)
    # the host addresses pi-02; pi-01 publishes a forged deployment for pi-02 and for itself
    host.publish(proto.device_topic("pi-02", proto.Down.DESIRED), b'{"schema":1}', qos=1).wait_for_publish(5)
    host.publish(proto.device_topic("pi-02", proto.Down.COMMAND), b'{"schema":1}', qos=1).wait_for_publish(5)
    host.publish(proto.device_topic("pi-01", proto.Down.COMMAND), b'{"schema":1}', qos=1).wait_for_publish(5)  # control
    victim.publish(proto.device_topic("pi-02", proto.Up.TELEMETRY), b"{}", qos=1).wait_for_publish(5)
    spy.publish(proto.device_topic("pi-02", proto.Down.DESIRED), b'{"forged":1}', qos=1).wait_for_publish(5)
    spy.publish(proto.device_topic("pi-01", proto.Down.DESIRED), b'{"forged":1}', qos=1).wait_for_publish(5)
    spy.publish(proto.device_topic("pi-02", proto.Up.STATUS), b'{"forged":1}', qos=1).wait_for_publish(5)
    spy.publish(proto.device_topic("pi-01", proto.Up.HELLO), b"{}", qos=1).wait_for_publish(5)  # control
    time.sleep(1.0)
    for client in (spy, victim, host):
        client.disconnect()
        client.loop_stop()
    # the spy reads only its own down/ topics, nothing of pi-02 (Mosquitto denies silently)
    assert seen["pi-01"] == [proto.device_topic("pi-01", proto.Down.COMMAND)]
    # pi-02 got the host's messages, never the forged deployment
    assert seen["pi-02"] == [proto.device_topic("pi-02", proto.Down.DESIRED), proto.device_topic("pi-02", proto.Down.COMMAND)]
    # the host saw pi-02's telemetry, the host's own desired, and pi-01's legitimate hello; no forgery
    assert sorted(seen["builder"]) == sorted([proto.device_topic("pi-02", proto.Down.DESIRED),
                                              proto.device_topic("pi-02", proto.Up.TELEMETRY),
                                              proto.device_topic("pi-01", proto.Up.HELLO)])


def _push(home: Path, *args: str, check: bool = True):
    result = builder_cli("push", *args, "--json", "--benchmark-runs", "30", home=home, check=check)
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tls_group_push_canary_offline_device_regression_and_failed_health_check(mosquitto_fleet, fleet_home, processes) -> None:
    home, agents, tls_port = mosquitto_fleet["home"], mosquitto_fleet["agents"], mosquitto_fleet["tls_port"]
    small = fleet_home.artifact("raspberry-pi-4", version="1", width=8)
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--broker", f"mqtts://localhost:{tls_port}",
                              "--ca-file", str(mosquitto_fleet["certs"].ca_file), "--data-dir", str(home)])
    wait_for(lambda: (home / "serve.json").is_file(), 30, "builder serve (TLS) to start: " + processes.log("serve"))
    for device in ("pi-01", "pi-02"):  # phone-01 stays offline for now
        start_agent(processes, device, _toml(home, device), agents / device)
    wait_for(lambda: all(store_status(home).get(d, {}).get("online") for d in ("pi-01", "pi-02")), 60,
             "pi-01 and pi-02 online over TLS: " + processes.log("pi-01"))

    # 1. group push, canary first: pi-01 is the canary, pi-02 follows, phone-01 (offline) is pending
    #    (a CPU fp32 ONNX build is portable: the phone may run the Pi's build)
    result, report = _push(home, "--group", "lab", "--artifact", small, "--canary", "50%")
    states = {o["device_id"]: o["state"] for o in report["outcomes"]}
    assert states == {"pi-01": "active", "pi-02": "active", "phone-01": "pending"}, result.stderr
    assert report["outcomes"][0]["device_id"] == "pi-01" and report["canary"]["proceed"]

    # 2. the offline device gets the retained desired deployment when it comes back
    start_agent(processes, "phone-01", _toml(home, "phone-01"), agents / "phone-01")
    wait_for(lambda: store_status(home).get("phone-01", {}).get("artifact_id") == small, 60,
             "phone-01 to install the model on reconnect: " + processes.log("phone-01"))

    # 3. a much slower model: the canary's p95 regresses against its previous model -> stop, roll back
    slow = fleet_home.artifact("raspberry-pi-4", version="2", width=96)
    result, report = _push(home, "--group", "lab", "--artifact", slow, "--canary", "30%", check=False)
    assert result.returncode != 0 and "canary did not hold" in result.stderr, result.stderr
    assert len(report["outcomes"]) == 1  # one canary of three; the rest were never pushed
    canary = report["outcomes"][0]["device_id"]
    assert report["outcomes"][0]["state"] == "active" and report["outcomes"][0]["previous_artifact_id"] == small
    assert [(o["device_id"], o["state"]) for o in report["rolled_back"]] == [(canary, "rolled_back")]
    assert any("p95" in r for r in report["canary"]["reasons"])
    wait_for(lambda: store_status(home)[canary]["artifact_id"] == small, 20, f"{canary} back on the previous model")
    assert all(r["artifact_id"] == small for r in store_status(home).values())

    # 4. an artifact that fails the device's health check: non-zero exit, device keeps its model
    broken = fleet_home.artifact("raspberry-pi-4", version="3", broken=True)
    result, report = _push(home, "--device", "pi-02", "--artifact", broken, check=False)
    assert result.returncode != 0 and "health check" in result.stderr and "previous model" in result.stderr
    assert report["outcomes"][0]["state"] == "failed"
    assert infer(agent_http_url(agents / "pi-02"))["artifact_id"] == small
    assert store_status(home)["pi-02"]["artifact_id"] == small

    # the field and deployment history is in the store: status shows every device on its model
    rows = store_status(home)
    assert {d: r["model"] for d, r in rows.items()} == {d: "digits-cnn@1" for d in DEVICES}
