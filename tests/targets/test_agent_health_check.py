"""Artifacts as the device sees them: the agent's own runtime + health check accept each format."""
from __future__ import annotations

import pytest

from agent.install import health_check
from agent.manifest import load_public_key, verify_artifact_dir
from agent.runtime import open_runtime
from builder.artifacts.registry import Registry
from builder.profiles import get_profile
from builder.targets.pipeline import BuildModel, BuildRequest, build_artifact
from tests.targets.conftest import input_specs

CASES = [
    ("raspberry-pi-4", "onnxruntime", "fp32", "ort"),
    ("jetson-orin-nano", "onnxruntime-tensorrt", "fp16", "onnx"),
    pytest.param("android-arm64", "litert", "int8", "tflite", marks=[pytest.mark.slow, pytest.mark.litert]),
]


@pytest.mark.parametrize("profile,runtime,precision,fmt", CASES)
def test_agent_runtime_passes_the_shipped_health_check(digits, digits_samples, keys, tmp_path, profile, runtime, precision, fmt):
    if runtime == "litert":
        pytest.importorskip("litert_torch")
    loaded, _ = digits
    model = BuildModel("digits", "1", loaded.onnx_path, input_specs(loaded), loaded.onnx_path, loaded.torch_module)
    result = build_artifact(model, BuildRequest(get_profile(profile), runtime, precision, fmt), digits_samples,
                            registry=Registry(tmp_path / "reg"), private_key=keys[1], out_dir=tmp_path / "out")
    manifest = verify_artifact_dir(tmp_path / "out", load_public_key(keys[0].public))
    runtime_obj = open_runtime(manifest, tmp_path / "out" / manifest.model_payload.name, cache_dir=tmp_path / "cache", threads=1)
    assert [t.name for t in runtime_obj.inputs] == [s.name for s in manifest.inputs]
    report = health_check(runtime_obj, manifest, tmp_path / "out", timing_runs=1)
    assert report.ok and report.max_abs_error <= manifest.verify_tolerance["atol"]
    assert result.manifest.target.format == fmt
