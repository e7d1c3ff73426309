"""The stateful loop over a real fleet store (SQLite file): events, state, dry-run, push failures.
The device is simulated by writing telemetry rows; the broker end-to-end test is test_loop_e2e.py."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from builder.errors import UsageError
from builder.fleet.loop.controller import Rung
from builder.fleet.loop.policy import Pacing, Policy, PolicyStore, scope_for
from builder.fleet.loop.service import (
    LoopStateStore, PushOutcome, ReCompressionLoop, StaticLadders, count_changes, latency_factors,
    loop_events,
)
from builder.fleet.transport.store import FleetStore, TelemetryRow, open_store

LADDER = (Rung("fp32", 10.0, accuracy=0.98), Rung("int8", 5.0, accuracy=0.97), Rung("pruned", 2.5, accuracy=0.93))
POLICY = Policy(latency_p95_ms=15.0, window_s=1.0, accuracy_floor=0.9,
                pacing=Pacing(violate_windows=3, cooldown_s=4.0, judge_windows=2, headroom_windows=5))


class FakeFleet:
    """Pushes succeed (the device switches at once) unless the artifact is in ``broken``."""

    def __init__(self, store: FleetStore, broken: frozenset[str] = frozenset()) -> None:
        self.store, self.broken, self.pushes = store, broken, []

    def push(self, device_id: str, artifact_id: str) -> PushOutcome:
        self.pushes.append(artifact_id)
        if artifact_id in self.broken:
            return PushOutcome(False, "health check failed: outputs differ")
        self.store.record_status(device_id, online=True, active_artifact_id=artifact_id)
        return PushOutcome(True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(loop: ReCompressionLoop, store: FleetStore, clock: Clock, slowdown, n: int, start_seq: int = 0) -> None:
    est = {r.artifact_id: r.estimated_latency_ms for r in LADDER}
    for i in range(n):
        clock.now += 1.0
        active = store.device("pi").active_artifact_id
        p95 = est[active] * slowdown(i)
        store.add_telemetry(TelemetryRow(device_id="pi", seq=start_seq + i, ts=clock.now, event="periodic",
                                         model_id=active, window_s=1.0, requests=40, p50_ms=p95 * 0.8, p95_ms=p95))
        loop.step("pi")


@pytest.fixture()
def fleet(tmp_path: Path):
    store = open_store(tmp_path)
    store.register_device("pi", profile="raspberry-pi-4", group="kitchen")
    store.record_status("pi", online=True, active_artifact_id="fp32")
    PolicyStore(store).set(scope_for(group="kitchen"), POLICY, now=0.0)
    yield store
    store.close()


def test_throttle_then_recover_records_events_and_factor(fleet: FleetStore) -> None:
    clock, device = Clock(), FakeFleet(fleet)
    loop = ReCompressionLoop(fleet, device, StaticLadders.of(LADDER), clock=clock)
    run(loop, fleet, clock, lambda i: 1.0, 5)
    run(loop, fleet, clock, lambda i: 2.0, 10, start_seq=5)
    assert device.pushes == ["int8"]
    assert latency_factors(fleet)["pi"] == pytest.approx(2.0, rel=0.15)
    run(loop, fleet, clock, lambda i: 1.0, 20, start_seq=15)
    assert device.pushes == ["int8", "fp32"]
    events = loop_events(fleet, "pi")
    kinds = [e.kind for e in events]
    assert kinds.count("loop.step_down") == 1 and kinds.count("loop.step_up") == 1
    assert kinds.count("loop.accept") == 2
    down = next(e for e in events if e.kind == "loop.step_down")
    assert down.artifact_id == "int8" and down.detail["from_artifact"] == "fp32"
    assert down.detail["numbers"]["violating_p95_ms"] == [20.0, 20.0, 20.0]
    assert count_changes(events) == {"step_down": 1, "step_up": 1}
    assert LoopStateStore(fleet).load("pi").changes == 2


def test_failed_push_is_rolled_back_marked_bad_and_never_retried(fleet: FleetStore) -> None:
    clock, device = Clock(), FakeFleet(fleet, broken=frozenset({"int8"}))
    loop = ReCompressionLoop(fleet, device, StaticLadders.of(LADDER), clock=clock)
    run(loop, fleet, clock, lambda i: 2.0, 30)
    assert device.pushes.count("int8") == 1
    assert device.pushes[-1] == "pruned"
    state = LoopStateStore(fleet).load("pi").state
    assert "int8" in state.bad_rungs
    kinds = [e.kind for e in loop_events(fleet, "pi")]
    assert "loop.push_failed" in kinds and "loop.rollback" in kinds
    rollback = next(e for e in loop_events(fleet, "pi") if e.kind == "loop.rollback")
    assert "health check failed" in rollback.detail["reason"]


def test_dry_run_proposes_without_pushing(fleet: FleetStore) -> None:
    clock = Clock()
    loop = ReCompressionLoop(fleet, None, StaticLadders.of(LADDER), dry_run=True, clock=clock)
    run(loop, fleet, clock, lambda i: 2.0, 12)
    assert fleet.device("pi").active_artifact_id == "fp32"
    proposals = [e for e in loop_events(fleet, "pi") if e.kind == "loop.proposal"]
    assert proposals and proposals[0].detail["action"] == "step_down"
    assert proposals[0].detail["target_artifact"] == "int8" and proposals[0].detail["dry_run"] is True
    assert len(proposals) <= 3  # once per cooldown (4 s) after K=3 windows, not every window


def test_device_without_policy_is_left_alone(fleet: FleetStore, tmp_path: Path) -> None:
    PolicyStore(fleet).remove("group:kitchen")
    clock, device = Clock(), FakeFleet(fleet)
    loop = ReCompressionLoop(fleet, device, StaticLadders.of(LADDER), clock=clock)
    run(loop, fleet, clock, lambda i: 5.0, 10)
    assert device.pushes == [] and loop_events(fleet, "pi") == []


def test_worker_thread_decides_from_hooks(fleet: FleetStore) -> None:
    device = FakeFleet(fleet)
    loop = ReCompressionLoop(fleet, device, StaticLadders.of(LADDER)).start()
    try:
        import time
        now = time.time()
        for i in range(4):
            row = TelemetryRow(device_id="pi", seq=i, ts=now + i, event="periodic", model_id="fp32",
                               window_s=1.0, requests=40, p95_ms=30.0)
            fleet.add_telemetry(row)
            loop.on_telemetry(row)
        deadline = time.time() + 10
        while not device.pushes and time.time() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert device.pushes == ["int8"] or device.pushes == ["pruned"]


def test_no_rung_fits_starts_a_search_once_or_says_why_not(fleet: FleetStore, tmp_path: Path) -> None:
    from builder.fleet.loop.service import OptimizeLauncher

    class Recorder:
        def __init__(self) -> None:
            self.requests = []

        def start(self, device_id, profile, ladder, request) -> str:
            self.requests.append((device_id, profile, request))
            return "started"

    fleet.record_status("pi", online=True, active_artifact_id="pruned")
    clock, device = Clock(), FakeFleet(fleet)
    searches = Recorder()
    loop = ReCompressionLoop(fleet, device, StaticLadders.of(LADDER), search=searches, clock=clock)
    run(loop, fleet, clock, lambda i: 20.0, 12)  # pruned: 2.5 ms x 20 = 50 ms, nothing faster
    assert device.pushes == []
    assert len(searches.requests) == 1  # once: search_pending holds further requests
    device_id, profile, request = searches.requests[0]
    assert (device_id, profile) == ("pi", "raspberry-pi-4")
    assert request.objective_ms == 15.0 and request.latency_factor == pytest.approx(20.0)
    assert request.target_latency_ms == pytest.approx(0.75) and request.accuracy_floor == 0.9
    assert [e.kind for e in loop_events(fleet, "pi")].count("loop.search") == 1

    launcher = OptimizeLauncher(tmp_path)
    with pytest.raises(UsageError, match=r"\[search\] needs model and data"):
        launcher.command("pi", "raspberry-pi-4", LADDER, request)
    request = replace(request, model="builder.zoo.digits_cnn:trained", data="digits.npz", input_shape="x=1x1x8x8")
    cmd = launcher.command("pi", "raspberry-pi-4", LADDER, request)
    assert cmd[cmd.index("--max-latency") + 1] == "15ms" and cmd[cmd.index("--latency-factor") + 1] == "20"
    assert cmd[cmd.index("--profile") + 1] == "raspberry-pi-4" and cmd[cmd.index("--min-accuracy") + 1] == "0.9"
    assert cmd[cmd.index("--data") + 1] == "digits.npz" and cmd[cmd.index("--input-shape") + 1] == "x=1x1x8x8"
    assert cmd[3:5] == ["optimize", "builder.zoo.digits_cnn:trained"]


def test_without_a_search_launcher_the_event_says_so(fleet: FleetStore) -> None:
    fleet.record_status("pi", online=True, active_artifact_id="pruned")
    clock = Clock()
    loop = ReCompressionLoop(fleet, FakeFleet(fleet), StaticLadders.of(LADDER), clock=clock)
    run(loop, fleet, clock, lambda i: 20.0, 12)
    unavailable = [e for e in loop_events(fleet, "pi") if e.kind == "loop.search_unavailable"]
    assert len(unavailable) == 1 and unavailable[0].detail["target_latency_ms"] == pytest.approx(0.75)
