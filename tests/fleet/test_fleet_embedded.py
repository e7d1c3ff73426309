"""`builder serve` with the embedded broker + three `agent run` processes: push to each, status, plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleet.conftest import (PY, agent_http_url, builder_cli, fleet_status, free_port, infer, start_agent,
                                  store_status, wait_for)

pytest.importorskip("iotcore")

PROFILES = {"pi-01": "raspberry-pi-4", "jetson-01": "jetson-orin-nano", "phone-01": "android-arm64"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embedded_serve_three_agents_push_each_status_and_plot(tmp_path: Path, fleet_home, processes) -> None:
    home = fleet_home.root
    artifacts = {device: fleet_home.artifact(profile) for device, profile in PROFILES.items()}
    port = free_port()
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--port", str(port), "--data-dir", str(home)])
    wait_for(lambda: (home / "serve.json").is_file(), 30, "builder serve to start: " + processes.log("serve"))
    data_dirs = {}
    for device, profile in PROFILES.items():
        data_dirs[device] = tmp_path / "agents" / device
        out = builder_cli("fleet", "add-device", device, "--profile", profile, "--group", "demo",
                          "--agent-data-dir", str(data_dirs[device]), "--telemetry-interval", "1s", home=home)
        assert "no authentication" in out.stdout
        toml = home / "devices" / device / "agent.toml"
        assert f'profile = "{profile}"' in toml.read_text() and oct(toml.stat().st_mode)[-3:] == "600"
        start_agent(processes, device, toml, data_dirs[device])
    wait_for(lambda: len(rows := store_status(home)) == 3 and all(r["online"] for r in rows.values()),
             60, "three agents online")

    for device in PROFILES:
        result = builder_cli("push", "--device", device, "--artifact", artifacts[device][:16], "--json",
                             "--benchmark-runs", "20", home=home)
        outcome = json.loads(result.stdout)["outcomes"][0]
        assert outcome["state"] == "active", outcome
        assert outcome["artifact_id"] == artifacts[device]
        assert outcome["after"]["p50_ms"] > 0 and outcome["after"]["p95_ms"] >= outcome["after"]["p50_ms"]
        assert outcome["previous_artifact_id"] is None  # first model on this device

    for device in PROFILES:
        answer = infer(agent_http_url(data_dirs[device]), count=30)
        assert answer["artifact_id"] == artifacts[device]

    def field_latency_everywhere() -> dict | None:
        rows = store_status(home)
        ok = all(r["field_p50_ms"] is not None and r["model"] == "digits-cnn@1" and r["requests"] >= 30
                 for r in rows.values())
        return rows if ok else None

    wait_for(field_latency_everywhere, 30, "field latency of each device in the store")
    rows = fleet_status(home)  # the CLI shows the same
    assert {d: r["profile"] for d, r in rows.items()} == PROFILES
    assert all(r["field_p95_ms"] >= r["field_p50_ms"] for r in rows.values())
    table = builder_cli("fleet", "status", home=home).stdout
    assert "digits-cnn@1" in table and "online" in table

    plot = tmp_path / "pi.png"
    builder_cli("fleet", "plot", "--device", "pi-01", "--out", str(plot), home=home)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    telemetry = json.loads(builder_cli("fleet", "telemetry", "--device", "pi-01", "--json", home=home).stdout)
    assert any(r["requests"] > 0 and r["model_id"] == artifacts["pi-01"] for r in telemetry)

    # a second model: the push compares it with the first on the device; then roll back by command
    v2 = fleet_home.artifact("raspberry-pi-4", version="2", width=16)
    outcome = json.loads(builder_cli("push", "--device", "pi-01", "--artifact", v2, "--json",
                                     "--benchmark-runs", "20", home=home).stdout)["outcomes"][0]
    assert outcome["state"] == "active" and outcome["previous_artifact_id"] == artifacts["pi-01"]
    assert outcome["before"]["artifact_id"] == artifacts["pi-01"] and outcome["after"]["artifact_id"] == v2
    rolled = builder_cli("fleet", "rollback", "--device", "pi-01", home=home)
    assert "rolled back" in rolled.stdout
    wait_for(lambda: store_status(home)["pi-01"]["artifact_id"] == artifacts["pi-01"], 20, "pi-01 back on v1")
    assert infer(agent_http_url(data_dirs["pi-01"]))["artifact_id"] == artifacts["pi-01"]

    # `--model`: build for the device's profile (TensorRT-ready fp16 ONNX for the Jetson), then reuse it
    onnx_path = fleet_home._digits_onnx(8)
    first = json.loads(builder_cli("push", "--device", "jetson-01", "--model", str(onnx_path), "--json",
                                   "--benchmark-runs", "10", home=home).stdout)["outcomes"][0]
    assert first["state"] == "active", first
    record = fleet_home.registry.get(first["artifact_id"])
    assert (record.profile, record.runtime, record.precision) == ("jetson-orin-nano", "onnxruntime-tensorrt", "fp16")
    again = json.loads(builder_cli("push", "--device", "jetson-01", "--model", str(onnx_path), "--json",
                                   "--benchmark-runs", "0", home=home).stdout)["outcomes"][0]
    assert again["artifact_id"] == first["artifact_id"] and again["state"] == "active"  # cached build, same artifact

    # the embedded broker keeps retained messages in memory: a restarted serve publishes them again
    processes.stop("serve")
    assert not (home / "serve.json").exists()
    processes.start("serve2", [PY, "-m", "builder.cli.main", "serve", "--port", str(port), "--data-dir", str(home)])
    wait_for(lambda: (home / "serve.json").is_file(), 30, "builder serve to restart: " + processes.log("serve2"))
    retained = _retained_desired(port)
    assert retained == {"pi-01": artifacts["pi-01"], "phone-01": artifacts["phone-01"], "jetson-01": first["artifact_id"]}
    wait_for(lambda: all(r["online"] for r in store_status(home).values()), 30, "agents back online after the restart")


def _retained_desired(port: int) -> dict[str, str]:
    import time

    import paho.mqtt.client as mqtt

    from agent import protocol as proto

    seen: dict[str, str] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retained-check", protocol=mqtt.MQTTv311)
    client.on_message = lambda c, u, m: seen.__setitem__(proto.parse_device_topic(m.topic)[0],
                                                         json.loads(m.payload)["artifact_id"]) if m.payload else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(proto.all_devices_topic(proto.Down.DESIRED), qos=1)
    time.sleep(1.5)
    client.disconnect()
    client.loop_stop()
    return seen


def test_push_refuses_when_no_serve_would_send_the_chunks(fleet_home) -> None:
    from builder.errors import FleetError
    from builder.fleet.rollout.push import Pusher
    from builder.fleet.transport.embedded_broker import EmbeddedBroker, EmbeddedBrokerSettings
    from builder.fleet.transport.link import BrokerEndpoint, FleetLink
    from builder.fleet.transport.store import open_store

    artifact = fleet_home.artifact("raspberry-pi-4")
    with EmbeddedBroker(EmbeddedBrokerSettings(port=0)) as broker, open_store(fleet_home.root) as store, \
            FleetLink(BrokerEndpoint(broker.url)).connect() as link:
        store.register_device("pi-09", "raspberry-pi-4")
        with pytest.raises(FleetError, match="no `builder serve` is running"):
            Pusher(link, store, fleet_home.registry, fleet_home.root).push("pi-09", artifact)
        assert store.events("pi-09") == []  # nothing was published or recorded
