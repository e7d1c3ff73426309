"""Raspberry Pi 5 PMIC rails via ``vcgencmd pmic_read_adc``.

Lines look like ``VDD_CORE_A current(7)=0.80000000A`` and ``VDD_CORE_V volt(15)=0.86000000V``;
power is the sum over rails of V × I for rails that report both (the usual community estimate:
it covers the SoC and memory rails, not USB peripherals or the 5 V conversion losses — said in
``note``). Older Pis have no PMIC ADC: not available.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable

from agent.sensors.base import PowerReading

_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-0-9.eE+]+)[AV]\s*$")

CommandRunner = Callable[[list[str]], "str | None"]


def run_command(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def parse_pmic_read_adc(text: str) -> dict[str, float]:
    """Rail -> watts from ``vcgencmd pmic_read_adc`` output."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        rail, kind, value = match.group(1), match.group(2), float(match.group(3))
        (amps if kind == "A" else volts)[rail] = value
    return {rail: amps[rail] * volts[rail] for rail in amps if rail in volts}


class RaspberryPiPmicSensor:
    name = "rpi5-pmic"

    def __init__(self, runner: CommandRunner = run_command) -> None:
        self.runner = runner

    def read(self) -> PowerReading:
        output = self.runner(["vcgencmd", "pmic_read_adc"])
        if not output:
            return PowerReading.not_available("vcgencmd pmic_read_adc unavailable (Raspberry Pi 5 only)")
        rails = parse_pmic_read_adc(output)
        if not rails:
            return PowerReading.not_available("vcgencmd pmic_read_adc printed no rail pairs")
        return PowerReading(True, sum(rails.values()), f"rpi5-pmic:{len(rails)} rails",
                            "sum of PMIC rails; excludes USB peripherals and 5 V conversion losses")
