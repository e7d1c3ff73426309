"""The per-device push state machine and the transfer-slot rule, as pure functions (no broker)."""
from __future__ import annotations

import threading
import time

from agent import protocol as proto
from builder.fleet.rollout.push import MAX_IN_FLIGHT, MIN_IN_FLIGHT, transfer_slots
from builder.fleet.rollout.track import DeviceTrack, Phase, TrackLimits
from builder.fleet.rollout.wave import new_deployment_id

LIMITS = TrackLimits(answer_timeout_s=10, offline_wait_s=0, timeout_s=60, stall_timeout_s=20, benchmark_timeout_s=30)


def _progress(state: str, deployment_id: str = "dep-a", **kw) -> proto.TransferProgress:
    return proto.TransferProgress(deployment_id=deployment_id, artifact_id="art", state=state, **kw)


def _sent(online: bool = True, benchmark_after: bool = False, at: float = 100.0) -> DeviceTrack:
    return DeviceTrack("d1", online=online, created_at=0.0, benchmark_after=benchmark_after).sent("dep-a", at, LIMITS)


def test_a_device_goes_sent_transferring_active_and_its_times_are_its_own() -> None:
    track = _sent()
    assert track.phase is Phase.SENT and track.phase.in_flight and not track.phase.final
    track = track.on_progress(_progress("verifying"), 101.0)
    assert track.phase is Phase.TRANSFERRING and track.started_at == 101.0
    track = track.on_progress(_progress("downloading", bytes_done=5, bytes_total=10), 102.0)
    assert (track.bytes_done, track.bytes_total, track.started_at) == (5, 10, 101.0)
    track = track.on_progress(_progress("active"), 103.5)
    assert track.phase is Phase.ACTIVE and track.phase.final and not track.phase.in_flight
    assert track.seconds == 3.5 and track.wait_s == 100.0  # queued 100 s before its desired went out


def test_progress_of_another_deployment_changes_nothing() -> None:
    track = _sent()
    assert track.on_progress(_progress("failed", deployment_id="dep-b", error="not mine"), 101.0) == track
    assert track.on_progress(_progress("active", deployment_id="dep-b"), 101.0).phase is Phase.SENT


def test_failures_are_final_with_the_devices_reason() -> None:
    for state, phase in (("failed", Phase.FAILED), ("rejected", Phase.REJECTED), ("rolled_back", Phase.ROLLED_BACK)):
        track = _sent().on_progress(_progress("verifying"), 101).on_progress(_progress(state, error="why"), 102)
        assert track.phase is phase and track.error == "why" and track.finished_at == 102
        assert track.on_progress(_progress("active"), 103) == track  # final stays final


def test_an_answer_resets_nothing_but_silence_times_out_from_its_own_start() -> None:
    track = _sent(at=100.0)
    assert track.on_tick(109.0, LIMITS).phase is Phase.SENT
    timed_out = track.on_tick(110.5, LIMITS)
    assert timed_out.phase is Phase.TIMEOUT and "no progress within 10 s" in (timed_out.error or "")
    # transferring: the whole-transfer limit counts from its first progress, the stall from the last one
    moving = track.on_progress(_progress("downloading"), 105.0)
    for t in range(106, 165, 10):
        moving = moving.on_progress(_progress("downloading"), float(t))
        assert moving.on_tick(float(t) + 1, LIMITS).phase is Phase.TRANSFERRING
    assert moving.on_tick(165.5, LIMITS).phase is Phase.TIMEOUT  # 60 s after 105
    stalled = track.on_progress(_progress("installing"), 105.0).on_tick(125.5, LIMITS)
    assert stalled.phase is Phase.TIMEOUT and "no progress for 20 s" in (stalled.error or "")


def test_a_queued_device_never_times_out() -> None:
    queued = DeviceTrack("d1", online=True, created_at=0.0)
    assert queued.on_tick(10_000.0, LIMITS) == queued and queued.phase is Phase.QUEUED
    assert not queued.phase.in_flight


def test_offline_devices_are_pending_at_once_or_after_the_offline_wait() -> None:
    assert _sent(online=False).phase is Phase.PENDING
    waiting = TrackLimits(offline_wait_s=5)
    track = DeviceTrack("d1", online=False, created_at=0.0).sent("dep-a", 100.0, waiting)
    assert track.phase is Phase.SENT and track.on_tick(104.0, waiting).phase is Phase.SENT
    assert track.on_tick(105.5, waiting).phase is Phase.PENDING
    # it came online and answered within the wait: judged as an online device from then on
    answered = track.on_progress(_progress("downloading"), 103.0)
    assert answered.phase is Phase.TRANSFERRING and answered.on_progress(_progress("active"), 104).phase is Phase.ACTIVE


def test_benchmark_after_active_then_active_or_rolled_back() -> None:
    track = _sent(benchmark_after=True).on_progress(_progress("active"), 102.0)
    assert track.phase is Phase.BENCHMARKING and not track.phase.final and not track.phase.in_flight
    assert track.benchmark_done(104.0).phase is Phase.ACTIVE
    late = track.on_tick(132.5, LIMITS)
    assert late.phase is Phase.ACTIVE and any("benchmark after install failed" in n for n in late.notes)
    rolled = track.on_progress(_progress("rolled_back", error="errors"), 103.0)
    assert rolled.phase is Phase.ROLLED_BACK and rolled.error == "errors"


def test_baseline_then_queued() -> None:
    track = DeviceTrack("d1", online=True, created_at=0.0).baseline_requested(1.0)
    assert track.phase is Phase.BASELINE and track.on_tick(30.0, LIMITS).phase is Phase.BASELINE
    assert track.baseline_done().phase is Phase.QUEUED
    assert track.on_tick(31.5, LIMITS).phase is Phase.QUEUED  # no answer: pushed without a baseline


def test_deployment_ids_are_unique_even_within_one_millisecond(monkeypatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.123)  # the clock the old ids were made of
    ids: list[str] = []

    def make() -> None:
        ids.extend(new_deployment_id() for _ in range(500))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 4000 and len(set(ids)) == 4000


def test_transfer_slots_follow_the_models_size() -> None:
    assert transfer_slots(50_000) == MAX_IN_FLIGHT  # a small model: many devices at once
    assert transfer_slots(1 << 30) == max(MIN_IN_FLIGHT, (256 << 20) // (proto.DEFAULT_WINDOW_CHUNKS * proto.MAX_CHUNK_BYTES))
    assert MIN_IN_FLIGHT <= transfer_slots(1 << 30) < transfer_slots(50_000)
    assert transfer_slots(50_000, max_in_flight=3) == 3
