"""Android battery power from ``/sys/class/power_supply/*`` (current_now µA, voltage_now µV).

Only meaningful while discharging (on charge the battery current is not the device's draw): then
"not available". The sign convention of current_now differs between vendors, so |I| is used.
"""
from __future__ import annotations

from pathlib import Path

from agent.sensors.base import PowerReading


class AndroidBatterySensor:
    name = "android-battery"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def read(self) -> PowerReading:
        base = self.root / "sys/class/power_supply"
        for supply in sorted(base.glob("*")):
            try:
                if (supply / "type").read_text().strip() != "Battery":
                    continue
                current_ua = float((supply / "current_now").read_text().strip())
                voltage_uv = float((supply / "voltage_now").read_text().strip())
            except (OSError, ValueError):
                continue
            status = ""
            try:
                status = (supply / "status").read_text().strip()
            except OSError:
                pass
            if status and status != "Discharging":
                return PowerReading.not_available(f"battery is {status.lower()}: its current is not the device's draw")
            return PowerReading(True, abs(current_ua) * voltage_uv / 1e12, f"android-battery:{supply.name}",
                                "battery discharge power (whole device)")
        return PowerReading.not_available("no battery with current_now/voltage_now in /sys/class/power_supply")
