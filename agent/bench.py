"""Benchmark a loaded model: warm-up, then N timed runs; latency percentiles, throughput, peak RSS,
CPU %, temperature, power and energy per inference.

Power is sampled from the platform's sensor during the timed runs (or taken from an energy counter
such as RAPL when there is one). Without a sensor the result says "not measured" and may carry a
profile-based estimate, labelled ``estimated``; it is never a silent zero.
"""
from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from agent.sensors import PowerSensor, profile_power_estimate_w, read_power, read_temperature

if TYPE_CHECKING:
    import numpy as np

# numpy is imported lazily throughout agent/: an idle agent without a model stays small (<= 40 MB RSS).


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of an already sorted sequence."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    count: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "LatencyStats":
        if not samples_ms:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        values = sorted(float(v) for v in samples_ms)
        p50, p90, p95, p99 = (round(percentile(values, q), 4) for q in (50, 90, 95, 99))
        return cls(len(values), p50, p90, p95, p99, round(sum(values) / len(values), 4))

    def as_dict(self) -> dict[str, float]:
        return {"p50": self.p50_ms, "p90": self.p90_ms, "p95": self.p95_ms, "p99": self.p99_ms, "mean": self.mean_ms}


@dataclass(frozen=True)
class BenchmarkResult:
    artifact_id: str | None
    backend: str
    runs: int
    warmup: int
    latency: LatencyStats
    throughput_per_s: float
    peak_rss_bytes: int
    cpu_percent: float
    temperature_c: float | None
    power_w: float | None
    power_source: str  # sensor name, or "not measured"
    energy_per_inference_j: float | None
    estimated_power_w: float | None = None  # from the device profile, ONLY when not measured
    estimated_energy_per_inference_j: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = self.latency.as_dict()
        return data


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _PowerSampler(threading.Thread):
    def __init__(self, sensors: Sequence[PowerSensor], interval_s: float = 0.2) -> None:
        super().__init__(daemon=True, name="power-sampler")
        self.sensors = sensors
        self.interval_s = interval_s
        self.samples: list[float] = []
        self.source = "not measured"
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            reading = read_power(self.sensors)
            if reading.available and reading.watts is not None:
                self.samples.append(reading.watts)
                self.source = reading.source
            elif not self.samples:
                return  # nothing to measure on this device
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)


def run_benchmark(run: Callable[[Mapping[str, np.ndarray]], Any], feeds: Mapping[str, np.ndarray], *,
                  runs: int = 50, warmup: int = 5, backend: str = "", artifact_id: str | None = None,
                  power_sensors: Sequence[PowerSensor] = (), profile: str | None = None,
                  root: Path = Path("/")) -> BenchmarkResult:
    import psutil

    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(0, warmup)):
        run(feeds)
    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    energy_counter = next((s for s in power_sensors if hasattr(s, "energy_j")), None)
    energy0 = energy_counter.energy_j() if energy_counter is not None else None
    sampler = _PowerSampler([s for s in power_sensors if s is not energy_counter] if energy0 is not None else power_sensors)
    sampler.start()
    samples_ms = []
    wall0 = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        run(feeds)
        samples_ms.append((time.perf_counter() - t0) * 1000.0)
    wall_s = time.perf_counter() - wall0
    sampler.stop()
    cpu1 = proc.cpu_times()
    energy1 = energy_counter.energy_j() if energy_counter is not None else None
    cpu_percent = 100.0 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / max(wall_s, 1e-9)

    power_w, source, energy_j = None, "not measured", None
    if energy0 is not None and energy1 is not None and energy1 >= energy0:
        energy_j = (energy1 - energy0) / runs
        power_w = (energy1 - energy0) / wall_s
        source = f"{energy_counter.name} energy counter"  # type: ignore[union-attr]
    elif sampler.samples:
        power_w = sum(sampler.samples) / len(sampler.samples)
        source = sampler.source
        energy_j = power_w * wall_s / runs
    estimated_w = estimated_j = None
    if power_w is None:
        estimated_w = profile_power_estimate_w(profile, busy=True)
        estimated_j = estimated_w * wall_s / runs if estimated_w is not None else None
    temp = read_temperature(root)
    return BenchmarkResult(
        artifact_id=artifact_id, backend=backend, runs=runs, warmup=warmup,
        latency=LatencyStats.from_samples(samples_ms), throughput_per_s=round(runs / wall_s, 3),
        peak_rss_bytes=_peak_rss_bytes(), cpu_percent=round(cpu_percent, 1),
        temperature_c=temp.celsius, power_w=None if power_w is None else round(power_w, 4), power_source=source,
        energy_per_inference_j=None if energy_j is None else round(energy_j, 6),
        estimated_power_w=estimated_w,
        estimated_energy_per_inference_j=None if estimated_j is None else round(estimated_j, 6))
