"""The build pipeline: a wrong artifact is never registered; the error shows the worst difference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.artifacts.registry import Registry
from builder.errors import VerificationError
from builder.profiles import get_profile
from builder.targets.pipeline import BuildModel, BuildRequest, build_artifact
from tests.targets.conftest import input_specs


def _corrupt_weights(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(biggest).copy()
    arr.reshape(-1)[::3] *= -4.0  # a broken conversion: a third of one layer's weights wrong
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(model, str(dst))
    return dst


def test_corrupted_artifact_fails_verification_and_is_not_registered(digits, digits_samples, keys, tmp_path):
    loaded, _ = digits
    broken = _corrupt_weights(loaded.onnx_path, tmp_path / "broken.onnx")
    registry = Registry(tmp_path / "registry")
    model = BuildModel("digits", "1", broken, input_specs(loaded), reference_onnx_path=loaded.onnx_path)
    request = BuildRequest(get_profile("raspberry-pi-4"), "onnxruntime", "fp32", "onnx")
    with pytest.raises(VerificationError) as info:
        build_artifact(model, request, digits_samples, registry=registry, private_key=keys[1])
    message = str(info.value)
    assert "not registered" in message and "max |diff|" in message and "output" in message
    assert registry.records() == []
    assert not any((tmp_path / "registry" / "blobs").rglob("*[0-9a-f]" * 8))


def test_good_build_is_signed_registered_and_carries_the_reference_sample(digits, digits_samples, keys, tmp_path):
    from agent.manifest import load_public_key

    loaded, _ = digits
    registry = Registry(tmp_path / "registry")
    model = BuildModel("digits", "1", loaded.onnx_path, input_specs(loaded), reference_onnx_path=loaded.onnx_path)
    request = BuildRequest(get_profile("raspberry-pi-4"), "onnxruntime", "fp32", "ort")
    result = build_artifact(model, request, digits_samples, registry=registry, private_key=keys[1], out_dir=tmp_path / "out")
    manifest = registry.verify(result.artifact_id, load_public_key(keys[0].public))
    assert manifest.model_payload.name == "model.ort" and manifest.target.format == "ort"
    assert manifest.metrics["accuracy"] == manifest.metrics["reference_accuracy"] > 0.9
    with np.load(tmp_path / "out" / "sample.npz") as sample:
        x = sample[f"in:{loaded.inputs[0].name}"]
        expected = sample[f"out:{manifest.outputs[0].name}"]
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "out" / "model.ort"), providers=["CPUExecutionProvider"]).run(None, {loaded.inputs[0].name: x})[0]
    tol = manifest.verify_tolerance
    assert np.allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])
