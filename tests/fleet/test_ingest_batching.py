"""Host side of telemetry delivery as pure logic and store calls (no broker): the acks a stored
batch yields, gap and reset detection, the v2 -> v3 store migration, policies from memory."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from agent import protocol as proto
from builder.fleet.loop.policy import Policy, PolicyStore
from builder.fleet.transport import store as store_module
from builder.fleet.transport.ingest import IncomingReport, IngestQueue, acks_for
from builder.fleet.transport.store import TELEMETRY_GAP, TELEMETRY_RESET, TelemetryRow, fleet_store_path, open_store


def _incoming(device: str, seq: int, incarnation: str | None) -> IncomingReport:
    return IncomingReport(device, proto.TelemetryReport(device_id=device, seq=seq, ts=1.0, event="periodic",
                                                        incarnation=incarnation), 1.0)


def test_a_stored_batch_yields_one_ack_per_device_and_incarnation_and_none_for_old_agents() -> None:
    batch = [_incoming("a", s, "i1") for s in (0, 1, 2, 5)] + [_incoming("a", 0, "i2"), _incoming("old", 3, None)]
    acks = {(a.device_id, a.ack.incarnation): a.ack.ranges for a in acks_for(batch, ts=1.0)}
    assert acks == {("a", "i1"): ((0, 2), (5, 5)), ("a", "i2"): ((0, 0),)}
    many = acks_for([_incoming("a", s, "i1") for s in range(0, 2 * 300, 2)], ts=1.0)  # 300 ranges: two messages
    assert [len(a.ack.ranges) for a in many] == [proto.MAX_ACK_RANGES, 300 - proto.MAX_ACK_RANGES]


def test_the_ingest_queue_is_bounded_and_hands_out_batches() -> None:
    queue = IngestQueue(max_items=3)
    assert all(queue.put(_incoming("a", s, "i")) for s in range(3))
    assert not queue.put(_incoming("a", 3, "i")) and queue.dropped == 1
    assert [i.report.seq for i in queue.take(2, 0.0)] == [0, 1]
    assert [i.report.seq for i in queue.take(10, 0.0)] == [2] and queue.take(10, 0.0) == []


def _row(device: str, seq: int, incarnation: str) -> TelemetryRow:
    return TelemetryRow(device_id=device, seq=seq, ts=float(seq), event="periodic", incarnation=incarnation,
                        received_at=100.0 + seq)


def test_gaps_are_counted_and_filled_by_resends_and_a_new_incarnation_is_a_reset(tmp_path: Path,
                                                                                   store_url: str | None) -> None:
    with open_store(tmp_path, store_url) as store:  # on SQLite and on PostgreSQL
        result = store.add_telemetry_batch([_row("pi", s, "i1") for s in (0, 1, 4)])
        assert result.new == (True, True, True)
        assert [(e.kind, e.detail["first_missing"], e.detail["last_missing"]) for e in result.events] == [(TELEMETRY_GAP, 2, 3)]
        assert store.telemetry_missing() == {"pi": 2}
        again = store.add_telemetry_batch([_row("pi", 4, "i1"), _row("pi", 2, "i1"), _row("pi", 3, "i1")])
        assert again.new == (False, True, True) and again.events == ()
        assert store.telemetry_missing("pi") == {"pi": 0}
        reset = store.add_telemetry_batch([_row("pi", 0, "i2"), _row("pi", 2, "i2")])  # a wiped data dir
        assert reset.new == (True, True)
        assert [e.kind for e in reset.events] == [TELEMETRY_RESET, TELEMETRY_GAP]
        assert reset.events[0].detail == {"incarnation": "i2", "previous_incarnation": "i1", "previous_max_seq": 4,
                                          "first_seq": 0}
        assert store.telemetry_missing() == {"pi": 1}
        assert sorted(e.kind for e in store.events("pi")) == [TELEMETRY_GAP, TELEMETRY_GAP, TELEMETRY_RESET]
        assert len(store.telemetry("pi")) == 7


def test_a_version_2_file_migrates_to_incarnation_keys_and_keeps_every_report(tmp_path: Path) -> None:
    path = fleet_store_path(tmp_path)
    db = sqlite3.connect(path)
    db.execute(store_module._META)
    for script in store_module._MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    for seq in (0, 1, 3):
        db.execute("INSERT INTO telemetry (device_id, seq, ts, received_at, event, requests) VALUES ('pi', ?, ?, ?, 'periodic', 4)",
                   (seq, float(seq), float(seq)))
    db.commit()
    db.close()
    with open_store(tmp_path) as store:
        assert [(r.seq, r.incarnation, r.requests) for r in store.telemetry("pi")] == [(0, "", 4), (1, "", 4), (3, "", 4)]
        assert store.telemetry_missing() == {"pi": 1}
        assert not store.add_telemetry(_row("pi", 1, ""))  # an old agent's re-send: still deduplicated
        assert store.add_telemetry(_row("pi", 1, "new"))  # the same seq of a new incarnation is a new report
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"


def test_policies_are_resolved_from_memory_and_reread_when_changed(tmp_path: Path, store_url: str | None) -> None:
    clock = [0.0]
    with open_store(tmp_path, store_url) as store, open_store(tmp_path, store_url) as other_process:
        policies = PolicyStore(store, refresh_s=1.0, clock=lambda: clock[0])
        assert policies.resolve("pi") == (None, None)
        for _ in range(100):
            policies.resolve("pi")
        assert policies.reloads == 1
        PolicyStore(other_process).set("*", Policy(latency_p95_ms=20), now=1.0)  # e.g. `builder fleet policy set`
        assert policies.resolve("pi") == (None, None)  # within refresh_s: the cached answer
        clock[0] = 1.5
        assert policies.resolve("pi") == ("*", Policy(latency_p95_ms=20))
        policies.set("device:pi", Policy(latency_p95_ms=5), now=2.0)  # through this object: at once
        assert policies.resolve("pi") == ("device:pi", Policy(latency_p95_ms=5))
        assert policies.reloads == 3
