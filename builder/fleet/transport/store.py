"""The fleet store: device registry, telemetry, benchmarks, deployment events, push history, and
the re-compression loop's policies and per-device state.

Two engines behind one class. SQLite (the default: ``fleet.sqlite`` in the data directory) in WAL
mode with a busy timeout, so `builder serve` (writing from its MQTT thread) and `builder push` /
`builder fleet status` (other processes) share one file safely. PostgreSQL (``--store
postgresql://…`` or ``$EDGEFLEET_STORE``) when several `builder serve` workers on several hosts
share one fleet (docs/scale.md). The SQL is written once, SQLite-flavoured, and ``_Dialect``
translates what differs (placeholders, ``INSERT OR IGNORE``, ``IS ?``, column types, identity
keys), so both engines run the same statements and the same migrations.

This module owns every table under one schema version (``SCHEMA_VERSION``, upgraded in place by
``_MIGRATIONS``) and the file's name (:func:`fleet_store_path`). Every row that crosses the module
boundary is a frozen dataclass or, for the loop's rows, the JSON text its typed views
(``builder.fleet.loop``) read and write; SQL stays in this file.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from builder.errors import FleetError, UsageError

FLEET_STORE_FILE = "fleet.sqlite"
STORE_ENV = "EDGEFLEET_STORE"  # read by the CLI only (its --store option), never here
POSTGRES_SCHEMES = ("postgresql", "postgres")

SCHEMA_VERSION = 3

_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"

# Version 1: devices, telemetry, benchmarks, deployment events, push history.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    profile TEXT,
    group_name TEXT,
    machine TEXT NOT NULL DEFAULT '',
    runtimes TEXT NOT NULL DEFAULT '[]',
    execution_providers TEXT NOT NULL DEFAULT '[]',
    agent_version TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    active_artifact_id TEXT,
    active_model TEXT,
    previous_artifact_id TEXT,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    event TEXT NOT NULL,
    model_id TEXT,
    window_s REAL NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    p50_ms REAL,
    p95_ms REAL,
    latency_json TEXT NOT NULL DEFAULT '{}',
    cpu_percent REAL,
    memory_rss_bytes INTEGER,
    temperature_c REAL,
    power_w REAL,
    power_source TEXT NOT NULL DEFAULT 'not measured',
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_by_time ON telemetry (device_id, ts);
CREATE TABLE IF NOT EXISTS benchmarks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    artifact_id TEXT,
    p50_ms REAL,
    p95_ms REAL,
    mean_ms REAL,
    power_w REAL,
    power_source TEXT NOT NULL DEFAULT 'not measured',
    energy_mj REAL,
    result_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS benchmarks_by_artifact ON benchmarks (device_id, artifact_id, ts);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    deployment_id TEXT,
    artifact_id TEXT,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (device_id, ts);
CREATE TABLE IF NOT EXISTS pushes (
    push_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    target TEXT NOT NULL,
    plan_json TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    reason TEXT,
    finished_at REAL
);
"""

