"""Telemetry ingest off the network thread, in batches: `builder serve`'s MQTT callback only decodes
a report and queues it; one worker thread stores whatever has queued up in ONE transaction, then
acknowledges the stored seqs to each device (``down/ack``) and runs the telemetry hooks.

Why: a fleet-wide outbox flush is thousands of reports within a second. Stored one transaction
each inside paho's callback, the host's client fell behind, Mosquitto dropped what exceeded its
queue for that client (while every device had its PUBACK), and nothing noticed. Now the callback
costs a decode, a batch costs one commit, and a report the host never stored is never acked, so
the device sends it again.

The pure parts (``acks_for``: which ack messages a stored batch yields) are tested without a
broker; ``IngestQueue`` and ``IngestWorker`` are the thin threaded shell.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from agent import protocol as proto

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 500  # reports per transaction
DEFAULT_MAX_QUEUED = 100_000  # beyond it a report is dropped unacked (the device resends it)


@dataclass(frozen=True)
class IncomingReport:
    """A decoded report as it came off the wire, waiting to be stored."""

    device_id: str
    report: proto.TelemetryReport
    received_at: float


@dataclass(frozen=True)
class DeviceAck:
    """One ``down/ack`` message to publish to one device."""

    device_id: str
    ack: proto.TelemetryAck

    @property
    def topic(self) -> str:
        return proto.device_topic(self.device_id, proto.Down.ACK)


def acks_for(stored: Sequence[IncomingReport], ts: float) -> list[DeviceAck]:
    """The acks a stored batch yields: per (device, incarnation) the merged seq ranges, new and
    re-sent reports alike (a re-sent report's first ack was lost: ack it again), at most
    ``MAX_ACK_RANGES`` ranges per message. Reports without an incarnation come from agents that
    predate acks: nobody listens for theirs."""
    seqs: dict[tuple[str, str], set[int]] = {}
    for item in stored:
        incarnation = item.report.incarnation
        if incarnation:
            seqs.setdefault((item.device_id, incarnation), set()).add(item.report.seq)
    out: list[DeviceAck] = []
    for (device_id, incarnation), values in seqs.items():
        ranges = proto.seq_ranges(values)
        for start in range(0, len(ranges), proto.MAX_ACK_RANGES):
            part = ranges[start:start + proto.MAX_ACK_RANGES]
            out.append(DeviceAck(device_id, proto.TelemetryAck(incarnation=incarnation, ranges=part, ts=ts)))
    return out


class IngestQueue:
    """A bounded FIFO of reports; ``put`` never blocks (the network thread calls it), ``take``
    returns everything queued up to ``max_items``, waiting up to ``timeout_s`` for the first."""

    def __init__(self, max_items: int = DEFAULT_MAX_QUEUED) -> None:
        self.max_items = max_items
        self._items: deque[IncomingReport] = deque()
        self._ready = threading.Condition()
        self.dropped = 0

    def put(self, item: IncomingReport) -> bool:
        """False (and counted) when full: the report is not acked, so the device sends it again."""
        with self._ready:
            if len(self._items) >= self.max_items:
                self.dropped += 1
                return False
            self._items.append(item)
            self._ready.notify()
            return True

    def take(self, max_items: int, timeout_s: float) -> list[IncomingReport]:
        with self._ready:
            if not self._items:
                self._ready.wait(timeout_s)
            n = min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)


class IngestWorker:
    """The one thread that calls ``process(batch)`` for each batch taken from the queue. A batch
    that fails (a store locked past its busy timeout) is logged and dropped: none of it was acked,
    so the devices send it again."""

    def __init__(self, queue: IngestQueue, process: Callable[[list[IncomingReport]], None],
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.queue = queue
        self.process = process
        self.max_batch = max_batch
        self.batches = 0
        self.failed_batches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "IngestWorker":
        self._thread = threading.Thread(target=self._run, name="telemetry-ingest", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            batch = self.queue.take(self.max_batch, timeout_s=0.2)
            if not batch:
                if self._stop.is_set():
                    return
                continue
            try:
                self.process(batch)
                self.batches += 1
            except Exception:  # noqa: BLE001 - ingest must go on; the devices resend what was not acked
                self.failed_batches += 1
                log.exception("storing a batch of %d telemetry reports failed", len(batch))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, then end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
