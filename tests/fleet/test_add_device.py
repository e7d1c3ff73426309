"""`builder fleet add-device` / `remove-device`: what they refuse and what they write."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from builder.errors import ProfileError, UsageError
from builder.fleet.transport.devices import add_device, remove_device
from builder.fleet.transport.store import open_store


def _keys(home: Path) -> Path:
    from builder.artifacts.signing import init_keys

    return init_keys(home / "keys").public


def test_add_device_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="device id"):
        add_device(tmp_path, "bad/id", "raspberry-pi-4", broker_url="mqtt://127.0.0.1:1883")
    with pytest.raises(ProfileError, match="unknown device profile"):
        add_device(tmp_path, "pi-01", "toaster", broker_url="mqtt://127.0.0.1:1883")
    with pytest.raises(UsageError, match="builder serve"):
        add_device(tmp_path, "pi-01", "raspberry-pi-4")  # no serve running, no URL, no broker config
    with pytest.raises(UsageError, match="builder keys init"):
        add_device(tmp_path, "pi-01", "raspberry-pi-4", broker_url="mqtt://127.0.0.1:1883")  # no signing key yet
    with pytest.raises(UsageError, match="--http-port"):
        add_device(tmp_path, "pi-01", "raspberry-pi-4", broker_url="mqtt://127.0.0.1:1883", http_port=70000)
    assert not (tmp_path / "devices").exists()


def test_add_device_writes_a_device_folder_like_deploy_agent_toml(tmp_path: Path) -> None:
    from agent.config import load_config

    _keys(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    added = add_device(tmp_path, "jetson-01", "jetson-orin-nano", group="lab", broker_url="mqtts://broker.example:8883",
                       agent_ca_file=ca, telemetry_interval_s=10, http_port=8766)
    text = added.agent_toml.read_text()
    config = tomllib.loads(text)
    assert config["device_id"] == "jetson-01" and config["profile"] == "jetson-orin-nano"
    assert config["broker_url"] == "mqtts://broker.example:8883" and config["telemetry_interval_s"] == 10
    assert config["http_port"] == 8766 and config["data_dir"] == "/var/lib/edgefleet"
    # device-side paths only: files beside agent.toml (copied together to /etc/edgefleet), no host path
    assert config["trusted_key"] == "signing_key.pub.pem" and config["ca_file"] == "ca.pem"
    assert str(tmp_path) not in text and "password =" not in text
    folder = added.agent_toml.parent
    assert (folder / "signing_key.pub.pem").read_bytes() == (tmp_path / "keys" / "signing_key.pub.pem").read_bytes()
    assert oct(added.agent_toml.stat().st_mode)[-3:] == "600"
    # the agent reads it where it lies (relative paths resolve beside the file)
    cfg = load_config(added.agent_toml.with_name("agent.toml"))
    assert cfg.profile == "jetson-orin-nano" and cfg.trusted_key == folder / "signing_key.pub.pem"
    assert cfg.http_port == 8766
    with open_store(tmp_path) as store:
        device = store.device("jetson-01")
    assert (device.profile, device.group, device.online, device.registered) == ("jetson-orin-nano", "lab", False, True)


def test_add_device_refuses_an_existing_id_unless_forced_and_remove_device_forgets_it(tmp_path: Path) -> None:
    _keys(tmp_path)
    first = add_device(tmp_path, "pi-01", "raspberry-pi-4", group="kitchen", broker_url="mqtt://10.0.0.2:1883",
                       agent_data_dir="/srv/edgefleet")
    before = first.agent_toml.read_text()
    with pytest.raises(UsageError, match="already registered.*--force.*remove-device pi-01"):
        add_device(tmp_path, "pi-01", "raspberry-pi-5", broker_url="mqtt://10.0.0.2:1883")
    assert first.agent_toml.read_text() == before  # untouched: data_dir and group kept
    with open_store(tmp_path) as store:
        assert store.device("pi-01").group == "kitchen"
    forced = add_device(tmp_path, "pi-01", "raspberry-pi-5", broker_url="mqtt://10.0.0.2:1883", force=True)
    assert 'profile = "raspberry-pi-5"' in forced.agent_toml.read_text()

    removed = remove_device(tmp_path, "pi-01")
    assert not forced.agent_toml.parent.exists() and any("store" in r for r in removed.removed)
    with open_store(tmp_path) as store:
        assert store.find_device("pi-01") is None
    with pytest.raises(UsageError, match="unknown device 'pi-01'"):
        remove_device(tmp_path, "pi-01")
    add_device(tmp_path, "pi-01", "raspberry-pi-4", broker_url="mqtt://10.0.0.2:1883")  # free again

    elsewhere = add_device(tmp_path, "pi-03", "raspberry-pi-4", broker_url="mqtt://10.0.0.2:1883",
                           agent_toml=tmp_path / "out" / "agent.toml")
    assert (tmp_path / "out" / "signing_key.pub.pem").is_file()
    remove_device(tmp_path, "pi-03")
    assert not elsewhere.agent_toml.exists() and not (tmp_path / "out" / "signing_key.pub.pem").exists()


def test_cli_add_device_twice_is_one_line_and_remove_device_works(tmp_path: Path) -> None:
    from tests.fleet.conftest import builder_cli

    _keys(tmp_path)
    args = ("fleet", "add-device", "pi-02", "--profile", "raspberry-pi-4", "--broker-url", "mqtt://10.0.0.2:1883")
    builder_cli(*args, home=tmp_path)
    again = builder_cli(*args, home=tmp_path, check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "--force" in again.stderr and "remove-device" in again.stderr
    out = builder_cli("fleet", "remove-device", "pi-02", home=tmp_path).stdout
    assert "removed pi-02" in out
    assert not (tmp_path / "devices" / "pi-02").exists()


def test_add_device_with_tls_opens_the_tls_listener_to_the_lan_and_keeps_plain_on_loopback(tmp_path: Path) -> None:
    import shutil

    from builder.fleet.transport.devices import BrokerTls
    from tests.support.broker import make_test_certs

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    _keys(tmp_path)
    certs = make_test_certs(tmp_path / "certs")
    added = add_device(tmp_path, "pi-01", "raspberry-pi-4", broker_config_dir=tmp_path / "broker", broker_port=1883,
                       tls=BrokerTls(8883, certs.ca_file, certs.server_cert, certs.server_key),
                       broker_url="mqtts://builder.local:8883")
    conf = added.broker_config_file.read_text().splitlines()
    assert "listener 1883 127.0.0.1" in conf and "listener 8883 0.0.0.0" in conf
    assert tomllib.loads(added.agent_toml.read_text())["ca_file"] == "ca.pem"
    assert (added.agent_toml.parent / "ca.pem").read_bytes() == certs.ca_file.read_bytes()
