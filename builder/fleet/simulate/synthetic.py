"""Synthetic inference results: latencies drawn from a log-normal distribution per model, no ONNX
session. Pure functions over a ``random.Random``, so a run is reproducible from its seed."""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

from agent import protocol as proto
from agent.bench import LatencyStats


@dataclass(frozen=True)
class SyntheticModel:
    """How fast a simulated device runs one artifact: median latency and log-normal spread."""

    artifact_id: str | None
    p50_ms: float
    sigma: float = 0.25

    def draw_ms(self, rng: random.Random, count: int) -> list[float]:
        mu = math.log(self.p50_ms)
        return [rng.lognormvariate(mu, self.sigma) for _ in range(count)]


def model_for(artifact_id: str | None, slowdown: float = 1.0) -> SyntheticModel:
    """A stable median per artifact (2-12 ms, from its id), so a push visibly changes the latency."""
    if artifact_id is None:
        return SyntheticModel(None, 5.0 * slowdown)
    spread = int(hashlib.sha256(artifact_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return SyntheticModel(artifact_id, (2.0 + 10.0 * spread) * slowdown)


def telemetry_report(device_id: str, seq: int, ts: float, model: SyntheticModel, rng: random.Random, *,
                     window_s: float, requests_per_s: float, event: str = "periodic", model_label: str | None = None,
                     details: dict[str, Any] | None = None, incarnation: str | None = None) -> proto.TelemetryReport:
    """One window's report: ``requests`` drawn around ``requests_per_s × window_s``, a small error rate."""
    requests = max(0, int(rng.gauss(requests_per_s * window_s, math.sqrt(max(requests_per_s * window_s, 1.0)))))
    errors = sum(1 for _ in range(min(requests, 50)) if rng.random() < 0.002)
    stats = LatencyStats.from_samples(model.draw_ms(rng, min(requests, 200))) if requests else None
    return proto.TelemetryReport(
        device_id=device_id, seq=seq, ts=ts, event=event, artifact_id=model.artifact_id, model=model_label,
        window_s=round(window_s, 3), requests=requests, errors=errors,
        latency_ms=stats.as_dict() if stats is not None else {},
        cpu_percent=round(rng.uniform(5.0, 60.0), 1), memory_rss_bytes=int(rng.uniform(40e6, 80e6)),
        memory_available_bytes=int(rng.uniform(200e6, 900e6)), temperature_c=round(rng.uniform(40.0, 70.0), 1),
        power_w=None, power_source="not measured", details={"simulated": True, **(details or {})},
        incarnation=incarnation)


def benchmark_result(model: SyntheticModel, rng: random.Random, runs: int, warmup: int) -> dict[str, Any]:
    """The ``result`` of a ``benchmark`` reply, shaped like ``agent.bench.BenchmarkResult.to_dict()``."""
    stats = LatencyStats.from_samples(model.draw_ms(rng, max(runs, 1)))
    return {"artifact_id": model.artifact_id, "backend": "simulated", "runs": runs, "warmup": warmup,
            "latency": stats.as_dict(), "throughput_per_s": round(1000.0 / stats.mean_ms, 2) if stats.mean_ms else 0.0,
            "peak_rss_bytes": 60_000_000, "cpu_percent": 100.0, "temperature_c": None, "power_w": None,
            "power_source": "not measured", "energy_per_inference_j": None}
