"""Telemetry: field latency windows, a system snapshot, and an on-disk outbox.

Every report goes into the SQLite outbox first and leaves it only once the host acknowledged
storing it (a ``TelemetryAck`` on ``down/ack``; ``agent/outbox.py`` decides what to send and
resend), so reports produced while the broker or the host is away arrive afterwards, complete.
``seq`` increases by one per report within the outbox's **incarnation**, a random id made with a
new outbox (a wiped data dir is a new incarnation, starting at seq 0 again) and persisted.

Until this outbox has seen a host acknowledge anything, it behaves as before acks existed (a
broker's PUBACK counts as delivery, after a short grace period in which an acking host answers the
hello): an older ``builder serve`` keeps working. The outbox is bounded by total bytes and by age:
the oldest reports go first, and how many were dropped is reported (the host sees them as missing).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from agent.bench import LatencyStats
from agent.errors import MqttError
from agent.mqtt import Delivery
from agent.outbox import DEFAULT_MAX_RESEND_AFTER_S, DEFAULT_RESEND_AFTER_S, DEFAULT_WINDOW, AckWindow, WindowStats
from agent.protocol import TelemetryAck, TelemetryReport

log = logging.getLogger(__name__)


class FieldStats:
    """Thread-safe record of real requests (latency, errors) since the last window was taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies_ms: list[float] = []
        self._errors = 0
        self._window_start = time.monotonic()

    def record(self, latency_ms: float | None, ok: bool = True) -> None:
        with self._lock:
            if ok and latency_ms is not None:
                self._latencies_ms.append(latency_ms)
            else:
                self._errors += 1

    def take_window(self) -> tuple[float, int, int, LatencyStats]:
        """(window seconds, requests, errors, latency stats) and start a new window."""
        with self._lock:
            samples, errors = self._latencies_ms, self._errors
            self._latencies_ms, self._errors = [], 0
            now = time.monotonic()
            window_s, self._window_start = now - self._window_start, now
        return window_s, len(samples) + errors, errors, LatencyStats.from_samples(samples)


