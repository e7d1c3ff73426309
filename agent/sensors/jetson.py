"""NVIDIA Jetson INA3221 power monitors in sysfs.

Two layouts exist:
- L4T R32 (Nano, TX2): ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_N`` with
  ``in_power{N}_input`` (mW). On the Nano the rails are POM_5V_IN / POM_5V_GPU / POM_5V_CPU; on
  the TX2 VDD_IN / VDD_SYS_*: the *input* rail already is the module total, so it is reported alone
  (summing it with its sub-rails would double count).
- L4T R35+ (Orin): hwmon under ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`` with ``in{N}_label``,
  ``in{N}_input`` (mV) and ``curr{N}_input`` (mA); power = V × I.
Without an input rail the reader sums the rails it found and says so in ``source``.
"""
from __future__ import annotations

from pathlib import Path

from agent.sensors.base import PowerReading

INPUT_RAILS = ("POM_5V_IN", "VDD_IN", "VIN_SYS_5V0", "VDD_IN_TOTAL")


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_rails(root: Path) -> dict[str, float]:
    """Rail name -> watts from whichever layout is present."""
    rails: dict[str, float] = {}
    for dev in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            index = name_file.name.rsplit("_", 1)[1]
            mw = _read_float(dev / f"in_power{index}_input")
            if mw is not None:
                rails[name_file.read_text().strip()] = mw / 1000.0
    for hwmon in sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            index = label_file.name[2:-len("_label")]
            mv, ma = _read_float(hwmon / f"in{index}_input"), _read_float(hwmon / f"curr{index}_input")
            if mv is not None and ma is not None:
                rails[label_file.read_text().strip()] = mv * ma / 1e6
    return rails


class JetsonPowerSensor:
    name = "jetson-ina3221"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def read(self) -> PowerReading:
        rails = read_rails(self.root)
        if not rails:
            return PowerReading.not_available("no INA3221 rails in sysfs")
        for name in INPUT_RAILS:
            if name in rails:
                return PowerReading(True, rails[name], f"jetson-ina3221:{name}", "module input rail (total)")
        return PowerReading(True, sum(rails.values()), "jetson-ina3221:sum(" + ",".join(sorted(rails)) + ")",
                            "no input rail found; sum of monitored rails (may miss unmonitored ones)")
