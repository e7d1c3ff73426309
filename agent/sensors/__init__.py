"""Power and temperature readers, one per platform; each returns a reading or "not available".

``power_sensors_for(profile, root)`` lists the readers worth trying on a device, best first;
``read_power`` returns the first available reading (or "not measured" with every reason).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from agent.sensors.android import AndroidBatterySensor
from agent.sensors.base import PowerReading, PowerSensor, TemperatureReading
from agent.sensors.jetson import JetsonPowerSensor
from agent.sensors.linux import HwmonPowerSensor, RaplSensor, read_temperature
from agent.sensors.rpi import RaspberryPiPmicSensor


def power_sensors_for(profile: str | None, root: Path = Path("/")) -> list[PowerSensor]:
    profile = profile or ""
    if profile.startswith("jetson"):
        return [JetsonPowerSensor(root), HwmonPowerSensor(root)]
    if profile.startswith("raspberry-pi"):
        return [RaspberryPiPmicSensor(), HwmonPowerSensor(root)]
    if profile.startswith("android"):
        return [AndroidBatterySensor(root)]
    return [RaplSensor(root), HwmonPowerSensor(root)]


def read_power(sensors: Sequence[PowerSensor]) -> PowerReading:
    notes = []
    for sensor in sensors:
        reading = sensor.read()
        if reading.available and reading.watts is not None:
            return reading
        notes.append(f"{sensor.name}: {reading.note}")
    return PowerReading.not_available("; ".join(notes) or "no power sensor for this platform")


def profile_power_estimate_w(profile: str | None, busy: bool) -> float | None:
    """Typical (busy) or idle power from the device profile's TOML: an ESTIMATE, labelled as such."""
    if not profile:
        return None
    try:
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        from device_profiles import PROFILE_DIR

        data = tomllib.loads((PROFILE_DIR / f"{profile}.toml").read_text(encoding="utf-8"))
        power = data.get("power", {})
        value = power.get("typical_w" if busy else "idle_w")
        return float(value) if value is not None else None
    except (ImportError, OSError, ValueError):
        return None


__all__ = ["PowerReading", "TemperatureReading", "PowerSensor", "power_sensors_for", "read_power",
           "read_temperature", "profile_power_estimate_w", "JetsonPowerSensor", "RaspberryPiPmicSensor",
           "AndroidBatterySensor", "RaplSensor", "HwmonPowerSensor"]
