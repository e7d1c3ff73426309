"""The local artifact registry: SQLite for what was built, content-addressed files for the bytes.

Layout under the data directory (``--registry-dir``, ``$EDGEFLEET_HOME``, or the platform's user
data dir for "edgefleet")::

    registry.sqlite                      models, versions, artifacts, payloads, metrics, cache, ladder
    blobs/sha256/ab/abcdef…              every payload file once, named by its sha256
    manifests/<artifact_id>/manifest.json, manifest.sig   exactly as signed

Concurrency: WAL journal, a busy timeout, and every write inside ``BEGIN IMMEDIATE`` (one writer at
a time, readers never blocked). Blob and manifest files are written to a temporary name in the same
directory then renamed, while the write lock is held, so a concurrent ``rm`` cannot delete a blob
another builder is registering. Artifacts are immutable: registering an artifact id that exists
keeps the first manifest and reports ``reused``.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from agent.errors import AgentError
from agent.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, canonical_json, sha256_file, verify_artifact_dir, verify_signature
from builder.atomic_files import atomic_write_bytes
from builder.errors import RegistryError, VerificationError

HOME_ENV = "EDGEFLEET_HOME"
DB_FILE = "registry.sqlite"
BUSY_TIMEOUT_MS = 60_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    model_name TEXT NOT NULL REFERENCES models(name), version TEXT NOT NULL, source_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (model_name, version));
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY, model_name TEXT NOT NULL, model_version TEXT NOT NULL, profile TEXT NOT NULL,
    runtime TEXT NOT NULL, precision TEXT NOT NULL, format TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL, metrics_json TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_by_model ON artifacts(model_name, profile);
CREATE TABLE IF NOT EXISTS payloads (
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id) ON DELETE CASCADE, name TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, role TEXT NOT NULL, PRIMARY KEY (artifact_id, name));
CREATE INDEX IF NOT EXISTS payloads_by_sha ON payloads(sha256);
CREATE TABLE IF NOT EXISTS metrics (
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id) ON DELETE CASCADE, key TEXT NOT NULL, value REAL,
    PRIMARY KEY (artifact_id, key));
CREATE TABLE IF NOT EXISTS cache (
    cache_key TEXT PRIMARY KEY, artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id) ON DELETE CASCADE,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ladder (
    model_name TEXT NOT NULL, profile TEXT NOT NULL, rung INTEGER NOT NULL,
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id) ON DELETE CASCADE, metrics_json TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (model_name, profile, rung));
"""


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """$EDGEFLEET_HOME, else the platform's user data directory for "edgefleet"."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgefleet"))


@dataclass(frozen=True)
class ArtifactRecord:
    """One registered artifact as ``list``/``show`` present it."""

    artifact_id: str
    model_name: str
    model_version: str
    profile: str
    runtime: str
    precision: str
    format: str
    size_bytes: int
    created_at: float
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LadderRung:
    model_name: str
    profile: str
    rung: int
    artifact_id: str
    metrics: Mapping[str, Any]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Registry:
    """Open with ``Registry(root)``; every method opens its own short-lived connection (safe across
    processes and threads)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_home()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the registry at {self.root}: {exc.strerror}; pass --registry-dir or set ${HOME_ENV}") from exc
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.root / DB_FILE

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open {self.db_path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            conn.row_factory = sqlite3.Row
            yield conn
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry database error ({exc}); if {self.db_path} is corrupt, move it away and rebuild") from exc
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time: BEGIN IMMEDIATE takes the write lock up front (waits busy_timeout)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def manifest_dir(self, artifact_id: str) -> Path:
        return self.root / "manifests" / artifact_id

    # -- artifacts --------------------------------------------------------------------------
    def add_artifact(self, artifact_dir: Path, *, source_sha256: str = "", cache_key: str | None = None) -> tuple[ArtifactRecord, bool]:
        """Register a packaged, signed artifact directory. Returns (record, reused).

        ``reused`` is True when an artifact with the same id (same payload bytes) was already
        registered: the stored one is kept unchanged and the cache key now points at it.
        """
        artifact_dir = Path(artifact_dir)
        manifest_bytes = (artifact_dir / MANIFEST_FILE).read_bytes()
        sig_bytes = (artifact_dir / SIGNATURE_FILE).read_bytes()
        manifest = Manifest.from_bytes(manifest_bytes)
        for entry in manifest.payloads:
            if sha256_file(artifact_dir / entry.name) != entry.sha256:
                raise VerificationError(f"payload {entry.name} does not match its manifest; not registered")
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT artifact_id FROM artifacts WHERE artifact_id=?", (manifest.artifact_id,)).fetchone()
            reused = row is not None
            if not reused:
                for entry in manifest.payloads:
                    blob = self.blob_path(entry.sha256)
                    if not blob.is_file() or blob.stat().st_size != entry.size_bytes:
                        _atomic_copy(artifact_dir / entry.name, blob)
                mdir = self.manifest_dir(manifest.artifact_id)
                atomic_write_bytes(mdir / SIGNATURE_FILE, sig_bytes, make_parents=True, fsync=True)
                atomic_write_bytes(mdir / MANIFEST_FILE, manifest_bytes, make_parents=True, fsync=True)
                conn.execute("INSERT OR IGNORE INTO models(name, created_at) VALUES (?, ?)", (manifest.model_name, now))
                conn.execute("INSERT OR IGNORE INTO versions(model_name, version, source_sha256, created_at) VALUES (?,?,?,?)",
                             (manifest.model_name, manifest.model_version, source_sha256, now))
                t = manifest.target
                conn.execute(
                    "INSERT INTO artifacts(artifact_id, model_name, model_version, profile, runtime, precision, format,"
                    " size_bytes, manifest_sha256, metrics_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (manifest.artifact_id, manifest.model_name, manifest.model_version, t.profile, t.runtime, t.precision,
                     t.format, manifest.total_size_bytes, _sha256_bytes(canonical_json(json.loads(manifest_bytes))),
                     json.dumps(dict(manifest.metrics), sort_keys=True), now))
                conn.executemany("INSERT INTO payloads(artifact_id, name, sha256, size_bytes, role) VALUES (?,?,?,?,?)",
                                 [(manifest.artifact_id, e.name, e.sha256, e.size_bytes, e.role) for e in manifest.payloads])
                conn.executemany("INSERT INTO metrics(artifact_id, key, value) VALUES (?,?,?)",
                                 [(manifest.artifact_id, k, float(v)) for k, v in _flat_numbers(manifest.metrics)])
            if cache_key:
                conn.execute("INSERT OR REPLACE INTO cache(cache_key, artifact_id, created_at) VALUES (?,?,?)",
                             (cache_key, manifest.artifact_id, now))
        return self.get(manifest.artifact_id), reused

    def lookup_cache(self, cache_key: str) -> ArtifactRecord | None:
        """The artifact built earlier for this cache key, if it is still intact on disk."""
        with self._connect() as conn:
            row = conn.execute("SELECT artifact_id FROM cache WHERE cache_key=?", (cache_key,)).fetchone()
        if row is None:
            return None
        record = self.get(row["artifact_id"])
        for entry in self.manifest(record.artifact_id).payloads:
            blob = self.blob_path(entry.sha256)
            if not blob.is_file() or blob.stat().st_size != entry.size_bytes:
                return None
        return record

    def resolve(self, id_or_prefix: str) -> str:
        """Full artifact id from an id or a unique prefix (at least 4 hex digits)."""
        prefix = id_or_prefix.strip().lower()
        if len(prefix) < 4:
            raise RegistryError(f"artifact id '{id_or_prefix}' is too short; give at least 4 hex digits (see `builder artifacts list`)")
        with self._connect() as conn:
            rows = conn.execute("SELECT artifact_id FROM artifacts WHERE artifact_id LIKE ? LIMIT 3", (prefix + "%",)).fetchall()
        if not rows:
            raise RegistryError(f"no artifact '{id_or_prefix}' in the registry at {self.root}; see `builder artifacts list`")
        if len(rows) > 1:
            raise RegistryError(f"artifact id '{id_or_prefix}' is ambiguous; give more digits")
        return rows[0]["artifact_id"]

    def get(self, id_or_prefix: str) -> ArtifactRecord:
        artifact_id = self.resolve(id_or_prefix)
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM artifacts WHERE artifact_id=?", (artifact_id,)).fetchone()
        return _record(row)

    def records(self, model_name: str | None = None, profile: str | None = None) -> list[ArtifactRecord]:
        sql, args = "SELECT * FROM artifacts WHERE 1=1", list[str]()
        if model_name:
            sql, args = sql + " AND model_name=?", args + [model_name]
        if profile:
            sql, args = sql + " AND profile=?", args + [profile]
        with self._connect() as conn:
            return [_record(r) for r in conn.execute(sql + " ORDER BY created_at, artifact_id", args).fetchall()]

    def manifest(self, id_or_prefix: str) -> Manifest:
        artifact_id = self.resolve(id_or_prefix)
        try:
            return Manifest.from_bytes((self.manifest_dir(artifact_id) / MANIFEST_FILE).read_bytes())
        except OSError as exc:
            raise RegistryError(f"manifest of {artifact_id[:12]} is missing from {self.root}; `builder artifacts rm` it and rebuild") from exc
        except AgentError as exc:
            raise VerificationError(f"manifest of {artifact_id[:12]} is unreadable: {exc}") from exc

    def payload_path(self, id_or_prefix: str, name: str) -> Path:
        for entry in self.manifest(id_or_prefix).payloads:
            if entry.name == name:
                return self.blob_path(entry.sha256)
        raise RegistryError(f"artifact {id_or_prefix} has no payload '{name}'")

    def verify(self, id_or_prefix: str, public_key: Any) -> Manifest:
        """Signature over the stored manifest, the manifest's id and the registry row, every blob's
        size and sha256. Raises VerificationError naming the first problem."""
        from agent.manifest import verify_payload_file

        artifact_id = self.resolve(id_or_prefix)
        mdir = self.manifest_dir(artifact_id)
        try:
            manifest = verify_signature((mdir / MANIFEST_FILE).read_bytes(), (mdir / SIGNATURE_FILE).read_bytes(), public_key)
        except OSError as exc:
            raise VerificationError(f"artifact {artifact_id[:12]}: manifest or signature file missing") from exc
        except AgentError as exc:
            raise VerificationError(f"artifact {artifact_id[:12]}: {exc}") from exc
        if manifest.artifact_id != artifact_id:
            raise VerificationError(f"artifact {artifact_id[:12]}: stored manifest names artifact {manifest.artifact_id[:12]}")
        for entry in manifest.payloads:
            try:
                verify_payload_file(self.blob_path(entry.sha256), entry)
            except AgentError as exc:
                raise VerificationError(f"artifact {artifact_id[:12]}: {exc}") from exc
        return manifest

    def export(self, id_or_prefix: str, dest_dir: Path, public_key: Any | None = None) -> Path:
        """Write a self-contained artifact directory (payloads + manifest.json + manifest.sig)."""
        artifact_id = self.resolve(id_or_prefix)
        manifest = self.manifest(artifact_id)
        dest_dir = Path(dest_dir)
        if dest_dir.exists() and any(dest_dir.iterdir()):
            raise RegistryError(f"{dest_dir} exists and is not empty; choose a new directory")
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
        try:
            for entry in manifest.payloads:
                _atomic_copy(self.blob_path(entry.sha256), staging / entry.name)
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                _atomic_copy(self.manifest_dir(artifact_id) / name, staging / name)
            if public_key is not None:
                try:
                    verify_artifact_dir(staging, public_key)
                except AgentError as exc:
                    raise VerificationError(f"artifact {artifact_id[:12]} does not verify; not exported: {exc}") from exc
            if dest_dir.exists():
                dest_dir.rmdir()
            os.replace(staging, dest_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest_dir

    def remove(self, id_or_prefix: str) -> list[str]:
        """Delete an artifact, its cache entries and ladder rungs, and blobs no other artifact uses."""
        artifact_id = self.resolve(id_or_prefix)
        with self._write() as conn:
            shas = [r["sha256"] for r in conn.execute("SELECT sha256 FROM payloads WHERE artifact_id=?", (artifact_id,))]
            conn.execute("DELETE FROM artifacts WHERE artifact_id=?", (artifact_id,))
            orphans = [s for s in set(shas)
                       if conn.execute("SELECT 1 FROM payloads WHERE sha256=? LIMIT 1", (s,)).fetchone() is None]
            for sha in orphans:  # still under the write lock: no concurrent add can be mid-way
                self.blob_path(sha).unlink(missing_ok=True)
            shutil.rmtree(self.manifest_dir(artifact_id), ignore_errors=True)
        return orphans

    # -- ladder (filled by the search, issue 7) --------------------------------------------
    def add_ladder_rung(self, model_name: str, profile: str, rung: int, artifact_id: str,
                        metrics: Mapping[str, Any] | None = None) -> LadderRung:
        """Put an artifact at position ``rung`` (0 = first choice) of a model's ladder for a profile."""
        full_id = self.resolve(artifact_id)
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO ladder(model_name, profile, rung, artifact_id, metrics_json, created_at)"
                         " VALUES (?,?,?,?,?,?)", (model_name, profile, int(rung), full_id,
                                                   json.dumps(dict(metrics or {}), sort_keys=True), time.time()))
        return LadderRung(model_name, profile, int(rung), full_id, dict(metrics or {}))

    def list_ladder(self, model_name: str, profile: str) -> list[LadderRung]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM ladder WHERE model_name=? AND profile=? ORDER BY rung", (model_name, profile)).fetchall()
        return [LadderRung(r["model_name"], r["profile"], r["rung"], r["artifact_id"], json.loads(r["metrics_json"])) for r in rows]

    def clear_ladder(self, model_name: str, profile: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM ladder WHERE model_name=? AND profile=?", (model_name, profile))


def _record(row: sqlite3.Row) -> ArtifactRecord:
    return ArtifactRecord(row["artifact_id"], row["model_name"], row["model_version"], row["profile"], row["runtime"],
                          row["precision"], row["format"], row["size_bytes"], row["created_at"], json.loads(row["metrics_json"]))


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _flat_numbers(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flat_numbers(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out


__all__: Sequence[str] = ("Registry", "ArtifactRecord", "LadderRung", "default_home", "HOME_ENV")
