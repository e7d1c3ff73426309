"""`builder keys|build|artifacts` as a user runs them: exit codes, one-line errors, real files."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.artifacts.conftest import make_onnx


def builder(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGEFLEET_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "builder.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("builder: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def home_with_build(tmp_path_factory):
    """A data dir with keys and one fp16 Jetson build of a small ONNX model (built twice)."""
    home = tmp_path_factory.mktemp("home")
    model = make_onnx(home.parent / "tiny.onnx", 7)
    assert builder(home, "keys", "init").returncode == 0
    first = builder(home, "build", str(model), "--profile", "jetson-orin-nano", "--name", "tiny", "--json")
    assert first.returncode == 0, first.stderr
    second = builder(home, "build", str(model), "--profile", "jetson-orin-nano", "--name", "tiny")
    return home, model, json.loads(first.stdout), second


def test_keys_init_writes_a_private_key_only_the_owner_can_read(home_with_build):
    home = home_with_build[0]
    mode = stat.S_IMODE((home / "keys" / "signing_key.pem").stat().st_mode)
    assert mode == 0o600
    key = (home / "keys" / "signing_key.pem").read_bytes()
    again = builder(home, "keys", "init")  # idempotent: the key agents trust is kept
    assert again.returncode == 0 and "already exists" in again.stdout and "kept" in again.stdout
    assert (home / "keys" / "signing_key.pem").read_bytes() == key


def test_build_uses_the_profile_defaults_and_rebuild_reuses_the_artifact(home_with_build):
    home, _, manifest, second = home_with_build
    assert manifest["target"]["runtime"] == "onnxruntime-tensorrt" and manifest["target"]["precision"] == "fp16"
    assert manifest["metrics"]["download_bytes"] > 0 and manifest["metrics"]["host_latency_ms"] > 0
    assert second.returncode == 0 and "[reused]" in second.stdout and manifest["artifact_id"] in second.stdout
    listing = builder(home, "artifacts", "list", "--json")
    assert [r["artifact_id"] for r in json.loads(listing.stdout)] == [manifest["artifact_id"]]


def test_artifacts_verify_detects_a_flipped_byte_and_a_tampered_manifest(home_with_build, tmp_path):
    home, model, manifest, _ = home_with_build
    other = builder(home, "build", str(model), "-p", "raspberry-pi-4", "--precision", "fp32", "--model-version", "3",
                    "--json")
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["model_version"] == "3"  # --model-version; --version is the tool's
    ids = [manifest["artifact_id"], json.loads(other.stdout)["artifact_id"]]
    assert builder(home, "artifacts", "verify", ids[0][:12]).returncode == 0
    verified = json.loads(builder(home, "artifacts", "verify", ids[0][:12], "--json").stdout)
    assert verified["artifact_id"] == ids[0] and verified["signature"] == "valid" and verified["payloads"]
    exported = builder(home, "artifacts", "export", ids[0][:12], str(tmp_path / "exp"))
    assert exported.returncode == 0 and (tmp_path / "exp" / "manifest.sig").is_file()
    from builder.artifacts.registry import Registry

    registry = Registry(home)
    blob = registry.blob_path(registry.manifest(ids[0]).model_payload.sha256)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x40
    blob.write_bytes(bytes(data))
    assert "sha256" in one_line_error(builder(home, "artifacts", "verify", ids[0][:12]))
    mfile = registry.manifest_dir(ids[1]) / "manifest.json"
    doc = json.loads(mfile.read_text())
    doc["target"]["precision"] = "int8"
    mfile.write_text(json.dumps(doc, indent=2))
    assert "signature does not verify" in one_line_error(builder(home, "artifacts", "verify", ids[1][:12]))
    assert builder(home, "artifacts", "rm", ids[1][:12]).returncode == 0
    assert "no artifact" in one_line_error(builder(home, "artifacts", "show", ids[1][:12]))


def test_bad_inputs_are_one_line_errors(home_with_build, tmp_path):
    home, model, _, _ = home_with_build
    assert "unknown device profile 'toaster'" in one_line_error(builder(home, "build", str(model), "-p", "toaster"))
    assert "keys init" in one_line_error(builder(tmp_path / "nokeys", "build", str(model), "-p", "raspberry-pi-4",
                                                 "--precision", "fp32"))
    assert "cannot write format 'tflite'" in one_line_error(builder(home, "build", str(model), "-p", "raspberry-pi-4",
                                                                   "--runtime", "onnxruntime", "--format", "tflite"))
    assert "unknown runtime" in one_line_error(builder(home, "build", str(model), "-p", "raspberry-pi-4", "--runtime", "tvm"))
