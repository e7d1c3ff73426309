"""A fleet store filled with many devices, for the dashboard's API and page-load tests."""
from __future__ import annotations

import json
from pathlib import Path

from builder.fleet.transport.store import FleetStore, TelemetryRow


def fill_fleet(store: FleetStore, count: int, now: float) -> None:
    """``count`` devices in three groups; every third offline, the last one unregistered; one field
    report each (even devices with a measured power, odd ones with an estimate)."""
    for i in range(count):
        device = f"dev-{i:04d}"
        if i < count - 1:
            store.register_device(device, "raspberry-pi-4" if i % 2 else "jetson-orin-nano", group=f"g{i % 3}")
        store.record_status(device, online=i % 3 != 1, active_artifact_id=f"art-{i % 2}", active_model=f"m@{i % 2}",
                            ts=now - i)
        store.add_telemetry(TelemetryRow(device, 1, now - 10, "window", model_id=f"art-{i % 2}", requests=5,
                                         p50_ms=1.0 + i, p95_ms=2.0 + i, latency_ms={"p50": 1.0 + i, "p95": 2.0 + i},
                                         temperature_c=40.0 + i % 10, power_w=3.0,
                                         power_source="ina219" if i % 2 == 0 else "estimate: device profile",
                                         received_at=now - 10))


def write_optimize_report(folder: Path, study: str = "digits-pi") -> Path:
    """A `builder optimize` report.json (the fields the dashboard reads, as builder/search/outputs.py writes them)."""
    candidates = []
    for trial, (latency, quality, front) in enumerate([(4.0, 0.99, True), (2.0, 0.97, True), (3.0, 0.95, False),
                                                       (1.0, 0.90, True), (5.0, 0.98, False)]):
        candidates.append({"trial": trial, "recipe": f"quantize(int8) prune({trial / 10:.1f})", "quality": quality,
                           "accuracy": None, "fidelity": quality, "device_latency_ms": latency,
                           "latency_source": "estimate", "download_bytes": 1000 * (trial + 1), "energy_mj": 0.1,
                           "precision": "int8", "feasible": True, "on_front": front})
    report = {"schema": 1, "study": {"name": study, "trials": len(candidates)}, "quality": "fidelity (top-1 agreement)",
              "targets": {"max_latency_ms": 3.0}, "chosen": candidates[1],
              "front": [c for c in candidates if c["on_front"]], "candidates": candidates}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder / "report.json"
