"""Where one device stands in a push, as a pure state machine (no broker, no clock, no I/O).

A fleet push keeps one ``DeviceTrack`` per device and feeds it what happens (desired sent, a
progress message of *its* deployment, a benchmark reply, the passing of time); each call returns a
new track. The shell (``builder.fleet.rollout.wave``) performs what a change of phase asks for.

    baseline? -> queued -> desired_sent -> transferring -> benchmarking? -> active
                                 |               |              |
                                 +-> pending (offline), timeout, failed, rejected, rolled_back

Timeouts are measured per device from its own start: ``answer_timeout_s`` from the moment its
desired deployment was sent, ``timeout_s`` from its first progress message, so devices still queued
for a transfer slot never time out.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from agent import protocol as proto


class Phase(str, enum.Enum):
    BASELINE = "baseline"  # benchmarking the previous model first (command sent)
    QUEUED = "queued"  # waiting for a transfer slot
    SENT = "desired_sent"  # desired deployment published, nothing heard yet
    TRANSFERRING = "transferring"  # verifying / downloading / installing
    BENCHMARKING = "benchmarking"  # active; on-device benchmark of the new model running
    ACTIVE = "active"
    PENDING = "pending"  # offline: the retained desired deployment waits for it
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    TIMEOUT = "timeout"
    ERROR = "error"  # the host could not do its part (publish refused, ...)

    @property
    def final(self) -> bool:
        return self in FINAL_PHASES

    @property
    def in_flight(self) -> bool:
        """Holds one of the push's bounded transfer slots."""
        return self in (Phase.SENT, Phase.TRANSFERRING)


FINAL_PHASES = frozenset({Phase.ACTIVE, Phase.PENDING, Phase.FAILED, Phase.REJECTED, Phase.ROLLED_BACK,
                          Phase.TIMEOUT, Phase.ERROR})
_TRANSFERRING_STATES = ("verifying", "downloading", "installing")
_FAILURE_STATES = {"failed": Phase.FAILED, "rejected": Phase.REJECTED, "rolled_back": Phase.ROLLED_BACK}


@dataclass(frozen=True)
class TrackLimits:
    """How long a device may take, each measured from its own start (see the module doc)."""

    answer_timeout_s: float = 120.0  # desired sent -> first progress (online device)
    offline_wait_s: float = 0.0  # offline device: 0 = "pending" at once; else wait this long for an answer
    timeout_s: float = 900.0  # first progress -> final state
    stall_timeout_s: float = 120.0  # between two progress messages
    benchmark_timeout_s: float = 180.0


