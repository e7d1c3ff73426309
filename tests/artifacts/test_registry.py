"""The local registry: content-addressed payloads, cache reuse, verification, concurrency, ladder."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from agent.manifest import load_public_key, verify_artifact_dir
from builder.artifacts.registry import Registry
from builder.errors import RegistryError, VerificationError
from tests.artifacts.conftest import package


def test_add_stores_payloads_by_hash_and_exports_a_verifiable_directory(keys, tmp_path):
    registry = Registry(tmp_path / "home")
    record, reused = registry.add_artifact(package(tmp_path / "a", 1, keys[1]), cache_key="k1")
    assert not reused and record.profile == "raspberry-pi-4" and record.metrics["fidelity"]["min_cosine"] == 1.0
    entry = registry.manifest(record.artifact_id).model_payload
    assert registry.blob_path(entry.sha256).is_file()
    assert registry.lookup_cache("k1").artifact_id == record.artifact_id
    out = registry.export(record.artifact_id[:8], tmp_path / "exported", load_public_key(keys[0].public))
    assert verify_artifact_dir(out, load_public_key(keys[0].public)).artifact_id == record.artifact_id


def test_same_payloads_registered_twice_are_reused_not_duplicated(keys, tmp_path):
    registry = Registry(tmp_path / "home")
    first, _ = registry.add_artifact(package(tmp_path / "a", 1, keys[1]))
    again, reused = registry.add_artifact(package(tmp_path / "b", 1, keys[1], version="2"))
    assert reused and again.artifact_id == first.artifact_id and again.model_version == "1"  # immutable
    assert len(registry.records()) == 1


def test_verify_detects_flipped_payload_byte_and_tampered_manifest(keys, tmp_path):
    registry = Registry(tmp_path / "home")
    pub = load_public_key(keys[0].public)
    a, _ = registry.add_artifact(package(tmp_path / "a", 1, keys[1]))
    b, _ = registry.add_artifact(package(tmp_path / "b", 2, keys[1]))
    registry.verify(a.artifact_id, pub)
    blob = registry.blob_path(registry.manifest(a.artifact_id).model_payload.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.onnx sha256"):
        registry.verify(a.artifact_id, pub)
    mfile = registry.manifest_dir(b.artifact_id) / "manifest.json"
    doc = json.loads(mfile.read_text())
    doc["model_version"] = "999"
    mfile.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="signature does not verify"):
        registry.verify(b.artifact_id, pub)


def test_rm_deletes_only_unshared_blobs_and_unknown_ids_are_one_line_errors(keys, tmp_path):
    registry = Registry(tmp_path / "home")
    a, _ = registry.add_artifact(package(tmp_path / "a", 1, keys[1]))
    freed = registry.remove(a.artifact_id)
    assert len(freed) == 1 and not registry.blob_path(freed[0]).exists()
    with pytest.raises(RegistryError, match="no artifact"):
        registry.get(a.artifact_id)


def test_ladder_rungs_are_kept_in_order(keys, tmp_path):
    registry = Registry(tmp_path / "home")
    a, _ = registry.add_artifact(package(tmp_path / "a", 1, keys[1]))
    b, _ = registry.add_artifact(package(tmp_path / "b", 2, keys[1]))
    registry.add_ladder_rung("m", "raspberry-pi-4", 1, b.artifact_id, {"latency_ms": 2.0})
    registry.add_ladder_rung("m", "raspberry-pi-4", 0, a.artifact_id[:10], {"latency_ms": 5.0})
    rungs = registry.list_ladder("m", "raspberry-pi-4")
    assert [r.artifact_id for r in rungs] == [a.artifact_id, b.artifact_id] and rungs[1].metrics["latency_ms"] == 2.0


def _register_many(root: str, dirs: list[str], barrier) -> list[str]:
    barrier.wait()
    registry = Registry(Path(root))
    return [registry.add_artifact(Path(d), cache_key=f"key-{Path(d).name}")[0].artifact_id for d in dirs]


def test_two_processes_registering_at_once_leave_a_consistent_registry(keys, tmp_path):
    dirs = [str(package(tmp_path / "p", seed, keys[1])) for seed in range(6)]
    root = str(tmp_path / "home")
    Registry(Path(root))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:  # both register all six (same ids) in opposite orders
            results = pool.starmap(_register_many, [(root, dirs, barrier), (root, dirs[::-1], barrier)])
    assert sorted(results[0]) == sorted(results[1])
    registry = Registry(Path(root))
    pub = load_public_key(keys[0].public)
    assert len(registry.records()) == 6
    for record in registry.records():
        registry.verify(record.artifact_id, pub)
