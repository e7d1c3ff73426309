"""The table `builder push` ends with, as pure functions of the outcomes (tested without a broker)."""
from __future__ import annotations

from builder.fleet.rollout.push import DeviceOutcome
from builder.fleet.rollout.status import DASH, format_power

OUTCOME_COLUMNS = ("device", "state", "artifact", "size", "p50 ms", "p95 ms", "power", "vs previous model")


def format_bytes(size: int) -> str:
    if size <= 0:
        return DASH
    from builder.units import format_bytes as _format

    return _format(size)


def _ms(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def comparison(outcome: DeviceOutcome) -> str:
    """p95 (and power when both measured) of the new model against the previous one on this device."""
    before, after = outcome.before, outcome.after
    if outcome.previous_artifact_id is None:
        return "first model on this device"
    if outcome.previous_artifact_id == outcome.artifact_id:
        return "same artifact as before"
    if before is None or after is None or before.p95_ms in (None, 0) or after.p95_ms is None:
        return f"previous {outcome.previous_model or outcome.previous_artifact_id[:12]}: not benchmarked"
    text = f"p95 ×{after.p95_ms / before.p95_ms:.2f} ({before.p95_ms:.2f} → {after.p95_ms:.2f} ms)"
    if before.power_w and after.power_w is not None:
        text += f", power ×{after.power_w / before.power_w:.2f}"
    return text


def outcome_cells(outcome: DeviceOutcome) -> tuple[str, ...]:
    after = outcome.after
    state = outcome.state if not outcome.error else f"{outcome.state}: {outcome.error}"
    label = f"{outcome.model or ''} {outcome.artifact_id[:12]}".strip() if outcome.artifact_id else DASH
    return (
        outcome.device_id,
        state,
        label,
        format_bytes(outcome.size_bytes),
        _ms(after.p50_ms if after else None),
        _ms(after.p95_ms if after else None),
        format_power(after.power_w, after.power_source) if after else DASH,
        comparison(outcome) if outcome.state == "active" else DASH,
    )
