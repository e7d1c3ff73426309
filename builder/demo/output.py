"""The demo's output folder: made fresh on every run, except the build cache, and never a folder
the demo did not make.

A second `make demo` used to fail on what the first one left (a packaged artifact folder that
``os.replace`` cannot overwrite). Every run now starts from an empty folder; what is kept is the
artifact registry and signing keys of the fleet stage, so a rerun reuses its MiniLM builds
(minutes) instead of rebuilding them. A folder is only cleared when it carries the marker file a
demo wrote into it: ``--out ~`` must never empty someone's home.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from builder.errors import UsageError

MARKER = ".edgefleet-demo"

# Relative to the fleet stage's folder; a prefix keeps a file and its SQLite -wal/-shm companions.
FLEET_KEEP: tuple[str, ...] = ("home/registry.sqlite", "home/blobs", "home/manifests", "home/keys")
KEEP: tuple[str, ...] = tuple(f"fleet/{path}" for path in FLEET_KEEP)  # relative to the demo's folder


def prepare_output_dir(out_dir: Path, keep: Iterable[str] = KEEP) -> Path:
    """Make ``out_dir`` an empty demo folder except ``keep``; refuse a non-empty folder without the marker."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the demo's outputs")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise UsageError(f"--out {out_dir} exists and was not made by the demo (no {MARKER} file in it); "
                         "choose a new folder or remove it")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir, out_dir, tuple(keep))
    (out_dir / MARKER).write_text("made by `python -m builder.demo`; a rerun empties this folder "
                                  "except the fleet stage's registry and keys\n", encoding="utf-8")
    return out_dir


def _clear(root: Path, folder: Path, keep: tuple[str, ...]) -> None:
    for entry in sorted(folder.iterdir()):
        rel = entry.relative_to(root).as_posix()
        if rel == MARKER or any(rel.startswith(k) for k in keep):
            continue
        if entry.is_dir() and not entry.is_symlink() and any(k.startswith(rel + "/") for k in keep):
            _clear(root, entry, keep)
        elif entry.is_dir() and not entry.is_symlink():
            # Renamed first: a run killed half-way through the removal leaves a hidden folder, not a
            # half-empty one that looks like output; the next run removes it.
            trash = entry.with_name(f".removing-{entry.name}")
            if trash.exists():
                shutil.rmtree(trash)
            entry.rename(trash)
            shutil.rmtree(trash)
        else:
            entry.unlink()
