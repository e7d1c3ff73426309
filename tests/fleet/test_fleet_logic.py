"""Pure fleet logic and the fleet store (on SQLite and on PostgreSQL: same results): no broker, no models."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from builder.errors import UsageError
from builder.fleet.rollout.canary import CanaryEvidence, CanaryThresholds, judge_canaries, split_canaries
from builder.fleet.rollout.plot import plot_series, render_plot
from builder.fleet.rollout.status import format_power, status_cells, status_rows
from builder.fleet.transport.store import (
    BenchmarkRow, DeploymentEvent, FleetStore, TelemetryRow, fleet_store_path,
)

OpenStore = Callable[[Path], FleetStore]  # tests/conftest.py: open_store on SQLite, then on PostgreSQL


def _tel(device: str, seq: int, ts: float, model: str | None, requests: int = 10, p50: float | None = 5.0,
         p95: float | None = 9.0, power: float | None = None, event: str = "periodic") -> TelemetryRow:
    return TelemetryRow(device_id=device, seq=seq, ts=ts, event=event, model_id=model, window_s=10, requests=requests,
                        p50_ms=p50, p95_ms=p95, latency_ms={"p50": p50, "p95": p95}, power_w=power,
                        power_source="ina3221" if power is not None else "not measured", received_at=ts)


def test_store_keeps_registration_and_announcements(tmp_path: Path, open_fleet_store: OpenStore) -> None:
    store = open_fleet_store(tmp_path)
    store.register_device("pi-1", "raspberry-pi-4", group="kitchen")
    store.record_hello("pi-1", agent_version="0.1.0", profile="generic", machine="aarch64",
                       runtimes=("onnxruntime",), execution_providers=("CPUExecutionProvider",), active_artifact_id=None)
    device = store.device("pi-1")
    assert device.profile == "raspberry-pi-4"  # registration wins over what the agent guessed
    assert device.group == "kitchen" and device.online and device.runtimes == ("onnxruntime",)
    store.record_status("pi-1", online=True, active_artifact_id="a" * 64, active_model="cnn@1", previous_artifact_id=None)
    store.record_status("pi-1", online=False)  # last will: keeps what it ran
    device = store.device("pi-1")
    assert not device.online and device.active_artifact_id == "a" * 64 and device.active_model == "cnn@1"
    # an unknown device that says hello is registered with its announced profile
    store.record_hello("jet-1", agent_version="0.1.0", profile="jetson-orin-nano", machine="aarch64", runtimes=(),
                       execution_providers=(), active_artifact_id=None)
    assert [d.device_id for d in store.devices()] == ["jet-1", "pi-1"]
    assert [d.device_id for d in store.devices(group="kitchen")] == ["pi-1"]
    with pytest.raises(UsageError, match="add-device"):
        store.device("nope")


def test_store_ignores_resent_telemetry_and_orders_by_time(tmp_path: Path, open_fleet_store: OpenStore) -> None:
    store = open_fleet_store(tmp_path)
    store.register_device("pi-1", "raspberry-pi-4")
    assert store.add_telemetry(_tel("pi-1", 2, 200.0, "m1"))
    assert store.add_telemetry(_tel("pi-1", 1, 100.0, "m1"))
    assert not store.add_telemetry(_tel("pi-1", 1, 100.0, "m1"))  # buffered re-send after reconnect
    assert [r.seq for r in store.telemetry("pi-1")] == [1, 2]
    assert [r.seq for r in store.telemetry("pi-1", since=150.0)] == [2]
    assert store.requests_served("pi-1", "m1") == 20
    assert store.latest_field_telemetry_for("pi-1", "m2") is None


def test_store_is_shared_by_threads_and_connections(tmp_path: Path, store_url: str | None) -> None:
    path = store_url or fleet_store_path(tmp_path)
    writers = [FleetStore(path) for _ in range(3)]
    writers[0].register_device("d", "raspberry-pi-4")

    def write(store: FleetStore, base: int) -> None:
        for i in range(50):
            store.add_telemetry(_tel("d", base + i, float(base + i), "m"))
            store.add_event(DeploymentEvent("d", float(i), "progress"))

    threads = [threading.Thread(target=write, args=(s, k * 1000)) for k, s in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = FleetStore(path)
    assert len(reader.telemetry("d")) == 150 and len(reader.events("d", kinds=("progress",))) == 150


def test_store_finds_benchmark_of_an_artifact(tmp_path: Path, open_fleet_store: OpenStore) -> None:
    store = open_fleet_store(tmp_path)
    store.add_benchmark(BenchmarkRow("d", 1.0, "old", 10.0, 12.0))
    store.add_benchmark(BenchmarkRow("d", 2.0, "new", 5.0, 6.0))
    assert store.latest_benchmark("d", "old").p95_ms == 12.0
    assert store.latest_benchmark("d", None) is None


def test_status_rows_show_field_latency_of_the_active_model_only(tmp_path: Path, open_fleet_store: OpenStore) -> None:
    store = open_fleet_store(tmp_path)
    store.register_device("pi-1", "raspberry-pi-4")
    store.register_device("jet-1", "jetson-orin-nano")
    store.record_status("pi-1", online=True, active_artifact_id="new", active_model="minilm@2")
    store.add_telemetry(_tel("pi-1", 1, 100.0, "old", p50=20.0, p95=30.0))
    store.add_telemetry(_tel("pi-1", 2, 110.0, "new", p50=7.5, p95=11.0, power=None))
    store.add_telemetry(_tel("pi-1", 3, 120.0, "new", requests=0, p50=None, p95=None, power=3.2))
    devices = store.devices()
    field = {d.device_id: store.latest_field_telemetry_for(d.device_id, d.active_artifact_id) for d in devices}
    latest = {d.device_id: store.latest_telemetry(d.device_id) for d in devices}
    requests = {d.device_id: store.requests_served(d.device_id, d.active_artifact_id) for d in devices}
    rows = status_rows(devices, field, latest, requests, now=time.time())
    by_id = {r.device_id: r for r in rows}
    pi = by_id["pi-1"]
    assert (pi.field_p50_ms, pi.field_p95_ms, pi.requests, pi.power_w) == (7.5, 11.0, 10, 3.2)
    cells = status_cells(pi)
    assert cells[1] == "online" and cells[3] == "minilm@2" and cells[4] == "7.50" and cells[7] == "3.20 W"
    jet = status_cells(by_id["jet-1"])
    assert jet[1] == "offline" and jet[4] == "—" and jet[7] == "not measured" and jet[9] == "never"
    assert format_power(None, "not measured") == "not measured"  # never a made-up 0 W


def test_plot_series_marks_deployments_and_skips_unmeasured_power(tmp_path: Path) -> None:
    telemetry = [_tel("d", 1, 100.0, "a", power=2.0), _tel("d", 2, 110.0, "a", requests=0),
                 _tel("d", 3, 120.0, "b", p50=3.0, p95=4.0, power=None)]
    events = [DeploymentEvent("d", 114.0, "desired", "dep-1", "b" * 64, {"model": "cnn@2"}),
              DeploymentEvent("d", 115.0, "active", "dep-1", artifact_id="b" * 64),
              DeploymentEvent("d", 116.0, "downloading")]
    series = plot_series("d", telemetry, events)
    assert series.t_s == (0.0, 20.0) and series.p50_ms == (5.0, 3.0)
    assert series.power_w == (2.0,) and series.power_t_s == (0.0,)
    assert [(m.t_s, m.kind, m.label) for m in series.marks] == [(15.0, "active", "active cnn@2")]
    out = render_plot(series, tmp_path / "plots" / "d.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="no telemetry"):
        render_plot(plot_series("e", [], []), tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_canary_split_is_deterministic_and_never_empty() -> None:
    assert split_canaries(["c", "a", "b", "d"], 25) == (["a"], ["b", "c", "d"])
    assert split_canaries(["c", "a", "b"], 50) == (["a", "b"], ["c"])
    assert split_canaries(["a", "b"], 1) == (["a"], ["b"])
    assert split_canaries(["a", "b"], 0) == ([], ["a", "b"])
    with pytest.raises(UsageError):
        split_canaries(["a"], 150)


def test_canary_verdict_stops_on_failure_or_regression() -> None:
    good = CanaryEvidence("a", "active", previous_p95_ms=10.0, candidate_p95_ms=8.0)
    assert judge_canaries([good]).proceed
    failed = CanaryEvidence("b", "rolled_back", error="health check: outputs differ")
    verdict = judge_canaries([good, failed])
    assert not verdict.proceed and "b: rolled_back (health check: outputs differ)" in verdict.reasons
    slow = CanaryEvidence("c", "active", previous_p95_ms=10.0, candidate_p95_ms=13.0)
    verdict = judge_canaries([slow], CanaryThresholds(max_latency_ratio=1.2))
    assert not verdict.proceed and "×1.30" in verdict.reasons[0]
    hungry = CanaryEvidence("d", "active", previous_power_w=2.0, candidate_power_w=3.0)
    assert not judge_canaries([hungry]).proceed
    erring = CanaryEvidence("e", "active", field_requests=100, field_errors=5)
    assert "error rate" in judge_canaries([erring]).reasons[0]
    few = CanaryEvidence("f", "active", field_requests=3, field_errors=3)  # too few requests to judge
    verdict = judge_canaries([few])
    assert verdict.proceed and "no benchmark" in verdict.reasons[0]
    assert not judge_canaries([]).proceed


def test_push_table_compares_with_the_previous_model() -> None:
    from builder.fleet.rollout.push import DeviceOutcome
    from builder.fleet.rollout.push_report import comparison, format_bytes, outcome_cells

    before = BenchmarkRow("d", 1.0, "old", 4.0, 8.0, power_w=2.0, power_source="ina3221")
    after = BenchmarkRow("d", 2.0, "new", 2.0, 4.0, power_w=1.5, power_source="ina3221")
    outcome = DeviceOutcome("d", "new" * 10, "active", model="cnn@2", size_bytes=3 << 20, previous_artifact_id="old",
                            previous_model="cnn@1", before=before, after=after)
    cells = outcome_cells(outcome)
    assert cells[:6] == ("d", "active", "cnn@2 newnewnewnew", "3.15 MB", "2.00", "4.00")
    assert cells[7] == "p95 ×0.50 (8.00 → 4.00 ms), power ×0.75"
    first = DeviceOutcome("d", "new", "active", previous_artifact_id=None, after=after)
    assert comparison(first) == "first model on this device"
    failed = DeviceOutcome("d", "new", "failed", error="health check failed, previous model kept")
    assert outcome_cells(failed)[1] == "failed: health check failed, previous model kept" and not failed.ok
    assert DeviceOutcome("d", "new", "pending").ok
    assert format_bytes(0) == "—" and format_bytes(2048) == "2.05 kB"  # decimal units (docs/cli.md)


def test_cli_parses_durations_and_percentages() -> None:
    from builder.cli.fleet import parse_since
    from builder.cli.push import parse_percent

    assert parse_since("10m", now=1000.0) == 400.0 and parse_since(None) is None
    assert parse_since("1970-01-01T00:01:00") == 60.0
    with pytest.raises(UsageError):
        parse_since("yesterday")
    assert parse_percent("10%") == 10.0 and parse_percent("25") == 25.0
    with pytest.raises(UsageError):
        parse_percent("ten")


def test_ingest_keeps_power_estimates_labelled_and_never_invents_measurements() -> None:
    from agent import protocol as proto
    from builder.fleet.rollout.status import format_power
    from builder.fleet.transport.serve import benchmark_row, telemetry_row

    report = proto.TelemetryReport(device_id="d", seq=3, ts=10.0, event="periodic", requests=5,
                                   latency_ms={"p50": 1.5, "p95": 2.5},
                                   details={"estimated_power_w": 3.4, "power_estimate_basis": "profile typical_w"})
    row = telemetry_row("d", report, received_at=11.0)
    assert (row.p50_ms, row.p95_ms, row.power_w) == (1.5, 2.5, 3.4)
    assert row.power_source.startswith("estimate") and format_power(row.power_w, row.power_source) == "≈3.40 W (est.)"
    bare = telemetry_row("d", proto.TelemetryReport(device_id="d", seq=4, ts=11.0, event="periodic"), 12.0)
    assert bare.power_w is None and bare.p50_ms is None
    bench = benchmark_row("d", {"artifact_id": "a", "latency": {"p50": 1.0, "p95": 2.0}, "power_w": 5.0,
                                "power_source": "ina3221", "energy_per_inference_j": 0.002}, ts=1.0)
    assert (bench.p95_ms, bench.power_w, bench.energy_mj) == (2.0, 5.0, 2.0)


def test_store_knows_each_devices_last_desired_deployment(tmp_path: Path, open_fleet_store: OpenStore) -> None:
    store = open_fleet_store(tmp_path)
    store.add_event(DeploymentEvent("a", 1.0, "desired", "dep-1", "art-1"))
    store.add_event(DeploymentEvent("a", 2.0, "failed", "dep-1", "art-1"))
    store.add_event(DeploymentEvent("a", 3.0, "desired", "restore-1", "art-0", {"restore": True}))
    store.add_event(DeploymentEvent("b", 1.0, "desired", "dep-2", "art-2"))
    store.add_event(DeploymentEvent("b", 2.0, "desired_cleared"))
    latest = store.latest_desired()
    assert list(latest) == ["a"] and (latest["a"].deployment_id, latest["a"].artifact_id) == ("restore-1", "art-0")


def test_push_result_table_renders_every_outcome() -> None:
    from rich.console import Console

    from builder.cli.push import outcome_table
    from builder.fleet.rollout.push import DeviceOutcome

    console = Console(record=True, width=200)
    console.print(outcome_table([DeviceOutcome("pi-01", "a" * 64, "active", model="cnn@1"),
                                 DeviceOutcome("pi-02", "a" * 64, "pending"),
                                 DeviceOutcome("pi-03", "a" * 64, "rejected", error="bad signature")], "Push result"))
    text = console.export_text()
    assert "pi-01" in text and "pending" in text and "rejected: bad signature" in text


def test_push_refuses_builds_for_other_profiles_unless_portable_or_forced() -> None:
    from builder.artifacts.registry import ArtifactRecord
    from builder.fleet.rollout.push import check_runs_on
    from builder.fleet.transport.store import DeviceRecord

    pi = DeviceRecord("pi-01", profile="raspberry-pi-4", runtimes=("onnxruntime", "litert"))

    def record(profile: str, runtime: str, precision: str, fmt: str) -> ArtifactRecord:
        return ArtifactRecord("a" * 64, "m", "1", profile, runtime, precision, fmt, 1, 0.0)

    for foreign in (record("jetson-orin-nano", "onnxruntime-tensorrt", "fp16", "onnx"),
                    record("android-arm64", "litert", "int8", "tflite"),
                    record("x86-64-host", "onnxruntime", "int8", "ort")):  # .ort files carry platform-specific optimisations
        with pytest.raises(UsageError, match=f"built for {foreign.profile}.*raspberry-pi-4.*--force"):
            check_runs_on(foreign, pi)
        assert check_runs_on(foreign, pi, allow_other_profile=True)  # --force: pushed, with a note
    assert check_runs_on(record("raspberry-pi-4", "litert", "int8", "tflite"), pi) == ()
    # one CPU ONNX file built for two profiles is one artifact (content id): a note, not an error
    assert check_runs_on(record("jetson-orin-nano", "onnxruntime", "fp32", "onnx"), pi)
