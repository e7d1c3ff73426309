"""`builder fleet status` as pure data: store records in, one row per device out.

The CLI renders these rows as a Rich table or JSON; nothing here touches a broker or a terminal.
Field latency is always the newest window with real requests *on the model the device runs now*,
so right after a push the table shows "—" rather than the previous model's numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from builder.fleet.transport.store import DeviceRecord, FleetStore, TelemetryRow

DASH = "—"


@dataclass(frozen=True)
class DeviceStatusRow:
    device_id: str
    online: bool
    profile: str | None
    group: str | None
    model: str | None  # "name@version" as the device reports it
    artifact_id: str | None
    field_p50_ms: float | None
    field_p95_ms: float | None
    requests: int
    power_w: float | None
    power_source: str
    temperature_c: float | None
    last_seen: float | None
    last_seen_age_s: float | None
    registered: bool = True  # False: it connected without `builder fleet add-device`
    telemetry_missing: int = 0  # reports the host never stored (seq gaps, summed over incarnations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def status_rows(devices: Sequence[DeviceRecord], field_telemetry: Mapping[str, TelemetryRow | None],
                latest_telemetry: Mapping[str, TelemetryRow | None], requests: Mapping[str, int],
                now: float, missing: Mapping[str, int] | None = None) -> list[DeviceStatusRow]:
    """One row per device. ``field_telemetry``: newest window with requests on the active model;
    ``latest_telemetry``: newest report of any kind (power, temperature); ``requests``: real requests
    served on the active model."""
    rows = []
    for device in sorted(devices, key=lambda d: d.device_id):
        field = field_telemetry.get(device.device_id)
        latest = latest_telemetry.get(device.device_id)
        rows.append(DeviceStatusRow(
            device_id=device.device_id,
            online=device.online,
            profile=device.profile,
            group=device.group,
            model=device.active_model,
            artifact_id=device.active_artifact_id,
            field_p50_ms=field.p50_ms if field else None,
            field_p95_ms=field.p95_ms if field else None,
            requests=int(requests.get(device.device_id, 0)),
            power_w=latest.power_w if latest else None,
            power_source=latest.power_source if latest else "not measured",
            temperature_c=latest.temperature_c if latest else None,
            last_seen=device.last_seen,
            last_seen_age_s=(max(0.0, now - device.last_seen) if device.last_seen is not None else None),
            registered=device.registered,
            telemetry_missing=int((missing or {}).get(device.device_id, 0)),
        ))
    return rows


def format_age(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    if age_s < 60:
        return f"{age_s:.0f} s ago"
    if age_s < 3600:
        return f"{age_s / 60:.0f} min ago"
    if age_s < 86400:
        return f"{age_s / 3600:.1f} h ago"
    return f"{age_s / 86400:.1f} d ago"


def _ms(value: float | None) -> str:
    return DASH if value is None else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def format_power(power_w: float | None, source: str) -> str:
    """Power with where it came from; never prints a made-up 0 W."""
    if power_w is None:
        return "not measured"
    if source.lower().startswith("estimate"):
        return f"≈{power_w:.2f} W (est.)"
    return f"{power_w:.2f} W"


STATUS_COLUMNS = ("device", "state", "profile", "model", "p50 ms", "p95 ms", "requests", "power", "temp", "last seen",
                  "missing")
# what a narrow terminal leaves out first (`--json` has everything)
STATUS_DROP_ORDER = ("missing", "temp", "power", "requests", "p50 ms", "last seen")


def status_cells(row: DeviceStatusRow) -> tuple[str, ...]:
    """The strings of one table row, in ``STATUS_COLUMNS`` order."""
    model = row.model or (row.artifact_id[:12] if row.artifact_id else DASH)
    return (
        row.device_id,
        ("online" if row.online else "offline") if row.registered else "unregistered",
        row.profile or DASH,
        model,
        _ms(row.field_p50_ms),
        _ms(row.field_p95_ms),
        str(row.requests),
        format_power(row.power_w, row.power_source),
        DASH if row.temperature_c is None else f"{row.temperature_c:.0f} °C",
        format_age(row.last_seen_age_s),
        str(row.telemetry_missing) if row.telemetry_missing else DASH,  # reports the host never stored
    )


def collect_status(store: FleetStore, now: float, group: str | None = None) -> list[DeviceStatusRow]:
    """Read what ``status_rows`` needs from the store (the only I/O of this module)."""
    devices = store.devices(group=group)
    field = {d.device_id: store.latest_field_telemetry_for(d.device_id, d.active_artifact_id) for d in devices}
    latest = {d.device_id: store.latest_telemetry(d.device_id) for d in devices}
    requests = {d.device_id: store.requests_served(d.device_id, d.active_artifact_id) for d in devices}
    return status_rows(devices, field, latest, requests, now, store.telemetry_missing())