class TelemetryOutbox:
    """SQLite FIFO of encoded reports, bounded by bytes and age; safe across threads."""

    def __init__(self, path: Path, max_bytes: int = 8 << 20, max_age_s: float = 7 * 24 * 3600.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, body BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.dropped = 0
        self.incarnation = self._incarnation()

    def _identity(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM identity WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _incarnation(self) -> str:
        """This outbox's incarnation, made on first use. An outbox of an agent that predates
        incarnations gets one too; its buffered reports are renumbered from seq 0 and stamped with
        it, so every incarnation starts at 0 (what lets the host count leading gaps)."""
        with self._lock:
            existing = self._identity("incarnation")
            if existing is not None:
                return existing
            incarnation = uuid.uuid4().hex
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT seq, ts, body FROM outbox ORDER BY seq").fetchall()
                self._db.execute("DELETE FROM outbox")
                seq = -1
                for _, ts, body in rows:
                    try:
                        data = json.loads(bytes(body))
                    except ValueError:
                        continue
                    seq += 1
                    data.update(seq=seq, incarnation=incarnation)
                    self._db.execute("INSERT INTO outbox(seq, ts, body) VALUES(?, ?, ?)",
                                     (seq, ts, json.dumps(data, separators=(",", ":")).encode("utf-8")))
                self._db.execute("DELETE FROM meta WHERE key = 'seq'")
                if seq >= 0:
                    self._db.execute("INSERT INTO meta(key, value) VALUES('seq', ?)", (seq,))
                self._db.execute("INSERT INTO identity(key, value) VALUES('incarnation', ?)", (incarnation,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return incarnation

    @property
    def host_acks(self) -> bool:
        """Whether a host has ever acknowledged this outbox's reports (then only acks delete them)."""
        with self._lock:
            return self._identity("host_acks") == "1"

    def set_host_acks(self) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO identity(key, value) VALUES('host_acks', '1')")

    def next_seq(self) -> int:
        """Allocate the next sequence number (persisted, so it keeps increasing across restarts)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()
            seq = (row[0] + 1) if row else 0
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('seq', ?)", (seq,))
            return seq

    def put(self, report: TelemetryReport) -> None:
        body = report.to_json()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO outbox(seq, ts, body) VALUES(?, ?, ?)", (report.seq, report.ts, body))
            self._enforce_bounds()

    def _enforce_bounds(self) -> None:
        cutoff = time.time() - self.max_age_s
        cur = self._db.execute("DELETE FROM outbox WHERE ts < ?", (cutoff,))
        self.dropped += cur.rowcount if cur.rowcount > 0 else 0
        total = self._db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()[0]
        while total > self.max_bytes:
            row = self._db.execute("SELECT seq, LENGTH(body) FROM outbox ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self.dropped += 1
            total -= row[1]

    def peek(self, limit: int = 50) -> list[tuple[int, bytes]]:
        with self._lock:
            return [(int(s), bytes(b)) for s, b in self._db.execute("SELECT seq, body FROM outbox ORDER BY seq LIMIT ?", (limit,))]

    def remove(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def remove_ranges(self, ranges: tuple[tuple[int, int], ...]) -> int:
        """Delete the acknowledged ``[first, last]`` ranges; returns how many reports went."""
        if not ranges:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", list(ranges))
            return self._db.total_changes - before

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def drain_outbox(outbox: TelemetryOutbox, publish: Callable[[bytes], Delivery], is_connected: Callable[[], bool],
                 batch: int = 50, ack_timeout_s: float = 10.0) -> int:
    """Send buffered reports in seq order; each batch is removed only after all its PUBACKs.

    ``publish`` returns the client's ``Delivery``. Returns how many were delivered. A broker lost
    mid-batch leaves the batch in the outbox (it is re-sent: the host dedupes by ``seq``).
    """
    delivered = 0
    while is_connected():
        rows = outbox.peek(batch)
        if not rows:
            break
        infos = [(seq, publish(body)) for seq, body in rows]
        deadline = time.monotonic() + ack_timeout_s
        acked: list[int] = []
        for seq, info in infos:
            remaining = deadline - time.monotonic()
            try:
                if not info.wait(max(remaining, 0.01)):
                    break
            except MqttError:
                break
            acked.append(seq)
        outbox.remove(acked)
        delivered += len(acked)
        if len(acked) < len(infos):
            break
    return delivered


class TelemetrySender:
    """Outbox -> broker with application acks: the thread-safe shell around ``AckWindow``.

    ``pump()`` (the telemetry thread) publishes what the window allows; ``on_ack(payload)`` (the
    MQTT thread) deletes what the host stored; ``on_connect()`` makes every unacked report due
    again. ``publish`` returns the client's ``Delivery``; with acks the PUBACK is not waited for.
    Until the outbox has ever seen an ack (``host_acks``), ``pump`` falls back to the PUBACK rule
    of older agents once connected for ``legacy_grace_s`` (an acking host answers the hello well
    within it), so a host that predates acks still gets every report.
    """

    def __init__(self, outbox: TelemetryOutbox, publish: Callable[[bytes], Delivery], is_connected: Callable[[], bool],
                 *, window: int = DEFAULT_WINDOW, resend_after_s: float = DEFAULT_RESEND_AFTER_S,
                 legacy_grace_s: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.publish = publish
        self.is_connected = is_connected
        self.legacy_grace_s = legacy_grace_s
        self.clock = clock
        self.window = AckWindow(outbox.incarnation, window=window,
                                resend_after_s=resend_after_s,
                                max_resend_after_s=max(resend_after_s, DEFAULT_MAX_RESEND_AFTER_S))
        self._lock = threading.Lock()
        self._connected_at = clock()
        self._host_acks = outbox.host_acks
        self.acks_received = 0

    @property
    def incarnation(self) -> str:
        return self.outbox.incarnation

    @property
    def host_acks(self) -> bool:
        return self._host_acks

    def stats(self) -> WindowStats:
        with self._lock:
            return self.window.stats()

    def on_connect(self) -> None:
        with self._lock:
            self._connected_at = self.clock()
            self.window.on_reconnect()

    def on_ack(self, payload: bytes) -> int:
        """Handle a ``down/ack`` payload; returns how many reports left the outbox. ProtocolError
        for a malformed one."""
        ack = TelemetryAck.from_json(payload)
        with self._lock:
            ranges = self.window.on_ack(ack)
            if ack.incarnation != self.outbox.incarnation:
                return 0
            self.acks_received += 1
            if not self._host_acks:
                self._host_acks = True
                self.outbox.set_host_acks()
        return self.outbox.remove_ranges(ranges)

    def next_due_in_s(self) -> float | None:
        with self._lock:
            return self.window.next_due_in_s(self.clock())

    def pump(self) -> int:
        """Publish what may go now; returns how many reports were published (or, in the legacy
        PUBACK mode, delivered)."""
        if not self.is_connected():
            return 0
        if not self._host_acks:
            if self.clock() - self._connected_at < self.legacy_grace_s:
                return 0
            return drain_outbox(self.outbox, self.publish, self.is_connected)
        rows = self.outbox.peek(self.window.window)
        with self._lock:
            due = set(self.window.to_send([seq for seq, _ in rows], self.clock()))
        sent: list[int] = []
        for seq, body in rows:
            if seq not in due:
                continue
            if not self.is_connected():
                break
            try:
                self.publish(body)
            except MqttError as exc:
                log.info("telemetry %d not sent: %s", seq, exc)
                break
            sent.append(seq)
        with self._lock:
            self.window.mark_sent(sent, self.clock())
        return len(sent)
