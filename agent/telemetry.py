"""Telemetry: field latency windows, a system snapshot, and an on-disk outbox.

Every report goes into the SQLite outbox first and leaves it only once the broker acknowledged it
(QoS 1 PUBACK), so reports produced while the broker is unreachable arrive afterwards, complete
and in order (``seq`` increases by one per report and survives restarts). The outbox is bounded
by total bytes and by age: the oldest reports go first, and how many were dropped is reported.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from agent.bench import LatencyStats
from agent.errors import MqttError
from agent.mqtt import Delivery
from agent.protocol import TelemetryReport


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
        self.dropped = 0

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
