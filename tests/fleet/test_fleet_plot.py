"""`builder fleet plot` over a session with pauses, two models and estimated power: lines break at
pauses and model changes, one label per deployment, estimates drawn apart, latency from zero."""
from __future__ import annotations

from pathlib import Path

from builder.fleet.rollout.plot import plot_series, render_plot
from builder.fleet.transport.store import DeploymentEvent, TelemetryRow

A, B = "a" * 64, "b" * 64


def _window(seq: int, ts: float, model: str, requests: int = 120, power_source: str = "estimate (profile)",
            power: float | None = 2.0) -> TelemetryRow:
    return TelemetryRow("pi", seq, ts, "periodic", model_id=model, window_s=10.0, requests=requests, p50_ms=5.0,
                        p95_ms=8.0, power_w=power, power_source=power_source)


def _session() -> tuple[list[TelemetryRow], list[DeploymentEvent]]:
    rows = [_window(i, 1000 + 10 * i, A, requests=1 if i == 3 else 150) for i in range(10)]
    rows += [_window(10 + i, 1300 + 10 * i, A) for i in range(5)]  # after 200 s without traffic (20 windows)
    rows += [_window(20 + i, 1350 + 10 * i, B, power_source="ina219", power=1.4) for i in range(5)]  # new model
    events = [DeploymentEvent("pi", 999, "desired", "d1", A, {"model": "minilm@1"}),
              DeploymentEvent("pi", 1000, "active", "d1", A), DeploymentEvent("pi", 1001, "active", "d1", A),
              DeploymentEvent("pi", 1344, "desired", "d2", B, {"model": "minilm-int8@2"}),
              DeploymentEvent("pi", 1345, "active", "d2", B)]
    return rows, events


def test_lines_break_at_pauses_and_model_changes_and_each_deployment_is_marked_once(tmp_path: Path) -> None:
    rows, events = _session()
    series = plot_series("pi", rows, events)
    assert [(s.model, len(s.t_s)) for s in series.segments] == [("minilm@1", 10), ("minilm@1", 5), ("minilm-int8@2", 5)]
    assert series.segments[0].requests[3] == 1  # the 1-request window keeps its weight (drawn small)
    assert [m.label for m in series.marks] == ["active minilm@1", "active minilm-int8@2"]
    assert [(s.estimated, len(s.t_s)) for s in series.power_segments] == [(True, 10), (True, 5), (False, 5)]
    assert render_plot(series, tmp_path / "pi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_axis_starts_at_zero_and_power_estimates_are_labelled(tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig) -> None:
        axes = fig.get_axes()
        seen["ylim"] = axes[0].get_ylim()
        seen["power_labels"] = [line.get_label() for line in axes[1].get_lines()]
        seen["power_styles"] = [line.get_linestyle() for line in axes[1].get_lines() if not line.get_label().startswith("_")]
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    rows, events = _session()
    render_plot(plot_series("pi", rows, events), tmp_path / "pi.png")
    assert seen["ylim"][0] == 0.0
    assert any("estimate" in label for label in seen["power_labels"]) and "measured" in seen["power_labels"]
    assert seen["power_styles"][0] != seen["power_styles"][1]  # estimate dashed/dotted, measured solid
