"""Generic Linux: powercap RAPL energy counters (x86) and hwmon power inputs; thermal zones.

RAPL ``energy_uj`` is a wrapping counter of the CPU package's energy: the difference between two
reads is exact energy, so benchmarks use it for joules per inference. It is root-readable only on
recent kernels; unreadable means "not available".
"""
from __future__ import annotations

import time
from pathlib import Path

from agent.sensors.base import PowerReading, TemperatureReading


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class RaplSensor:
    name = "rapl"

    def __init__(self, root: Path = Path("/"), interval_s: float = 0.1) -> None:
        self.root = Path(root)
        self.interval_s = interval_s

    def _zones(self) -> list[Path]:
        zones = []
        for zone in sorted((self.root / "sys/class/powercap").glob("intel-rapl:*")):
            if zone.name.count(":") == 1 and (zone / "energy_uj").exists():  # packages, not sub-zones
                zones.append(zone)
        return zones

    def energy_j(self) -> float | None:
        values = [_read_int(z / "energy_uj") for z in self._zones()]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / 1e6  # type: ignore[arg-type]

    def read(self) -> PowerReading:
        zones = self._zones()
        if not zones:
            return PowerReading.not_available("no powercap RAPL zones")
        first = self.energy_j()
        if first is None:
            return PowerReading.not_available("RAPL energy_uj not readable (needs root on recent kernels)")
        t0 = time.monotonic()
        time.sleep(self.interval_s)
        second = self.energy_j()
        dt = time.monotonic() - t0
        if second is None or second < first or dt <= 0:
            return PowerReading(True, None, "rapl", "counter wrapped; retry", energy_j=second)
        names = ",".join((z / "name").read_text().strip() if (z / "name").exists() else z.name for z in zones)
        return PowerReading(True, (second - first) / dt, f"rapl:{names}", "CPU package(s) only, not the whole machine",
                            energy_j=second)


class HwmonPowerSensor:
    name = "hwmon"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def read(self) -> PowerReading:
        for hwmon in sorted((self.root / "sys/class/hwmon").glob("hwmon*")):
            for attr in ("power1_input", "power1_average"):
                microwatts = _read_int(hwmon / attr)
                if microwatts is not None:
                    name = (hwmon / "name").read_text().strip() if (hwmon / "name").exists() else hwmon.name
                    return PowerReading(True, microwatts / 1e6, f"hwmon:{name}/{attr}")
        return PowerReading.not_available("no hwmon power inputs")


def read_temperature(root: Path = Path("/")) -> TemperatureReading:
    """Hottest of the thermal zones and hwmon temp inputs (millidegrees in sysfs)."""
    root = Path(root)
    zones: list[tuple[str, float]] = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        value = _read_int(zone / "temp")
        if value is not None:
            kind = (zone / "type").read_text().strip() if (zone / "type").exists() else zone.name
            zones.append((kind, value / 1000.0))
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        name = (hwmon / "name").read_text().strip() if (hwmon / "name").exists() else hwmon.name
        for temp in sorted(hwmon.glob("temp*_input")):
            value = _read_int(temp)
            if value is not None:
                zones.append((f"{name}/{temp.name}", value / 1000.0))
    if not zones:
        return TemperatureReading(False, None, (), "not measured")
    hottest = max(zones, key=lambda z: z[1])
    return TemperatureReading(True, hottest[1], tuple(zones), f"sysfs:{hottest[0]}")
