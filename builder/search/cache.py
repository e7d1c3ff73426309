"""Evaluated-candidate cache: same model + same recipe + same evaluation context → no re-run.

SQLite (WAL, busy timeout) so every worker process of one machine shares it safely. The key is
``sha256(model hash | evaluation context hash | canonical recipe)``; the context covers the data,
train data, device profile and evaluation settings, because the metrics depend on them. Values are
``CandidateMetrics`` as JSON. A candidate stopped early for missing a quality floor is cached as
its *partial* quality (accuracy, fidelity after the step where it stopped), which a rerun re-checks
against its own targets. Failed evaluations are not cached (a fix should be retried).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Optional

from builder.errors import SearchError
from builder.search.objectives import CandidateMetrics

_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    key TEXT PRIMARY KEY,
    model_hash TEXT NOT NULL,
    recipe TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    seconds REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stopped (
    key TEXT PRIMARY KEY,
    accuracy REAL,
    fidelity REAL NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def cache_key(model_hash: str, context_hash: str, canonical_recipe: str) -> str:
    return hashlib.sha256(f"{model_hash}|{context_hash}|{canonical_recipe}".encode()).hexdigest()


class CandidateCache:
    """Open one per process; ``get`` / ``put`` are each one short transaction."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SearchError(f"cannot open the candidate cache {self.path} ({exc}); pass another --cache path") from exc

    def get(self, key: str) -> Optional[CandidateMetrics]:
        row = self._db.execute("SELECT metrics_json FROM candidates WHERE key = ?", (key,)).fetchone()
        return CandidateMetrics.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, model_hash: str, recipe: str, metrics: CandidateMetrics, seconds: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO candidates (key, model_hash, recipe, metrics_json, seconds, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, model_hash, recipe, json.dumps(metrics.to_dict()), seconds, time.time()))

    def put_stopped(self, key: str, accuracy: Optional[float], fidelity: float, reason: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO stopped (key, accuracy, fidelity, reason, created_at) VALUES (?, ?, ?, ?, ?)",
                         (key, accuracy, fidelity, reason, time.time()))

    def get_stopped(self, key: str) -> Optional[tuple[Optional[float], float, str]]:
        """(accuracy, fidelity, reason) of a candidate stopped early, or None."""
        row = self._db.execute("SELECT accuracy, fidelity, reason FROM stopped WHERE key = ?", (key,)).fetchone()
        return (row[0], float(row[1]), str(row[2])) if row else None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    def close(self) -> None:
        self._db.close()
