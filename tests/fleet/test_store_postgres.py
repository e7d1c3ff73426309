"""The fleet store on a real PostgreSQL server: same schema and migrations as SQLite, concurrent
upgraders, full-precision timestamps, a server restart, and the URL checks of `open_store`.
(The behaviour tests of the store run on both engines: tests/fleet/test_fleet_logic.py.)"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from builder.errors import FleetError, UsageError
from builder.fleet.transport import store as store_module
from builder.fleet.transport.store import (
    SCHEMA_VERSION, DeploymentEvent, FleetStore, TelemetryRow, open_store, redact_url,
)
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres
TABLES = {"meta", "devices", "telemetry", "benchmarks", "events", "pushes", "loop_policies", "loop_state", "telemetry_streams"}


def _tables(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_new_postgres_store_has_every_table_under_the_current_version(postgres_server: PostgresServer,
                                                                        tmp_path: Path) -> None:
    url = postgres_server.new_database()
    with open_store(tmp_path, url) as store:
        assert store.engine == "postgresql" and store.path is None
        store.add_event(DeploymentEvent("pi", 1.0, "desired", "dep", "art"))
        assert store.events("pi")[0].kind == "desired"
    assert _tables(url) == TABLES
    assert not (tmp_path / store_module.FLEET_STORE_FILE).exists()  # nothing written into the data dir
    with open_store(tmp_path, url) as again:  # opening an up-to-date store changes nothing
        assert again._schema_version() == SCHEMA_VERSION and len(again.events("pi")) == 1


def test_processes_upgrading_one_database_at_once_all_succeed(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    opened: list[FleetStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(FleetStore(url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    for store in opened:
        store.close()
    assert _tables(url) == TABLES


def test_timestamps_and_byte_counts_keep_full_precision(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """REAL is float4 in PostgreSQL (a 2026 timestamp would be off by minutes): the dialect makes it
    DOUBLE PRECISION, and INTEGER BIGINT (an RSS of 5 GB passes 2**31)."""
    with open_store(tmp_path, postgres_server.new_database()) as store:
        ts = 1_796_000_000.123456
        store.register_device("pi", "raspberry-pi-4")
        assert store.add_telemetry(TelemetryRow(device_id="pi", seq=1, ts=ts, event="periodic",
                                                memory_rss_bytes=5 << 30, received_at=ts))
        row = store.telemetry("pi")[0]
        assert row.ts == ts and row.memory_rss_bytes == 5 << 30
        assert store.device("pi").last_seen == ts


def test_a_store_from_a_newer_builder_is_refused(postgres_server: PostgresServer, tmp_path: Path) -> None:
    import psycopg

    url = postgres_server.new_database()
    open_store(tmp_path, url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(FleetError, match=f"has schema {SCHEMA_VERSION + 1}, this builder reads {SCHEMA_VERSION}"):
        open_store(tmp_path, url)


def test_the_store_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    with PostgresServer() as server:
        url = server.url()
        store = open_store(tmp_path, url)
        store.register_device("pi", "raspberry-pi-4")
        server.stop()
        server.start()
        with pytest.raises(Exception):  # noqa: B017, PT011 - the statement on the dead connection fails
            store.device("pi")
        assert store.device("pi").profile == "raspberry-pi-4"  # the next one reconnects
        store.close()


def test_open_store_refuses_other_urls_and_never_prints_a_password(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="postgresql://"):
        open_store(tmp_path, "mysql://u@h/db")
    assert redact_url("postgresql://fleet:s3cret@db:5432/fleet") == "postgresql://fleet:***@db:5432/fleet"
    with pytest.raises(FleetError) as info:
        open_store(tmp_path, "postgresql://fleet:s3cret@127.0.0.1:1/fleet?connect_timeout=1")
    assert "s3cret" not in str(info.value) and "cannot open the fleet store" in str(info.value)


def test_the_dialect_translates_sqlite_flavoured_sql() -> None:
    pg = store_module._PostgresDialect()
    assert pg.statement("INSERT OR IGNORE INTO t (a, b) VALUES (?, ?)") == \
        "INSERT INTO t (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    assert pg.statement("SELECT * FROM t WHERE m IS ? AND n = ?") == \
        "SELECT * FROM t WHERE m IS NOT DISTINCT FROM %s AND n = %s"
    assert pg.ddl("id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, n INTEGER, b BLOB") == \
        "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION, n BIGINT, b BYTEA"
    sqlite = store_module._Dialect()
    assert sqlite.statement("SELECT ? IS ?") == "SELECT ? IS ?"


def test_the_cli_reads_the_store_from_the_option_or_the_environment(postgres_server: PostgresServer,
                                                                     tmp_path: Path) -> None:
    """`builder fleet add-device --store URL` registers into PostgreSQL; `fleet status --json` with
    $EDGEFLEET_STORE reads it back; the data dir gets no fleet.sqlite. A bad URL or a worker group
    without a broker is one line on stderr."""
    import json
    import os
    import subprocess
    import sys

    from builder.artifacts.signing import init_keys

    init_keys(tmp_path / "keys")
    url = postgres_server.new_database()
    cli = [sys.executable, "-m", "builder.cli.main"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_STORE"}
    added = subprocess.run([*cli, "fleet", "add-device", "pi-9", "--profile", "raspberry-pi-4", "--data-dir", str(tmp_path),
                            "--broker-url", "mqtt://127.0.0.1:1883", "--store", url], capture_output=True, text=True, env=env, timeout=120)
    assert added.returncode == 0, added.stderr
    status = subprocess.run([*cli, "fleet", "status", "--json", "--data-dir", str(tmp_path)], capture_output=True,
                            text=True, env={**env, "EDGEFLEET_STORE": url}, timeout=120)
    assert status.returncode == 0, status.stderr
    assert [d["device_id"] for d in json.loads(status.stdout)] == ["pi-9"]
    assert not (tmp_path / store_module.FLEET_STORE_FILE).exists()
    bad = subprocess.run([*cli, "fleet", "status", "--data-dir", str(tmp_path), "--store", "mysql://u:pw@h/db"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "postgresql://" in bad.stderr and "Traceback" not in bad.stderr
    assert "pw@" not in bad.stderr
    lone = subprocess.run([*cli, "serve", "--worker-group", "g", "--data-dir", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert lone.returncode != 0 and "--broker" in lone.stderr and "Traceback" not in lone.stderr
