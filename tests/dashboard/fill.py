"""A fleet store filled with many devices, for the dashboard's API and page-load tests."""
from __future__ import annotations

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
