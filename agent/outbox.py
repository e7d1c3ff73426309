"""Which buffered telemetry records to send now: the device side of application-level acks.

Pure logic over seq numbers and a clock (no threads, no MQTT, no storage), so the agent's SQLite
outbox (``agent/telemetry.py``) and an asyncio fleet simulator drive the same rules:

* a record stays in the outbox until the host's ``TelemetryAck`` says it is **stored** (a broker's
  PUBACK only says the broker has it: Mosquitto drops what exceeds a subscriber's queue, and a host
  that is not subscribed at that moment never sees it);
* at most ``window`` records are in flight (sent, not acked), fewer while records time out: the
  window halves on every round of timeouts and grows by one per acked record (AIMD, as TCP does),
  so a fleet flushing at once backs off to what the broker's queue for the host absorbs instead of
  re-flooding it in lockstep;
* a record not acked within ``resend_after_s`` is sent again, its timeout doubling up to
  ``max_resend_after_s`` (a host that is down, or one too old to ack, costs a bounded trickle);
* after a reconnect every unacked record may go again at once (``on_reconnect``).

Typical use (``pending`` = the oldest ``window`` seqs still in the outbox, ascending)::

    window = AckWindow(incarnation)
    for seq in window.to_send(pending, now):   # publish each, then
        ...
    window.mark_sent(seqs, now)
    acked_ranges = window.on_ack(ack)           # delete these ranges from storage
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from agent.protocol import TelemetryAck

DEFAULT_WINDOW = 100  # records in flight per device: well under a broker's per-client queue (Mosquitto: 1000)
DEFAULT_RESEND_AFTER_S = 10.0
DEFAULT_MAX_RESEND_AFTER_S = 60.0


@dataclass(frozen=True)
class WindowStats:
    in_flight: int
    sent: int  # first sends
    resent: int  # sends of a record that had been sent before
    acked: int  # in-flight records an ack released
    window: int  # records that may be in flight now (AIMD: <= the configured window)


class AckWindow:
    """In-flight bookkeeping for one incarnation's records; not thread-safe (the caller locks)."""

    def __init__(self, incarnation: str, window: int = DEFAULT_WINDOW, resend_after_s: float = DEFAULT_RESEND_AFTER_S,
                 max_resend_after_s: float = DEFAULT_MAX_RESEND_AFTER_S) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if resend_after_s <= 0 or max_resend_after_s < resend_after_s:
            raise ValueError("need 0 < resend_after_s <= max_resend_after_s")
        self.incarnation = incarnation
        self.window = window
        self.resend_after_s = resend_after_s
        self.max_resend_after_s = max_resend_after_s
        self._in_flight: dict[int, tuple[float, int]] = {}  # seq -> (sent at, sends so far)
        self._cwnd = float(window)
        self._sent = self._resent = self._acked = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stats(self) -> WindowStats:
        return WindowStats(in_flight=len(self._in_flight), sent=self._sent, resent=self._resent, acked=self._acked,
                           window=int(self._cwnd))

    def _timeout_s(self, sends: int) -> float:
        return float(min(self.max_resend_after_s, self.resend_after_s * (2.0 ** min(max(sends - 1, 0), 20))))

    def _expired(self, seq: int, now: float) -> bool:
        sent_at, sends = self._in_flight[seq]
        return now - sent_at >= self._timeout_s(sends)

    def next_due_in_s(self, now: float) -> float | None:
        """Seconds until the earliest in-flight record times out (None: nothing in flight)."""
        if not self._in_flight:
            return None
        return max(0.0, min(sent_at + self._timeout_s(sends) - now for sent_at, sends in self._in_flight.values()))

    # -- decisions ------------------------------------------------------------------------------
    def to_send(self, pending: Sequence[int], now: float) -> list[int]:
        """The seqs to publish now, ascending: unsent or timed-out records among ``pending`` (the
        oldest ``window`` seqs of the outbox, ascending), as many as the window has room for."""
        self._forget_gone(pending)
        expired = [seq for seq in self._in_flight if self._expired(seq, now) and self._in_flight[seq][0] > float("-inf")]
        if expired:  # timeouts: something between here and the host's store is overloaded
            self._cwnd = max(1.0, self._cwnd / 2)
        live = sum(1 for seq in self._in_flight if not self._expired(seq, now))
        room = int(self._cwnd) - live
        out: list[int] = []
        for seq in pending:
            if room <= 0:
                break
            if seq in self._in_flight and not self._expired(seq, now):
                continue
            out.append(seq)
            room -= 1
        return out

    def _forget_gone(self, pending: Sequence[int]) -> None:
        """In-flight seqs that left the outbox (acked through another path, evicted by its bounds)."""
        if not self._in_flight:
            return
        present = set(pending)
        horizon = pending[-1] if len(pending) >= self.window else None  # beyond it the outbox was not read
        for seq in [s for s in self._in_flight if s not in present and (horizon is None or s < horizon)]:
            del self._in_flight[seq]

    def mark_sent(self, seqs: Sequence[int], now: float) -> None:
        for seq in seqs:
            previous = self._in_flight.get(seq)
            if previous is None:
                self._sent += 1
                self._in_flight[seq] = (now, 1)
            else:
                self._resent += 1
                self._in_flight[seq] = (now, previous[1] + 1)

    def on_ack(self, ack: TelemetryAck) -> tuple[tuple[int, int], ...]:
        """The ranges storage may delete (empty for another incarnation's ack)."""
        if ack.incarnation != self.incarnation:
            return ()
        for seq in [s for s in self._in_flight if ack.covers(s)]:
            del self._in_flight[seq]
            self._acked += 1
            self._cwnd = min(float(self.window), self._cwnd + 1.0)
        return ack.ranges

    def on_reconnect(self) -> None:
        """A new connection: acks of what was in flight may have been lost with the old one, so all
        of it is due again now (sends are still counted, for the backoff and the stats)."""
        self._in_flight = {seq: (float("-inf"), sends) for seq, (_, sends) in self._in_flight.items()}