# Version 2: the re-compression loop's tables, which the loop and policy code used to create on
# their own connections outside the schema version (an older file may have them: rows are kept).
_SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS loop_policies (
    scope TEXT PRIMARY KEY,
    policy_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loop_state (
    device_id TEXT PRIMARY KEY,
    state_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Version 3: telemetry is keyed by (device, incarnation, seq): a device whose data dir was wiped
# starts a new incarnation at seq 0 instead of being deduplicated away ('' = an agent that predates
# incarnations, and every row of an older file). ``telemetry_streams`` keeps, per (device,
# incarnation), the highest seq and how many distinct reports were stored, so missing reports
# (gaps) are counted without scanning the telemetry table.
_SCHEMA_3 = """
DROP TABLE IF EXISTS telemetry_v3;
CREATE TABLE telemetry_v3 (
    device_id TEXT NOT NULL,
    incarnation TEXT NOT NULL DEFAULT '',
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    event TEXT NOT NULL,
    model_id TEXT,
    window_s REAL NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    p50_ms REAL,
    p95_ms REAL,
    latency_json TEXT NOT NULL DEFAULT '{}',
    cpu_percent REAL,
    memory_rss_bytes INTEGER,
    temperature_c REAL,
    power_w REAL,
    power_source TEXT NOT NULL DEFAULT 'not measured',
    PRIMARY KEY (device_id, incarnation, seq)
);
INSERT INTO telemetry_v3 (device_id, incarnation, seq, ts, received_at, event, model_id, window_s, requests, errors,
    p50_ms, p95_ms, latency_json, cpu_percent, memory_rss_bytes, temperature_c, power_w, power_source)
    SELECT device_id, '', seq, ts, received_at, event, model_id, window_s, requests, errors, p50_ms, p95_ms,
    latency_json, cpu_percent, memory_rss_bytes, temperature_c, power_w, power_source FROM telemetry;
DROP TABLE telemetry;
ALTER TABLE telemetry_v3 RENAME TO telemetry;
CREATE INDEX IF NOT EXISTS telemetry_by_time ON telemetry (device_id, ts);
CREATE TABLE IF NOT EXISTS telemetry_streams (
    device_id TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    max_seq INTEGER NOT NULL,
    received INTEGER NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    PRIMARY KEY (device_id, incarnation)
);
INSERT OR IGNORE INTO telemetry_streams (device_id, incarnation, max_seq, received, first_received_at, last_received_at)
    SELECT device_id, '', MAX(seq), COUNT(*), MIN(received_at), MAX(received_at) FROM telemetry GROUP BY device_id
"""

# _MIGRATIONS[n] takes a file from schema version n to n + 1 (0: a new, empty file). Append only:
# a released step is never edited. Every statement is idempotent (IF NOT EXISTS), so a step also
# adopts a table an older builder made outside the schema version.
_MIGRATIONS: tuple[str, ...] = (_SCHEMA_1, _SCHEMA_2, _SCHEMA_3)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def fleet_store_path(data_dir: Path) -> Path:
    """Where a data directory keeps its fleet store."""
    return Path(data_dir) / FLEET_STORE_FILE


def is_postgres_url(location: object) -> bool:
    """Whether a store location names a PostgreSQL database (``postgresql://user@host/db``)."""
    return isinstance(location, str) and urlsplit(location).scheme in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """A store URL without its password (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Dialect:
    """What differs between the engines, for SQL written in SQLite's flavour. The base class is
    SQLite (nothing to translate); statements and migration scripts both pass through it."""

    name = "sqlite"
    begin = "BEGIN IMMEDIATE"  # take the write lock up front: no deadlock between two upgraders
    table_exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"

    def statement(self, sql: str) -> str:
        return sql

    def ddl(self, sql: str) -> str:
        return sql

    def lock_schema(self, db: "_Connection") -> None:
        """Serialize schema upgrades between processes (SQLite: BEGIN IMMEDIATE already does)."""


class _PostgresDialect(_Dialect):
    """PostgreSQL 12+ through psycopg 3. ``?`` becomes ``%s`` (the store never writes a literal
    ``?`` or ``%``), ``INSERT OR IGNORE`` becomes ``ON CONFLICT DO NOTHING``, ``x IS ?`` becomes
    ``IS NOT DISTINCT FROM``; in DDL, REAL (float4 in PostgreSQL: seconds since 1970 would lose
    minutes) becomes DOUBLE PRECISION, INTEGER BIGINT (byte counts pass 2**31), BLOB BYTEA and an
    AUTOINCREMENT key an identity column."""

    name = "postgresql"
    begin = "BEGIN"
    table_exists = "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = ?"
    _SCHEMA_LOCK_KEY = 0x6564_6765_666C  # "edgefl": pg_advisory_xact_lock's key for schema upgrades

    _ignore = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
    _is_param = re.compile(r"\bIS\s+\?", re.IGNORECASE)
    _ddl_types = ((re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", re.IGNORECASE),
                   "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
                  (re.compile(r"\bREAL\b", re.IGNORECASE), "DOUBLE PRECISION"),
                  (re.compile(r"\bINTEGER\b", re.IGNORECASE), "BIGINT"),
                  (re.compile(r"\bBLOB\b", re.IGNORECASE), "BYTEA"))

    def statement(self, sql: str) -> str:
        if self._ignore.match(sql):
            sql = self._ignore.sub("INSERT INTO", sql, count=1).rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
        return self._is_param.sub("IS NOT DISTINCT FROM ?", sql).replace("?", "%s")

    def ddl(self, sql: str) -> str:
        for pattern, replacement in self._ddl_types:
            sql = pattern.sub(replacement, sql)
        return sql

    def lock_schema(self, db: "_Connection") -> None:
        db.execute(f"SELECT pg_advisory_xact_lock({self._SCHEMA_LOCK_KEY})")


class _Connection:
    """One DB-API connection that speaks the store's SQLite-flavoured SQL on either engine:
    ``execute`` translates through the dialect and returns the driver's cursor (``fetchall``,
    ``fetchone``, ``rowcount``; rows are read by column name on both). A PostgreSQL connection
    that broke (server restart) is opened again on the next statement outside a transaction."""

    def __init__(self, location: Path | str, busy_timeout_ms: int) -> None:
        self.location = location
        self.busy_timeout_ms = busy_timeout_ms
        self.dialect: _Dialect = _PostgresDialect() if is_postgres_url(location) else _Dialect()
        self.in_transaction = False
        self._raw: Any = self._open()

    def _open(self) -> Any:
        if isinstance(self.dialect, _PostgresDialect):
            try:
                import psycopg
                from psycopg.rows import dict_row
            except ImportError as exc:
                raise FleetError("a postgresql:// store needs psycopg: pip install 'edgefleet[postgres]'") from exc
            return psycopg.connect(str(self.location), autocommit=True, row_factory=dict_row,
                                   connect_timeout=max(1, self.busy_timeout_ms // 1000))
        raw = sqlite3.connect(str(self.location), timeout=self.busy_timeout_ms / 1000, check_same_thread=False,
                              isolation_level=None)
        raw.row_factory = sqlite3.Row
        raw.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("PRAGMA synchronous = NORMAL")
        return raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not self.in_transaction and getattr(self._raw, "closed", False):
            self._raw = self._open()
        return self._raw.execute(self.dialect.statement(sql), tuple(params))

    def execute_script(self, script: str) -> None:
        """A migration step, statement by statement (sqlite3's executescript would commit)."""
        for statement in script.split(";"):
            if statement.strip():
                self.execute(self.dialect.ddl(statement))

    def has_table(self, name: str) -> bool:
        return self.execute(self.dialect.table_exists, (name,)).fetchone() is not None

    def close(self) -> None:
        self._raw.close()


def _database_errors() -> tuple[type[BaseException], ...]:
    """The drivers' base exceptions, mapped to FleetError at this module's boundary."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg
    except ImportError:
        return tuple(errors)
    errors.append(psycopg.Error)
    return tuple(errors)


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the host knows it (registration plus what it last announced)."""

    device_id: str
    profile: str | None = None
    group: str | None = None
    machine: str = ""
    runtimes: tuple[str, ...] = ()
    execution_providers: tuple[str, ...] = ()
    agent_version: str | None = None
    online: bool = False
    last_seen: float | None = None
    active_artifact_id: str | None = None
    active_model: str | None = None
    previous_artifact_id: str | None = None
    registered_at: float = 0.0  # 0: never registered with `builder fleet add-device` (it only connected)

    @property
    def registered(self) -> bool:
        return self.registered_at > 0


@dataclass(frozen=True)
class TelemetryRow:
    """One telemetry report; latencies are the device's field (real request) percentiles."""

    device_id: str
    seq: int
    ts: float
    event: str
    model_id: str | None = None
    window_s: float = 0.0
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    cpu_percent: float | None = None
    memory_rss_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_source: str = "not measured"
    received_at: float = 0.0
    incarnation: str = ""  # the agent's outbox incarnation; "" for agents that predate it


@dataclass(frozen=True)
class BenchmarkRow:
    """An on-device benchmark of one artifact (warm-up, then N runs)."""

    device_id: str
    ts: float
    artifact_id: str | None
    p50_ms: float | None
    p95_ms: float | None
    mean_ms: float | None = None
    power_w: float | None = None
    power_source: str = "not measured"
    energy_mj: float | None = None
    result: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentEvent:
    """Something that happened to a deployment: desired published, progress, active, failed, rollback."""

    device_id: str
    ts: float
    kind: str
    deployment_id: str | None = None
    artifact_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetryBatchResult:
    """What one ``add_telemetry_batch`` did: per row (in order) whether it was new, and the gap and
    reset events it recorded (also in the events table)."""

    new: tuple[bool, ...]
    events: tuple["DeploymentEvent", ...] = ()


TELEMETRY_EVENT_PREFIX = "telemetry."
TELEMETRY_GAP = "telemetry.gap"  # event kind: seqs skipped within an incarnation (may still arrive: resends)
TELEMETRY_RESET = "telemetry.reset"  # event kind: a device started a new incarnation (wiped data dir, new agent)


@dataclass(frozen=True)
class PushRecord:
    push_id: str
    created_at: float
    target: str
    plan: Mapping[str, Any]
    state: str  # "running" | "succeeded" | "failed" | "rolled_back"
    reason: str | None = None
    finished_at: float | None = None


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class SingletonLock:
    """A lock on one named duty that at most one process holds at a time, kept in the store's own
    engine so workers that share a store need nothing else: a PostgreSQL session advisory lock on a
    connection of its own (freed when the holder's connection or process dies), or for SQLite an
    ``flock`` on a file beside the store (freed when the holder's process dies; one host only, as the
    file is). ``try_acquire`` never blocks; ``held`` turns False when the PostgreSQL connection broke."""

    def __init__(self, store: "FleetStore", name: str) -> None:
        self.name = name
        self._url = store.url
        self._path = None if store.path is None else store.path.with_name(f"{store.path.name}.{name}.lock")
        self._handle: Any = None  # the held lock: the PostgreSQL connection or the open lock file
        self._conn: Any = None  # PostgreSQL: the connection the tries run on
        self._key = zlib.crc32(f"edgefleet:{name}".encode()) & 0x7FFF_FFFF

    @property
    def held(self) -> bool:
        if self._handle is None:
            return False
        if self._url is not None and (self._handle.closed or self._handle.broken):
            self._handle = self._conn = None
            return False
        return True

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self._url is not None:
            import psycopg

            try:  # one connection kept for the tries (a follower asks every second)
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            except psycopg.Error:
                self._conn = None
                return False
            if row is not None and row[0]:
                self._handle = self._conn
                return True
            return False
        import fcntl

        assert self._path is not None
        handle = open(self._path, "a")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        handle, self._handle = self._handle or getattr(self, "_conn", None), None
        self._conn = None
        if handle is not None:
            try:
                handle.close()  # closing the connection / the file frees the lock
            except Exception:  # noqa: BLE001 - a broken connection has nothing left to free
                pass


class FleetStore:
    """The fleet store on SQLite (a file path) or PostgreSQL (a ``postgresql://`` URL). Thread-safe
    within a process (one connection, one lock); several processes, and on PostgreSQL several
    hosts, may open the same store."""

    def __init__(self, location: Path | str, busy_timeout_ms: int = 10_000) -> None:
        self.url: str | None = str(location) if is_postgres_url(location) else None
        self.path: Path | None = None if self.url is not None else Path(location)
        self._lock = threading.RLock()
        self._errors = _database_errors()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = _Connection(self.url or self.path or "", busy_timeout_ms)
            if self._schema_version() != SCHEMA_VERSION:
                self._migrate()
        except self._errors as exc:
            hint = ("check the URL, that the server runs and that the user may create tables" if self.url
                    else "check the file or use another --data-dir")
            raise FleetError(f"cannot open the fleet store {self.location} ({str(exc).strip()}); {hint}") from exc

    @property
    def location(self) -> str:
        """Where the store is, printable (a PostgreSQL URL without its password)."""
        return redact_url(self.url) if self.url is not None else str(self.path)

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect.name

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "FleetStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def singleton_lock(self, name: str) -> SingletonLock:
        """A lock on a duty that one of several processes sharing this store must do alone
        (`builder serve` workers: docs/scale.md)."""
        return SingletonLock(self, name)

    # -- plumbing ---------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "FleetStore") -> None:
            self.store = store

        def __enter__(self) -> _Connection:
            store = self.store
            store._lock.acquire()
            try:
                store._db.execute(store._db.dialect.begin)
            except BaseException:
                store._lock.release()
                raise
            store._db.in_transaction = True
            return store._db

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            db = self.store._db
            try:
                db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                db.in_transaction = False
                self.store._lock.release()

    def _tx(self) -> "FleetStore._Tx":
        return FleetStore._Tx(self)

    def _schema_version(self) -> int:
        """The store's schema version; 0 for a new one."""
        with self._lock:
            if not self._db.has_table("meta"):
                return 0
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return 0 if row is None else int(row["value"])

    def _migrate(self) -> None:
        """Bring the store to ``SCHEMA_VERSION`` in one transaction (another process may be at it
        too: the version is read again under the engine's schema lock). A newer store than this
        builder is refused."""
        with self._tx() as db:
            db.dialect.lock_schema(db)
            db.execute_script(_META)
            version = self._schema_version()
            if version > SCHEMA_VERSION:
                raise FleetError(f"fleet store {self.location} has schema {version}, this builder reads {SCHEMA_VERSION}; "
                                 "upgrade the builder or use another --data-dir / --store")
            for script in _MIGRATIONS[version:]:
                db.execute_script(script)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # -- devices ----------------------------------------------------------------------------
    def register_device(self, device_id: str, profile: str, group: str | None = None) -> DeviceRecord:
        """Create or update a device's registration (profile and group); keeps what it announced."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices (device_id, profile, group_name, registered_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET profile = excluded.profile, group_name = excluded.group_name, "
                "registered_at = CASE WHEN devices.registered_at > 0 THEN devices.registered_at "
                "ELSE excluded.registered_at END",
                (device_id, profile, group, now))
        return self.device(device_id)

    def remove_device(self, device_id: str) -> None:
        """Forget a device: its row, telemetry, benchmarks and deployment events (so `builder serve`
        does not publish its last desired deployment again)."""
        with self._tx() as db:
            for table in ("devices", "telemetry", "benchmarks", "events", "telemetry_streams"):
                db.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))

    def record_hello(self, device_id: str, *, agent_version: str | None, profile: str | None, machine: str,
                     runtimes: tuple[str, ...], execution_providers: tuple[str, ...],
                     active_artifact_id: str | None, ts: float | None = None) -> None:
        """A device announced itself: it is online; unknown devices are added as *unregistered*
        (profile as announced) so `fleet status` shows them, marked, but pushes refuse them."""
        now = ts or time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices (device_id, profile, machine, runtimes, execution_providers, agent_version, "
                "online, last_seen, active_artifact_id, registered_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET profile = COALESCE(devices.profile, excluded.profile), "
                "machine = excluded.machine, runtimes = excluded.runtimes, "
                "execution_providers = excluded.execution_providers, agent_version = excluded.agent_version, "
                "online = 1, last_seen = excluded.last_seen, "
                "active_artifact_id = COALESCE(excluded.active_artifact_id, devices.active_artifact_id)",
                (device_id, profile, machine, _json(list(runtimes)), _json(list(execution_providers)), agent_version,
                 now, active_artifact_id, 0.0))  # announced, not registered

    def record_status(self, device_id: str, *, online: bool, active_artifact_id: str | None = None,
                      active_model: str | None = None, previous_artifact_id: str | None = None,
                      profile: str | None = None, agent_version: str | None = None, ts: float | None = None) -> None:
        """The device's retained status (or its last will): online state and what it runs."""
        now = ts or time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices (device_id, profile, agent_version, online, last_seen, active_artifact_id, "
                "active_model, previous_artifact_id, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen, "
                "profile = COALESCE(devices.profile, excluded.profile), "
                "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
                "active_artifact_id = CASE WHEN excluded.online = 1 THEN excluded.active_artifact_id "
                "ELSE COALESCE(excluded.active_artifact_id, devices.active_artifact_id) END, "
                "active_model = CASE WHEN excluded.online = 1 THEN excluded.active_model "
                "ELSE COALESCE(excluded.active_model, devices.active_model) END, "
                "previous_artifact_id = CASE WHEN excluded.online = 1 THEN excluded.previous_artifact_id "
                "ELSE COALESCE(excluded.previous_artifact_id, devices.previous_artifact_id) END",
                (device_id, profile, agent_version, int(online), now, active_artifact_id, active_model,
                 previous_artifact_id, 0.0))  # announced, not registered

    def touch(self, device_id: str, ts: float | None = None) -> None:
        """Any message from a device proves it is alive."""
        with self._tx() as db:
            db.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", (ts or time.time(), device_id))

    def device(self, device_id: str) -> DeviceRecord:
        rows = self._query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            raise UsageError(f"unknown device '{device_id}'; add it with `builder fleet add-device {device_id} --profile P` "
                             "or start its agent while `builder serve` runs")
        return _device(rows[0])

    def find_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        if group is None:
            rows = self._query("SELECT * FROM devices ORDER BY device_id")
        else:
            rows = self._query("SELECT * FROM devices WHERE group_name = ? ORDER BY device_id", (group,))
        return [_device(r) for r in rows]

    # -- telemetry --------------------------------------------------------------------------
    def add_telemetry(self, row: TelemetryRow) -> bool:
        """Store one report; a re-sent (device_id, incarnation, seq) is ignored. True when it was new."""
        return self.add_telemetry_batch([row]).new[0]

    def add_telemetry_batch(self, rows: Sequence[TelemetryRow]) -> TelemetryBatchResult:
        """Store reports in ONE transaction (ingest batches them: a fleet-wide outbox flush is
        thousands of reports). Re-sent ones are ignored. Per (device, incarnation) the stream's
        highest seq and count are kept; a seq past the highest + 1 records a ``telemetry_gap``
        event, and a device's first report of a new incarnation a ``telemetry_reset`` event."""
        # One lock order for every batch: two serve workers storing interleaved batches of the same
        # devices on PostgreSQL deadlocked (stream and device rows locked in arrival order).
        order = sorted(range(len(rows)), key=lambda i: (rows[i].device_id, rows[i].incarnation, rows[i].seq))
        inserted_at: dict[int, bool] = {}
        events: list[DeploymentEvent] = []
        streams: dict[tuple[str, str], list[Any]] = {}  # (device, incarnation) -> [max_seq, received, first, last]
        with self._tx() as db:
            for index in order:
                row = rows[index]
                received_at = row.received_at or time.time()
                cur = db.execute(
                    "INSERT OR IGNORE INTO telemetry (device_id, incarnation, seq, ts, received_at, event, model_id, "
                    "window_s, requests, errors, p50_ms, p95_ms, latency_json, cpu_percent, memory_rss_bytes, "
                    "temperature_c, power_w, power_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.device_id, row.incarnation, row.seq, row.ts, received_at, row.event, row.model_id,
                     row.window_s, row.requests, row.errors, row.p50_ms, row.p95_ms, _json(dict(row.latency_ms)),
                     row.cpu_percent, row.memory_rss_bytes, row.temperature_c, row.power_w, row.power_source))
                inserted = cur.rowcount > 0
                inserted_at[index] = inserted
                if not inserted:
                    continue
                key = (row.device_id, row.incarnation)
                stream = streams.get(key)
                if stream is None:
                    found = db.execute("SELECT max_seq, received, first_received_at FROM telemetry_streams "
                                       "WHERE device_id = ? AND incarnation = ?", key).fetchone()
                    if found is None:
                        stream = [-1, 0, received_at, received_at]
                        others = db.execute("SELECT incarnation, max_seq FROM telemetry_streams WHERE device_id = ? "
                                            "ORDER BY last_received_at DESC LIMIT 1", (row.device_id,)).fetchone()
                        if others is not None:
                            events.append(DeploymentEvent(row.device_id, received_at, TELEMETRY_RESET, detail={
                                "incarnation": row.incarnation, "previous_incarnation": others["incarnation"],
                                "previous_max_seq": others["max_seq"], "first_seq": row.seq}))
                    else:
                        stream = [found["max_seq"], found["received"], found["first_received_at"], received_at]
                    streams[key] = stream
                if row.seq > stream[0] + 1:
                    events.append(DeploymentEvent(row.device_id, received_at, TELEMETRY_GAP, detail={
                        "incarnation": row.incarnation, "first_missing": stream[0] + 1, "last_missing": row.seq - 1,
                        "missing": row.seq - 1 - stream[0]}))
                stream[0] = max(stream[0], row.seq)
                stream[1] += 1
                stream[3] = max(stream[3], received_at)
            for (device_id, incarnation), (max_seq, received, first, last) in sorted(streams.items()):
                db.execute("INSERT INTO telemetry_streams (device_id, incarnation, max_seq, received, first_received_at, "
                           "last_received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, incarnation) DO UPDATE "
                           "SET max_seq = excluded.max_seq, received = excluded.received, "
                           "first_received_at = excluded.first_received_at, last_received_at = excluded.last_received_at",
                           (device_id, incarnation, max_seq, received, first, last))
            for event in events:
                db.execute("INSERT INTO events (device_id, ts, kind, deployment_id, artifact_id, detail_json) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (event.device_id, event.ts, event.kind, event.deployment_id,
                                                         event.artifact_id, _json(dict(event.detail))))
            last_seen: dict[str, float] = {}
            for row in rows:
                last_seen[row.device_id] = max(last_seen.get(row.device_id, 0.0), row.received_at or time.time())
            for device_id, seen in sorted(last_seen.items()):
                db.execute("UPDATE devices SET last_seen = ? WHERE device_id = ? AND (last_seen IS NULL OR last_seen < ?)",
                           (seen, device_id, seen))
        return TelemetryBatchResult(new=tuple(inserted_at[i] for i in range(len(rows))), events=tuple(events))

    def telemetry_missing(self, device_id: str | None = None) -> dict[str, int]:
        """Per device, how many reports are missing: seqs below each incarnation's highest stored
        seq that were never stored (every incarnation starts at seq 0). Devices without telemetry
        are absent. Resends shrink it; what the device's outbox dropped (its bounds) stays."""
        sql = "SELECT device_id, SUM(max_seq + 1 - received) AS missing FROM telemetry_streams"
        params: tuple[Any, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            params = (device_id,)
        rows = self._query(sql + " GROUP BY device_id", params)
        return {r["device_id"]: max(0, int(r["missing"])) for r in rows}

    def telemetry(self, device_id: str, since: float | None = None, until: float | None = None,
                  limit: int | None = None) -> list[TelemetryRow]:
        """Reports of one device in time order (``limit`` keeps the latest ones)."""
        sql = "SELECT * FROM telemetry WHERE device_id = ? AND ts >= ? AND ts <= ? ORDER BY ts DESC, seq DESC"
        params: tuple[Any, ...] = (device_id, since if since is not None else float("-inf"),
                                   until if until is not None else float("inf"))
        if limit is not None:
            sql += " LIMIT ?"
            params += (int(limit),)
        return [_telemetry(r) for r in reversed(self._query(sql, params))]

    def telemetry_count(self) -> int:
        """Reports stored for the whole fleet (benchmarks and capacity checks)."""
        return int(self._query("SELECT COUNT(*) AS n FROM telemetry")[0]["n"])

    def latest_field_telemetry(self, device_id: str) -> TelemetryRow | None:
        """The newest report that measured real requests (a window with at least one request)."""
        rows = self._query("SELECT * FROM telemetry WHERE device_id = ? AND requests > 0 ORDER BY ts DESC, seq DESC LIMIT 1",
                           (device_id,))
        return _telemetry(rows[0]) if rows else None

    def latest_telemetry(self, device_id: str) -> TelemetryRow | None:
        rows = self._query("SELECT * FROM telemetry WHERE device_id = ? ORDER BY ts DESC, seq DESC LIMIT 1", (device_id,))
        return _telemetry(rows[0]) if rows else None

    def requests_served(self, device_id: str, model_id: str | None) -> int:
        """Real requests a device reported while running one model."""
        rows = self._query("SELECT COALESCE(SUM(requests), 0) AS n FROM telemetry WHERE device_id = ? AND model_id IS ?",
                           (device_id, model_id))
        return int(rows[0]["n"])

    def latest_field_telemetry_for(self, device_id: str, model_id: str | None) -> TelemetryRow | None:
        """The newest report with real requests on one model (so a new model never shows the old one's latency)."""
        rows = self._query("SELECT * FROM telemetry WHERE device_id = ? AND model_id IS ? AND requests > 0 "
                           "ORDER BY ts DESC, seq DESC LIMIT 1", (device_id, model_id))
        return _telemetry(rows[0]) if rows else None

    # -- benchmarks -------------------------------------------------------------------------
    def add_benchmark(self, row: BenchmarkRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO benchmarks (device_id, ts, artifact_id, p50_ms, p95_ms, mean_ms, power_w, power_source, "
                "energy_mj, result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.device_id, row.ts, row.artifact_id, row.p50_ms, row.p95_ms, row.mean_ms, row.power_w,
                 row.power_source, row.energy_mj, _json(dict(row.result))))

    def latest_benchmark(self, device_id: str, artifact_id: str | None) -> BenchmarkRow | None:
        rows = self._query("SELECT * FROM benchmarks WHERE device_id = ? AND artifact_id IS ? ORDER BY ts DESC, id DESC LIMIT 1",
                           (device_id, artifact_id))
        return _benchmark(rows[0]) if rows else None

    # -- deployment events ------------------------------------------------------------------
    def add_event(self, event: DeploymentEvent) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events (device_id, ts, kind, deployment_id, artifact_id, detail_json) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (event.device_id, event.ts, event.kind, event.deployment_id, event.artifact_id,
                        _json(dict(event.detail))))

    def events(self, device_id: str, since: float | None = None, kinds: tuple[str, ...] | None = None) -> list[DeploymentEvent]:
        rows = self._query("SELECT * FROM events WHERE device_id = ? AND ts >= ? ORDER BY ts, id",
                           (device_id, since if since is not None else float("-inf")))
        out = [_event(r) for r in rows]
        return [e for e in out if kinds is None or e.kind in kinds]

    def latest_desired(self) -> dict[str, DeploymentEvent]:
        """Per device, the last desired deployment published (None-free: cleared devices are absent)."""
        rows = self._query("SELECT e.* FROM events e JOIN (SELECT device_id, MAX(id) AS id FROM events "
                           "WHERE kind IN ('desired', 'desired_cleared') GROUP BY device_id) latest ON e.id = latest.id")
        return {r["device_id"]: _event(r) for r in rows if r["kind"] == "desired"}

    # -- pushes -----------------------------------------------------------------------------
    def start_push(self, push_id: str, target: str, plan: Mapping[str, Any]) -> PushRecord:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO pushes (push_id, created_at, target, plan_json, state) VALUES (?, ?, ?, ?, 'running')",
                       (push_id, now, target, _json(dict(plan))))
        return PushRecord(push_id, now, target, dict(plan), "running")

    def update_push(self, push_id: str, plan: Mapping[str, Any]) -> None:
        """A running push's plan moved on (its canary stage, say): the dashboard shows where it stands."""
        with self._tx() as db:
            db.execute("UPDATE pushes SET plan_json = ? WHERE push_id = ?", (_json(dict(plan)), push_id))

    def finish_push(self, push_id: str, state: str, reason: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE pushes SET state = ?, reason = ?, finished_at = ? WHERE push_id = ?",
                       (state, reason, time.time(), push_id))

    def pushes(self, limit: int = 50) -> list[PushRecord]:
        rows = self._query("SELECT * FROM pushes ORDER BY created_at DESC LIMIT ?", (int(limit),))
        return [PushRecord(r["push_id"], r["created_at"], r["target"], json.loads(r["plan_json"]), r["state"],
                           r["reason"], r["finished_at"]) for r in rows]

    # -- re-compression loop: policies by scope and per-device state, as JSON text ------------
    # Typed by builder.fleet.loop (PolicyStore, LoopStateStore), which the fleet store does not import.
    def set_loop_policy(self, scope: str, policy_json: str, now: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO loop_policies (scope, policy_json, updated_at) VALUES (?, ?, ?) ON CONFLICT(scope) DO UPDATE "
                       "SET policy_json = excluded.policy_json, updated_at = excluded.updated_at",
                       (scope, policy_json, now))
            self._bump_policies_version(db)

    def remove_loop_policy(self, scope: str) -> bool:
        """Forget a scope's policy; False when there was none."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM loop_policies WHERE scope = ?", (scope,)).rowcount > 0
            self._bump_policies_version(db)
            return removed

    @staticmethod
    def _bump_policies_version(db: "_Connection") -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'loop_policies_version'").fetchone()
        db.execute("INSERT INTO meta (key, value) VALUES ('loop_policies_version', ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(int(row["value"]) + 1 if row else 1),))

    def loop_policies_version(self) -> int:
        """Changes with every policy set or removed (by any process): caches of the policies check it."""
        rows = self._query("SELECT value FROM meta WHERE key = 'loop_policies_version'")
        return int(rows[0]["value"]) if rows else 0

    def loop_policies(self) -> dict[str, str]:
        """Every stored policy's JSON by scope, in scope order."""
        return {r["scope"]: r["policy_json"]
                for r in self._query("SELECT scope, policy_json FROM loop_policies ORDER BY scope")}

    def loop_state(self, device_id: str) -> str | None:
        rows = self._query("SELECT state_json FROM loop_state WHERE device_id = ?", (device_id,))
        return rows[0]["state_json"] if rows else None

    def save_loop_state(self, device_id: str, state_json: str, now: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO loop_state (device_id, state_json, updated_at) VALUES (?, ?, ?) ON CONFLICT(device_id) DO UPDATE "
                       "SET state_json = excluded.state_json, updated_at = excluded.updated_at",
                       (device_id, state_json, now))

    def loop_states(self) -> dict[str, str]:
        """Every device's loop state JSON, in device order."""
        return {r["device_id"]: r["state_json"]
                for r in self._query("SELECT device_id, state_json FROM loop_state ORDER BY device_id")}


