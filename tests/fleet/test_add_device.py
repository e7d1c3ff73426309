"""`builder fleet add-device` without a broker: what it refuses and what it writes."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from builder.errors import ProfileError, UsageError
from builder.fleet.devices import add_device
from builder.fleet.store import open_store


def test_add_device_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="device id"):
        add_device(tmp_path, "bad/id", "raspberry-pi-4", broker_url="mqtt://127.0.0.1:1883")
    with pytest.raises(ProfileError, match="unknown device profile"):
        add_device(tmp_path, "pi-01", "toaster", broker_url="mqtt://127.0.0.1:1883")
    with pytest.raises(UsageError, match="builder serve"):
        add_device(tmp_path, "pi-01", "raspberry-pi-4")  # no serve running, no URL, no broker config
    assert not (tmp_path / "devices").exists()


def test_add_device_registers_and_writes_a_private_agent_toml(tmp_path: Path) -> None:
    added = add_device(tmp_path, "jetson-01", "jetson-orin-nano", group="lab", broker_url="mqtts://broker.example:8883",
                       agent_data_dir="/var/lib/edgefleet", telemetry_interval_s=10)
    config = tomllib.loads(added.agent_toml.read_text())
    assert config["device_id"] == "jetson-01" and config["profile"] == "jetson-orin-nano"
    assert config["broker_url"] == "mqtts://broker.example:8883" and config["telemetry_interval_s"] == 10
    assert config["trusted_key"] == str(tmp_path / "keys" / "signing_key.pub.pem")
    assert oct(added.agent_toml.stat().st_mode)[-3:] == "600"
    from agent.config import config_from_dict

    (tmp_path / "keys").mkdir()
    assert config_from_dict(config).profile == "jetson-orin-nano"  # the agent accepts what we wrote
    with open_store(tmp_path) as store:
        device = store.device("jetson-01")
    assert (device.profile, device.group, device.online) == ("jetson-orin-nano", "lab", False)
