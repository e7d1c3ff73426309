"""Bounded decoding and the device side of telemetry acks, as pure logic (no broker)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent import protocol as proto
from agent.errors import ProtocolError
from agent.outbox import AckWindow
from agent.telemetry import TelemetryOutbox


@pytest.mark.parametrize("payload", [
    b"", b"[" * 100_000 + b"]" * 100_000, b'{"schema": 1, "x": NaN}', b'{"schema": 1, "x": 1e999}',
    b'{"schema": 1, "device_id": "d", "seq": 1, "ts": 1, "event": "periodic", "latency_ms": [1]}',
    b'{"schema": 1, "device_id": ["d"], "seq": 1, "ts": 1, "event": "periodic"}',
    b'{"schema": 1, "device_id": "d", "seq": true, "ts": 1, "event": "periodic"}',
    b'{"schema": 1, "device_id": "d", "seq": 1, "ts": 1, "event": "periodic", "incarnation": "a/b"}',
    b'{"schema": 1, "pad": "' + b"x" * 300_000 + b'"}', b"\xff\xfe", b"[]",
])
def test_a_bad_report_raises_protocol_error_and_nothing_else(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        proto.TelemetryReport.from_json(payload)


def test_depth_is_measured_without_parsing_and_ignores_brackets_in_strings() -> None:
    assert proto.json_depth(b'{"a": [1, {"b": "[[[[[["}]}') == 3
    assert proto.json_depth(b'"\\"[[["') == 0
    with pytest.raises(ProtocolError, match="nests"):
        proto.ChunkRequest.from_json(b'{"schema": 1, "x": ' + b"[" * 40 + b"]" * 40 + b"}")
    with pytest.raises(ProtocolError, match="exceeds its limit"):
        proto.ChunkRequest.from_json(b'{"schema": 1, "pad": "' + b"x" * 5000 + b'"}')
    assert proto.request_id_of(b"[" * 100_000) is None
    assert proto.request_id_of(b'{"request_id": "r1", "command": 5}') == "r1"


def test_ack_ranges_round_trip_and_are_validated() -> None:
    assert proto.seq_ranges([5, 0, 1, 2, 2, 7, 6]) == ((0, 2), (5, 7))
    ack = proto.TelemetryAck.from_json(proto.TelemetryAck(incarnation="inc1", ranges=((0, 2), (5, 7))).to_json())
    assert ack.covers(6) and not ack.covers(3) and ack.count() == 6
    for ranges in ([[3, 1]], [[1]], [["a", "b"]], [[-1, 2]]):
        with pytest.raises(ProtocolError):
            proto.TelemetryAck.from_json(json.dumps({"schema": 1, "incarnation": "inc1", "ranges": ranges}))


def _ack(incarnation: str, *seqs: int) -> proto.TelemetryAck:
    return proto.TelemetryAck(incarnation=incarnation, ranges=proto.seq_ranges(seqs))


def test_the_window_bounds_what_is_in_flight_and_resends_what_is_not_acked() -> None:
    window = AckWindow("inc", window=3, resend_after_s=10.0, max_resend_after_s=40.0)
    pending = [0, 1, 2, 3, 4]
    first = window.to_send(pending, now=0.0)
    assert first == [0, 1, 2]
    window.mark_sent(first, 0.0)
    assert window.to_send(pending, now=1.0) == []  # the window is full
    assert window.on_ack(_ack("other", 0, 1)) == ()  # another incarnation's ack changes nothing
    assert window.on_ack(_ack("inc", 0, 2)) == ((0, 0), (2, 2))
    pending = [1, 3, 4]
    assert window.to_send(pending, now=2.0) == [3, 4]  # 1 is still in flight
    window.mark_sent([3, 4], 2.0)
    # 1 timed out at 10 s, but the window halved (AIMD) below what is still in flight: nothing goes
    assert window.to_send(pending, now=10.0) == [] and window.stats().window == 1
    assert window.to_send(pending, now=12.0) == [1]  # 3 and 4 timed out too: one at a time now
    window.mark_sent([1], 12.0)
    assert window.next_due_in_s(12.0) == 0.0  # 3 and 4 are overdue
    window.on_reconnect()  # acks may have been lost with the connection: everything is due now
    assert window.to_send(pending, now=13.0) == [1]
    window.on_ack(_ack("inc", 1))
    assert window.stats().window == 2 and window.to_send([3, 4], now=13.0) == [3, 4]
    assert window.stats().resent == 1


def test_an_outbox_has_a_persistent_incarnation_and_acked_ranges_leave_it(tmp_path: Path) -> None:
    outbox = TelemetryOutbox(tmp_path / "t.db")
    incarnation = outbox.incarnation
    for _ in range(5):
        seq = outbox.next_seq()
        outbox.put(proto.TelemetryReport(device_id="d", seq=seq, ts=proto.now_s(), event="periodic",
                                         incarnation=incarnation))
    assert outbox.remove_ranges(((0, 1), (3, 3))) == 3
    assert [seq for seq, _ in outbox.peek()] == [2, 4]
    assert not outbox.host_acks
    outbox.set_host_acks()
    outbox.close()
    again = TelemetryOutbox(tmp_path / "t.db")
    assert again.incarnation == incarnation and again.host_acks and again.next_seq() == 5
    assert TelemetryOutbox(tmp_path / "wiped.db").incarnation != incarnation


def test_an_outbox_of_an_older_agent_gets_an_incarnation_and_its_reports_are_renumbered_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, body BLOB NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    for seq in (40, 41, 42):
        body = proto.TelemetryReport(device_id="d", seq=seq, ts=float(seq), event="periodic").to_json()
        db.execute("INSERT INTO outbox VALUES (?, ?, ?)", (seq, float(seq), body))
    db.execute("INSERT INTO meta VALUES ('seq', 42)")
    db.commit()
    db.close()
    outbox = TelemetryOutbox(path)
    reports = [proto.TelemetryReport.from_json(body) for _, body in outbox.peek()]
    assert [(r.seq, r.ts, r.incarnation) for r in reports] == [(0, 40.0, outbox.incarnation), (1, 41.0, outbox.incarnation),
                                                                (2, 42.0, outbox.incarnation)]
    assert outbox.next_seq() == 3