def _device(r: Mapping[str, Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=r["device_id"], profile=r["profile"], group=r["group_name"], machine=r["machine"] or "",
        runtimes=tuple(json.loads(r["runtimes"] or "[]")), execution_providers=tuple(json.loads(r["execution_providers"] or "[]")),
        agent_version=r["agent_version"], online=bool(r["online"]), last_seen=r["last_seen"],
        active_artifact_id=r["active_artifact_id"], active_model=r["active_model"],
        previous_artifact_id=r["previous_artifact_id"], registered_at=r["registered_at"])


def _telemetry(r: Mapping[str, Any]) -> TelemetryRow:
    return TelemetryRow(
        device_id=r["device_id"], seq=r["seq"], ts=r["ts"], event=r["event"], model_id=r["model_id"],
        window_s=r["window_s"], requests=r["requests"], errors=r["errors"], p50_ms=r["p50_ms"], p95_ms=r["p95_ms"],
        latency_ms=json.loads(r["latency_json"] or "{}"), cpu_percent=r["cpu_percent"],
        memory_rss_bytes=r["memory_rss_bytes"], temperature_c=r["temperature_c"], power_w=r["power_w"],
        power_source=r["power_source"], received_at=r["received_at"], incarnation=r["incarnation"])


def _benchmark(r: Mapping[str, Any]) -> BenchmarkRow:
    return BenchmarkRow(device_id=r["device_id"], ts=r["ts"], artifact_id=r["artifact_id"], p50_ms=r["p50_ms"],
                        p95_ms=r["p95_ms"], mean_ms=r["mean_ms"], power_w=r["power_w"], power_source=r["power_source"],
                        energy_mj=r["energy_mj"], result=json.loads(r["result_json"] or "{}"))


def _event(r: Mapping[str, Any]) -> DeploymentEvent:
    return DeploymentEvent(device_id=r["device_id"], ts=r["ts"], kind=r["kind"], deployment_id=r["deployment_id"],
                           artifact_id=r["artifact_id"], detail=json.loads(r["detail_json"] or "{}"))


def latency_percentiles(latency_ms: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(p50, p95) from a telemetry/benchmark latency mapping; None where the device did not report it."""
    return _opt_float(latency_ms.get("p50")), _opt_float(latency_ms.get("p95"))


def open_store(data_dir: Path, url: str | None = None) -> FleetStore:
    """The fleet store: the database ``url`` names (``postgresql://…``, the CLI's ``--store`` or
    ``$EDGEFLEET_STORE``), else the data directory's SQLite file (:func:`fleet_store_path`)."""
    if url:
        if not is_postgres_url(url):
            raise UsageError(f"--store {redact_url(url)!r}: give a postgresql://user@host/db URL "
                             "(or nothing, for the data directory's SQLite file)")
        return FleetStore(url)
    return FleetStore(fleet_store_path(data_dir))

