"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, *, make_parents: bool = False, fsync: bool = False) -> Path:
    """Write to a temporary file beside ``path``, then ``os.replace`` it into place.

    ``fsync`` flushes the data to disk before the rename (for files a crash must not lose, like the
    registry's manifests); the temporary file is removed if anything fails.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
