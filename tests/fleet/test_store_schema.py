"""The fleet store owns every table of its file under one schema version, and upgrades older files in place."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from builder.errors import FleetError
from builder.fleet.loop.policy import Policy, PolicyStore
from builder.fleet.loop.service import LoopRecord, LoopStateStore
from builder.fleet.transport import store as store_module
from builder.fleet.transport.store import SCHEMA_VERSION, DeploymentEvent, TelemetryRow, fleet_store_path, open_store

REPO = Path(__file__).resolve().parents[2]
TABLES = {"meta", "devices", "telemetry", "benchmarks", "events", "pushes", "loop_policies", "loop_state",
          "telemetry_streams"}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return names - {"sqlite_sequence"}


def _version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


def _version_1_file(path: Path, with_loop_tables: bool) -> None:
    """A fleet.sqlite as the previous builder left it: schema 1, and (when the loop had run) the
    loop's two tables, which it created on its own connections outside that version."""
    db = sqlite3.connect(path)
    db.executescript(store_module._MIGRATIONS[0])
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO devices (device_id, profile, group_name, registered_at) VALUES ('pi', 'raspberry-pi-4', 'kitchen', 1.0)")
    db.execute("INSERT INTO telemetry (device_id, seq, ts, received_at, event, requests, p95_ms) "
               "VALUES ('pi', 1, 10.0, 10.0, 'periodic', 40, 9.5)")
    db.execute("INSERT INTO events (device_id, ts, kind, artifact_id) VALUES ('pi', 11.0, 'loop.step_down', 'int8')")
    if with_loop_tables:
        db.execute("CREATE TABLE loop_policies (scope TEXT PRIMARY KEY, policy_json TEXT NOT NULL, updated_at REAL NOT NULL)")
        db.execute("CREATE TABLE loop_state (device_id TEXT PRIMARY KEY, state_json TEXT NOT NULL, updated_at REAL NOT NULL)")
        db.execute("INSERT INTO loop_policies VALUES ('group:kitchen', ?, 2.0)",
                   (json.dumps(Policy(latency_p95_ms=20).to_dict(), sort_keys=True),))
        db.execute("INSERT INTO loop_state VALUES ('pi', ?, 3.0)", (LoopRecord(changes=4).to_json(),))
    db.commit()
    db.close()


def test_a_new_store_has_every_table_under_the_current_version(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert store.path == fleet_store_path(tmp_path)
        PolicyStore(store).set("*", Policy(latency_p95_ms=30), now=1.0)
        LoopStateStore(store).save("pi", LoopRecord(changes=1), now=1.0)
        assert set(store.loop_policies()) == {"*"} and set(store.loop_states()) == {"pi"}
    assert _tables(store.path) == TABLES
    assert _version(store.path) == SCHEMA_VERSION == len(store_module._MIGRATIONS)


def test_a_version_1_file_with_the_loop_tables_migrates_and_keeps_every_row(tmp_path: Path) -> None:
    path = fleet_store_path(tmp_path)
    _version_1_file(path, with_loop_tables=True)
    with open_store(tmp_path) as store:
        assert store.device("pi").group == "kitchen"
        assert [(r.seq, r.p95_ms) for r in store.telemetry("pi")] == [(1, 9.5)]
        assert [e.kind for e in store.events("pi")] == ["loop.step_down"]
        assert PolicyStore(store).resolve("pi", ("kitchen",)) == ("group:kitchen", Policy(latency_p95_ms=20))
        assert LoopStateStore(store).load("pi").changes == 4
        store.add_telemetry(TelemetryRow(device_id="pi", seq=2, ts=20.0, event="periodic", requests=40))
        store.add_event(DeploymentEvent("pi", 21.0, "desired"))
    assert _version(path) == SCHEMA_VERSION and _tables(path) == TABLES
    with open_store(tmp_path) as again:  # opening an up-to-date file changes nothing
        assert len(again.telemetry("pi")) == 2 and LoopStateStore(again).load("pi").changes == 4


def test_a_version_1_file_without_the_loop_tables_gets_them(tmp_path: Path) -> None:
    path = fleet_store_path(tmp_path)
    _version_1_file(path, with_loop_tables=False)
    with open_store(tmp_path) as store:
        assert store.loop_policies() == {} and LoopStateStore(store).load("pi") == LoopRecord()
        assert store.device("pi").profile == "raspberry-pi-4"
    assert _tables(path) == TABLES and _version(path) == SCHEMA_VERSION


def test_a_file_from_a_newer_builder_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with sqlite3.connect(fleet_store_path(tmp_path)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(FleetError, match=f"has schema {SCHEMA_VERSION + 1}, this builder reads {SCHEMA_VERSION}"):
        open_store(tmp_path)


def test_only_the_store_names_the_file_or_opens_sqlite_in_the_fleet_code() -> None:
    store_py = REPO / "builder" / "fleet" / "transport" / "store.py"
    named = [p for p in (REPO / "builder").rglob("*.py") if p != store_py and "fleet.sqlite" in p.read_text(encoding="utf-8")]
    opened = [p for p in (REPO / "builder" / "fleet").rglob("*.py")
              if p != store_py and "import sqlite3" in p.read_text(encoding="utf-8")]
    assert named == [] and opened == [], (named, opened)
