"""`builder fleet plot`: field latency and power over time with deployments marked.

``plot_series`` is pure (telemetry + events -> series); ``render_plot`` draws them with
matplotlib's Agg backend (no display needed) and writes the PNG atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from builder.errors import UsageError
from builder.fleet.store import DeploymentEvent, TelemetryRow

# Deployment events worth a vertical line, and their colours.
MARKED_EVENTS = {"active": "tab:green", "rolled_back": "tab:red", "failed": "tab:red", "rejected": "tab:red",
                 "rollback_requested": "tab:orange"}


@dataclass(frozen=True)
class DeploymentMark:
    t_s: float  # seconds since the series start
    kind: str
    label: str


@dataclass(frozen=True)
class PlotSeries:
    device_id: str
    start_ts: float
    t_s: tuple[float, ...]  # seconds since start_ts, one per field window with requests
    p50_ms: tuple[float | None, ...]
    p95_ms: tuple[float | None, ...]
    power_t_s: tuple[float, ...]  # one per report that measured power
    power_w: tuple[float, ...]
    marks: tuple[DeploymentMark, ...]
    power_estimated: bool = False  # every power point is a profile estimate, not a measurement

    @property
    def empty(self) -> bool:
        return not self.t_s and not self.power_t_s and not self.marks


def plot_series(device_id: str, telemetry: Sequence[TelemetryRow], events: Sequence[DeploymentEvent]) -> PlotSeries:
    """Latency from windows that served requests; power only where measured (no zeros invented)."""
    stamps = [r.ts for r in telemetry] + [e.ts for e in events if e.kind in MARKED_EVENTS]
    start = min(stamps) if stamps else 0.0
    field = [r for r in sorted(telemetry, key=lambda r: (r.ts, r.seq)) if r.requests > 0 and r.event == "periodic"]
    powered = [r for r in sorted(telemetry, key=lambda r: (r.ts, r.seq)) if r.power_w is not None]
    marks = []
    # progress events carry no model name; the push's "desired" event of the same deployment does
    models = {e.deployment_id: str(e.detail.get("model", "")) for e in events
              if e.kind == "desired" and e.deployment_id and e.detail}
    for e in sorted(events, key=lambda e: e.ts):
        if e.kind not in MARKED_EVENTS:
            continue
        short = (e.artifact_id or "")[:8]
        model = str(e.detail.get("model", "")) if e.detail else ""
        model = model or models.get(e.deployment_id or "", "")
        marks.append(DeploymentMark(e.ts - start, e.kind, f"{e.kind} {model or short}".strip()))
    return PlotSeries(
        device_id=device_id, start_ts=start,
        t_s=tuple(r.ts - start for r in field), p50_ms=tuple(r.p50_ms for r in field),
        p95_ms=tuple(r.p95_ms for r in field),
        power_t_s=tuple(r.ts - start for r in powered), power_w=tuple(float(r.power_w) for r in powered if r.power_w is not None),
        marks=tuple(marks),
        power_estimated=bool(powered) and all(r.power_source.lower().startswith("estimate") for r in powered))


def render_plot(series: PlotSeries, out_path: Path) -> Path:
    """Draw latency (top) and power (bottom) with deployment lines; returns the written path."""
    if series.empty:
        raise UsageError(f"no telemetry or deployments recorded for '{series.device_id}' yet; "
                         "let `builder serve` run while the device serves requests, then plot again")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_lat, ax_pow) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    try:
        def points(ts: tuple[float, ...], ys: tuple[float | None, ...]) -> tuple[list[float], list[float]]:
            pairs = [(t, y) for t, y in zip(ts, ys) if y is not None]
            return [p[0] for p in pairs], [float(p[1]) for p in pairs]

        for name, ys, style in (("p50", series.p50_ms, "-o"), ("p95", series.p95_ms, "--s")):
            xs, vals = points(series.t_s, ys)
            if xs:
                ax_lat.plot(xs, vals, style, markersize=3, label=f"field {name}")
        ax_lat.set_ylabel("latency (ms)")
        ax_lat.set_title(f"{series.device_id}: field latency and power")
        if series.power_t_s:
            label = "power (ESTIMATE from the device profile: no sensor)" if series.power_estimated else "power (measured)"
            ax_pow.plot(series.power_t_s, series.power_w, "-", color="tab:purple", label=label)
            ax_pow.legend(loc="best", fontsize=8)
        else:
            ax_pow.text(0.5, 0.5, "power not measured on this device", ha="center", va="center",
                        transform=ax_pow.transAxes, color="gray")
        ax_pow.set_ylabel("power (W)")
        ax_pow.set_xlabel("time (s)")
        for mark in series.marks:
            colour = MARKED_EVENTS.get(mark.kind, "gray")
            for ax in (ax_lat, ax_pow):
                ax.axvline(mark.t_s, color=colour, linestyle=":", linewidth=1.2)
            ax_lat.annotate(mark.label, (mark.t_s, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                            va="top", ha="right", fontsize=7, color=colour)
        if ax_lat.get_legend_handles_labels()[0]:
            ax_lat.legend(loc="best", fontsize=8)
        fig.tight_layout()
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
    return out_path
