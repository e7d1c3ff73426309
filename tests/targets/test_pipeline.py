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


SHIFT = 3.0  # digits logits: min cosine with the original ~0.72, argmax unchanged


def _shift_logits(src: Path, dst: Path, shift: float) -> Path:
    """A model whose logits all move by ``shift``: same argmax, lower cosine (what fine-tuning can do)."""
    model = onnx.load(str(src))
    bias = [t for t in model.graph.initializer if list(t.dims) == [10]][-1]
    arr = numpy_helper.to_array(bias).copy() + shift
    bias.CopyFrom(numpy_helper.from_array(arr, bias.name))
    onnx.save(model, str(dst))
    return dst


def test_a_retrained_model_is_judged_by_the_task_against_the_original(digits, digits_samples, keys, tmp_path):
    loaded, _ = digits
    shifted = _shift_logits(loaded.onnx_path, tmp_path / "tuned.onnx", SHIFT)
    recipe = {"step": [{"type": "prune_channels", "epochs": 1}]}
    request = BuildRequest(get_profile("raspberry-pi-4"), "onnxruntime", "fp32", "ort")
    kept = BuildModel("digits", "1", shifted, input_specs(loaded), loaded.onnx_path, recipe=recipe)
    with pytest.raises(VerificationError, match="cosine"):  # not retrained: the cosine floor holds
        build_artifact(kept, request, digits_samples, registry=Registry(tmp_path / "r1"), private_key=keys[1])
    tuned = BuildModel("digits", "1", shifted, input_specs(loaded), loaded.onnx_path, recipe=recipe, trained=True)
    result = build_artifact(tuned, request, digits_samples, registry=Registry(tmp_path / "r2"), private_key=keys[1])
    assert result.report.worst.min_cosine < 0.9 and result.report.worst.task_score == 1.0


def test_a_retrained_models_artifact_must_match_its_own_onnx(digits, digits_samples, tmp_path):
    from builder.targets import get_target
    from builder.targets.pipeline import _check_conversion, reference_outputs, verification_tolerance

    loaded, _ = digits
    shifted = _shift_logits(loaded.onnx_path, tmp_path / "tuned.onnx", SHIFT)
    target = get_target("onnxruntime")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), "fp32", {"format": "ort"}, tmp_path / "c")
    request = BuildRequest(get_profile("raspberry-pi-4"), "onnxruntime", "fp32", "ort")
    # the artifact was compiled from the original, not from the retrained ONNX it claims to be: a conversion bug
    wrong = BuildModel("digits", "1", shifted, input_specs(loaded), loaded.onnx_path, recipe={"step": []}, trained=True)
    reference = reference_outputs(loaded.onnx_path, digits_samples)
    tolerance, _ = verification_tolerance(wrong, request, digits_samples, reference)
    report = target.verify(compiled, digits_samples.inputs, reference, tolerance)
    assert report.passed  # against the original alone it looks perfect
    checked = _check_conversion(target, compiled, wrong, request, digits_samples, report)
    assert not checked.passed and "conversion: against the compressed model itself" in checked.worst.reason