@dataclass(frozen=True)
class DeviceTrack:
    device_id: str
    online: bool  # at the start of the push
    created_at: float
    phase: Phase = Phase.QUEUED
    benchmark_after: bool = False  # benchmark the new model once active
    deployment_id: str | None = None
    sent_at: float | None = None
    started_at: float | None = None  # first progress message of this deployment
    last_heard_at: float | None = None
    request_at: float | None = None  # benchmark command sent
    finished_at: float | None = None
    transfer_state: str | None = None  # the last TransferProgress.state
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    notes: tuple[str, ...] = ()

    # -- what the shell did ------------------------------------------------------------------
    def baseline_requested(self, now: float) -> "DeviceTrack":
        return replace(self, phase=Phase.BASELINE, request_at=now)

    def baseline_done(self, note: str | None = None) -> "DeviceTrack":
        if self.phase is not Phase.BASELINE:
            return self
        return replace(self, phase=Phase.QUEUED, request_at=None, notes=self.notes + ((note,) if note else ()))

    def sent(self, deployment_id: str, now: float, limits: TrackLimits) -> "DeviceTrack":
        """The desired deployment reached the broker. An offline device is done at once ("pending")
        unless the push waits for offline devices."""
        track = replace(self, phase=Phase.SENT, deployment_id=deployment_id, sent_at=now)
        if not self.online and limits.offline_wait_s <= 0:
            return track._finish(Phase.PENDING, now, note="device offline; the retained desired deployment waits for it")
        return track

    def failed_to_send(self, error: str, now: float) -> "DeviceTrack":
        return replace(self, error=error)._finish(Phase.ERROR, now)

    def benchmark_done(self, now: float, error: str | None = None) -> "DeviceTrack":
        if self.phase is not Phase.BENCHMARKING:
            return self
        note = f"benchmark after install failed: {error}" if error else None
        return self._finish(Phase.ACTIVE, now, note=note)

    def cancelled(self, now: float) -> "DeviceTrack":
        return replace(self, error="push cancelled")._finish(Phase.ERROR, now) if not self.phase.final else self

    # -- what the device said ----------------------------------------------------------------
    def on_progress(self, progress: proto.TransferProgress, now: float) -> "DeviceTrack":
        """A progress message routed to this device. One of another deployment changes nothing."""
        if progress.deployment_id != self.deployment_id:
            return self
        if self.phase is Phase.BENCHMARKING and progress.state == "rolled_back":
            return replace(self, transfer_state=progress.state, error=progress.error)._finish(Phase.ROLLED_BACK, now)
        if self.phase not in (Phase.SENT, Phase.TRANSFERRING):
            return self
        heard = replace(self, last_heard_at=now, transfer_state=progress.state, online=True,
                        bytes_done=progress.bytes_done or self.bytes_done,
                        bytes_total=progress.bytes_total or self.bytes_total)
        if progress.state in _TRANSFERRING_STATES:
            return replace(heard, phase=Phase.TRANSFERRING, started_at=self.started_at or now)
        if progress.state == "active":
            if self.benchmark_after:
                return replace(heard, phase=Phase.BENCHMARKING, request_at=now, started_at=self.started_at or now)
            return heard._finish(Phase.ACTIVE, now)
        if progress.state in _FAILURE_STATES:
            return replace(heard, error=progress.error)._finish(_FAILURE_STATES[progress.state], now)
        return heard

    # -- the passing of time -----------------------------------------------------------------
    def on_tick(self, now: float, limits: TrackLimits) -> "DeviceTrack":
        if self.phase is Phase.SENT and self.sent_at is not None:
            if not self.online:
                if now - self.sent_at > limits.offline_wait_s:
                    return self._finish(Phase.PENDING, now, note="device still offline; it installs the model when it reconnects")
            elif now - self.sent_at > limits.answer_timeout_s:
                return replace(self, error=f"the device reported no progress within {limits.answer_timeout_s:.0f} s "
                                           "of its desired deployment")._finish(Phase.TIMEOUT, now)
        elif self.phase is Phase.TRANSFERRING and self.started_at is not None:
            if now - self.started_at > limits.timeout_s:
                return replace(self, error=f"no final state within {limits.timeout_s:.0f} s of the transfer's start "
                                           f"(last: {self.transfer_state})")._finish(Phase.TIMEOUT, now)
            if self.last_heard_at is not None and now - self.last_heard_at > limits.stall_timeout_s:
                return replace(self, error=f"no progress for {limits.stall_timeout_s:.0f} s "
                                           f"(last: {self.transfer_state})")._finish(Phase.TIMEOUT, now)
        elif self.phase is Phase.BENCHMARKING and self.request_at is not None:
            if now - self.request_at > limits.benchmark_timeout_s:
                return self.benchmark_done(now, f"no answer within {limits.benchmark_timeout_s:.0f} s")
        elif self.phase is Phase.BASELINE and self.request_at is not None:
            if now - self.request_at > limits.benchmark_timeout_s:
                return self.baseline_done(f"baseline benchmark: no answer within {limits.benchmark_timeout_s:.0f} s")
        return self

    # -- derived -------------------------------------------------------------------------------
    def _finish(self, phase: Phase, now: float, note: str | None = None) -> "DeviceTrack":
        return replace(self, phase=phase, finished_at=now, notes=self.notes + ((note,) if note else ()))

    @property
    def seconds(self) -> float:
        """From its desired deployment to its final state (the device's own push time)."""
        if self.sent_at is None:
            return 0.0
        return max(0.0, (self.finished_at if self.finished_at is not None else self.sent_at) - self.sent_at)

    @property
    def wait_s(self) -> float:
        """How long it waited (baseline, transfer slot) before its desired deployment went out."""
        end = self.sent_at if self.sent_at is not None else self.finished_at
        return max(0.0, (end if end is not None else self.created_at) - self.created_at)
