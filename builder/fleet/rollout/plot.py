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
from builder.fleet.transport.store import DeploymentEvent, TelemetryRow

# Deployment events worth a vertical line, and their colours.
MARKED_EVENTS = {"active": "tab:green", "rolled_back": "tab:red", "failed": "tab:red", "rejected": "tab:red",
                 "rollback_requested": "tab:orange"}


GAP_WINDOWS = 3.0  # a pause longer than this many telemetry windows breaks the line (no traffic there)
FULL_MARKER_REQUESTS = 100  # a window with this many requests gets the full marker; fewer, smaller and fainter


@dataclass(frozen=True)
class DeploymentMark:
    t_s: float  # seconds since the series start
    kind: str
    label: str
    deployment_id: str | None = None


@dataclass(frozen=True)
class LatencySegment:
    """Consecutive field windows of one model with no gap between them: one drawn line."""

    model: str
    t_s: tuple[float, ...]
    p50_ms: tuple[float | None, ...]
    p95_ms: tuple[float | None, ...]
    requests: tuple[int, ...]


@dataclass(frozen=True)
class PowerSegment:
    """Consecutive power readings of one kind (measured or estimated) with no gap between them."""

    t_s: tuple[float, ...]
    power_w: tuple[float, ...]
    estimated: bool


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
    segments: tuple[LatencySegment, ...] = ()
    power_segments: tuple[PowerSegment, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.t_s and not self.power_t_s and not self.marks


def _gap_limit_s(rows: Sequence[TelemetryRow]) -> float:
    """``GAP_WINDOWS`` x the telemetry window (the rows' own, else their median spacing)."""
    windows = sorted(r.window_s for r in rows if r.window_s and r.window_s > 0)
    if windows:
        window = windows[len(windows) // 2]
    else:
        spacing = sorted(b.ts - a.ts for a, b in zip(rows, rows[1:]) if b.ts > a.ts)
        window = spacing[len(spacing) // 2] if spacing else 0.0
    return GAP_WINDOWS * window if window > 0 else float("inf")


def _split(rows: Sequence[TelemetryRow], key: "object", gap_s: float) -> list[list[TelemetryRow]]:
    """Runs of rows with the same ``key(row)`` and no pause longer than ``gap_s``."""
    runs: list[list[TelemetryRow]] = []
    for row in rows:
        if runs and key(runs[-1][-1]) == key(row) and row.ts - runs[-1][-1].ts <= gap_s:  # type: ignore[operator]
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _is_estimate(source: str) -> bool:
    return source.lower().startswith("estimate")


def plot_series(device_id: str, telemetry: Sequence[TelemetryRow], events: Sequence[DeploymentEvent]) -> PlotSeries:
    """Latency from windows that served requests; power only where measured (no zeros invented).
    Lines break at pauses without traffic and where the model changes; one mark per deployment."""
    stamps = [r.ts for r in telemetry] + [e.ts for e in events if e.kind in MARKED_EVENTS]
    start = min(stamps) if stamps else 0.0
    ordered = sorted(telemetry, key=lambda r: (r.ts, r.seq))
    field = [r for r in ordered if r.requests > 0 and r.event == "periodic"]
    powered = [r for r in ordered if r.power_w is not None]
    marks = []
    # progress events carry no model name; the push's "desired" event of the same deployment does
    models = {e.deployment_id: str(e.detail.get("model", "")) for e in events
              if e.kind == "desired" and e.deployment_id and e.detail}
    seen: set[tuple[str, str]] = set()
    for e in sorted(events, key=lambda e: e.ts):
        if e.kind not in MARKED_EVENTS:
            continue
        if e.deployment_id:
            if (e.deployment_id, e.kind) in seen:  # a re-announced state is the same deployment
                continue
            seen.add((e.deployment_id, e.kind))
        short = (e.artifact_id or "")[:8]
        model = str(e.detail.get("model", "")) if e.detail else ""
        model = model or models.get(e.deployment_id or "", "")
        marks.append(DeploymentMark(e.ts - start, e.kind, f"{e.kind} {model or short}".strip(), e.deployment_id))
    names = {e.artifact_id: str(e.detail.get("model", "")) for e in events
             if e.kind == "desired" and e.artifact_id and e.detail and e.detail.get("model")}
    gap_s = _gap_limit_s([r for r in ordered if r.event == "periodic"] or ordered)
    segments = tuple(
        LatencySegment(model=names.get(run[0].model_id or "") or (run[0].model_id or "unknown model")[:12], t_s=tuple(r.ts - start for r in run),
                       p50_ms=tuple(r.p50_ms for r in run), p95_ms=tuple(r.p95_ms for r in run),
                       requests=tuple(r.requests for r in run))
        for run in _split(field, lambda r: r.model_id, gap_s))
    power_segments = tuple(
        PowerSegment(t_s=tuple(r.ts - start for r in run), power_w=tuple(float(r.power_w) for r in run),  # type: ignore[arg-type]
                     estimated=_is_estimate(run[0].power_source))
        for run in _split(powered, lambda r: _is_estimate(r.power_source), gap_s))
    return PlotSeries(
        device_id=device_id, start_ts=start,
        t_s=tuple(r.ts - start for r in field), p50_ms=tuple(r.p50_ms for r in field),
        p95_ms=tuple(r.p95_ms for r in field),
        power_t_s=tuple(r.ts - start for r in powered), power_w=tuple(float(r.power_w) for r in powered if r.power_w is not None),
        marks=tuple(marks),
        power_estimated=bool(powered) and all(_is_estimate(r.power_source) for r in powered),
        segments=segments, power_segments=power_segments)


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
    fig, (ax_lat, ax_pow) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    try:
        _draw_latency(ax_lat, series)
        _draw_power(ax_pow, series)
        _draw_marks(ax_lat, ax_pow, series.marks)
        ax_lat.set_ylabel("field latency (ms)")
        ax_lat.set_title(f"{series.device_id}: field latency and power (marker size = requests in the window)")
        ax_lat.set_ylim(bottom=0)
        ax_pow.set_ylabel("power (W)")
        _time_axis(ax_pow, series)
        if ax_lat.get_legend_handles_labels()[0]:
            ax_lat.legend(loc="lower left", fontsize=7, ncol=2)
        fig.tight_layout()
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
    return out_path


def _draw_latency(ax: "object", series: PlotSeries) -> None:
    """One colour per model, p50 solid and p95 dashed; a new line after every gap."""
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"]
    by_model: dict[str, str] = {}
    for segment in series.segments:
        first = segment.model not in by_model
        colour = by_model.setdefault(segment.model, colours[len(by_model) % len(colours)])
        for name, ys, style in (("p50", segment.p50_ms, "-"), ("p95", segment.p95_ms, "--")):
            pairs = [(t, float(y), n) for t, y, n in zip(segment.t_s, ys, segment.requests) if y is not None]
            if not pairs:
                continue
            xs, vals, counts = zip(*pairs)
            label = f"{_short(segment.model)} {name}" if first else None
            ax.plot(xs, vals, style, color=colour, lw=1.2, label=label)  # type: ignore[attr-defined]
            weight = [min(1.0, n / FULL_MARKER_REQUESTS) for n in counts]
            ax.scatter(xs, vals, s=[4 + 36 * w for w in weight], color=colour,  # type: ignore[attr-defined]
                       alpha=0.9 if name == "p50" else 0.6, marker="o" if name == "p50" else "s", zorder=3)


def _draw_power(ax: "object", series: PlotSeries) -> None:
    if not series.power_segments:
        ax.text(0.5, 0.5, "power not measured on this device", ha="center", va="center",  # type: ignore[attr-defined]
                transform=ax.transAxes, color="gray")  # type: ignore[attr-defined]
        return
    labelled: set[bool] = set()
    for segment in series.power_segments:
        label = None
        if segment.estimated not in labelled:
            label = "estimate (device profile, no sensor)" if segment.estimated else "measured"
            labelled.add(segment.estimated)
        ax.plot(segment.t_s, segment.power_w, ":" if segment.estimated else "-",  # type: ignore[attr-defined]
                color="gray" if segment.estimated else "tab:purple", lw=1.5 if segment.estimated else 1.2, label=label)
    ax.set_ylim(bottom=0)  # type: ignore[attr-defined]
    ax.legend(loc="lower left", fontsize=7)  # type: ignore[attr-defined]


def _draw_marks(ax_lat: "object", ax_pow: "object", marks: Sequence[DeploymentMark]) -> None:
    """A vertical line per mark; one label per deployment, staggered over four heights so close
    deployments do not print on top of each other."""
    labelled: set[str] = set()
    level = 0
    for mark in marks:
        colour = MARKED_EVENTS.get(mark.kind, "gray")
        for ax in (ax_lat, ax_pow):
            ax.axvline(mark.t_s, color=colour, linestyle=":", linewidth=1.0)  # type: ignore[attr-defined]
        key = mark.deployment_id or f"{mark.t_s}:{mark.kind}"
        if key in labelled:
            continue
        labelled.add(key)
        ax_lat.annotate(mark.label, (mark.t_s, 0.98 - 0.09 * (level % 4)), xycoords=("data", "axes fraction"),  # type: ignore[attr-defined]
                        xytext=(3, 0), textcoords="offset points", va="top", ha="left", fontsize=7, color=colour,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        level += 1


def _time_axis(ax: "object", series: PlotSeries) -> None:
    """Seconds for short sessions, minutes once a session is longer than a quarter of an hour."""
    span = max([*series.t_s, *series.power_t_s, *(m.t_s for m in series.marks), 0.0])
    if span <= 900:
        ax.set_xlabel("time since the first report (s)")  # type: ignore[attr-defined]
        return
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    step_min = next((m for m in (1, 2, 5, 10, 15, 30, 60, 120, 240, 720) if span / 60 / m <= 10), 1440)
    ax.xaxis.set_major_locator(MultipleLocator(60 * step_min))  # type: ignore[attr-defined]
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x / 60:g}"))  # type: ignore[attr-defined]
    ax.set_xlabel("time since the first report (min)")  # type: ignore[attr-defined]


def _short(model: str) -> str:
    return model if len(model) <= 24 else model[:12] + "…"
