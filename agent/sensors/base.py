"""What every sensor reader returns: a reading, or an explicit "not available" with the reason.

Never a silent zero: a missing sensor is ``available=False`` and the report says "not measured".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PowerReading:
    available: bool
    watts: float | None = None
    source: str = "not measured"  # e.g. "jetson-ina3221:VDD_IN", "rapl:package-0"
    note: str = ""
    # Monotonic energy counter in joules when the sensor has one (RAPL): exact energy per inference.
    energy_j: float | None = None

    @classmethod
    def not_available(cls, note: str) -> "PowerReading":
        return cls(available=False, watts=None, source="not measured", note=note)


@dataclass(frozen=True)
class TemperatureReading:
    available: bool
    celsius: float | None = None  # the hottest zone
    zones: tuple[tuple[str, float], ...] = ()
    source: str = "not measured"


class PowerSensor(Protocol):
    name: str

    def read(self) -> PowerReading: ...
