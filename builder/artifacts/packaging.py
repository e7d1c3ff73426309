"""Write an artifact directory: payload files + ``manifest.json`` + ``manifest.sig``, atomically.

The directory is assembled under a temporary name beside the destination and renamed into place,
so a crash never leaves a half-written artifact where a reader could find it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from agent.manifest import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION,
    SIGNATURE_FILE,
    Manifest,
    PayloadEntry,
    Target,
    TensorSpec,
    compute_artifact_id,
    sha256_file,
)
from builder import __version__
from builder.artifacts.signing import sign_manifest_dict, signature_bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def package_artifact(
    dest_dir: Path,
    payload_files: Mapping[str, tuple[Path, str]],
    *,
    model_name: str,
    model_version: str,
    target: Target,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    private_key: Any,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    verify_tolerance: Mapping[str, float] | None = None,
) -> Manifest:
    """Copy payloads (name -> (source path, role)) into ``dest_dir`` with a signed manifest.

    ``dest_dir`` must not exist yet (artifacts are immutable); returns the manifest written.
    """
    dest_dir = Path(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        entries = []
        for name, (src, role) in sorted(payload_files.items()):
            dst = staging / name
            shutil.copyfile(src, dst)
            with open(dst, "rb") as fh:
                os.fsync(fh.fileno())
            entries.append(PayloadEntry(name=name, sha256=sha256_file(dst), size_bytes=dst.stat().st_size, role=role))
        manifest = Manifest(
            schema_version=MANIFEST_SCHEMA_VERSION,
            artifact_id=compute_artifact_id(entries),
            model_name=model_name,
            model_version=model_version,
            target=target,
            payloads=tuple(entries),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            recipe=dict(recipe or {}),
            metrics=dict(metrics or {}),
            builder_version=__version__,
            created_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        )
        if verify_tolerance is not None:
            manifest = replace(manifest, verify_tolerance=dict(verify_tolerance))
        manifest_dict = manifest.to_dict()
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest_dict, indent=2, sort_keys=True), encoding="utf-8")
        (staging / SIGNATURE_FILE).write_bytes(signature_bytes(sign_manifest_dict(manifest_dict, private_key)))
        _fsync_dir(staging)
        os.replace(staging, dest_dir)
        _fsync_dir(dest_dir.parent)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
