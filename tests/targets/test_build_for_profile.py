"""`build_for_profile`: the profile's defaults, the engine's int8 for ONNX Runtime, cache reuse."""
from __future__ import annotations

import pytest

from builder.targets.profile_build import TargetChoice, build_for_profile, choose_target
from builder.profiles import get_profile
from builder.errors import UsageError


def _triple(choice: TargetChoice) -> tuple[str, str, str]:
    return choice.runtime, choice.precision, choice.format


def test_profile_defaults_and_overrides():
    pi, jetson, nano, android = (get_profile(n) for n in ("raspberry-pi-4", "jetson-orin-nano", "jetson-nano", "android-arm64"))
    assert choose_target(pi, None, None, None, False, True) == TargetChoice("onnxruntime", "int8", "ort", "int8")
    assert choose_target(pi, None, None, None, False, False).implicit_quantize == "int8-dynamic"
    assert choose_target(pi, None, "fp32", None, False).implicit_quantize is None
    assert _triple(choose_target(jetson, None, None, None, False)) == ("onnxruntime-tensorrt", "fp16", "onnx")
    assert _triple(choose_target(android, None, None, None, False)) == ("litert", "int8", "tflite")
    assert _triple(choose_target(android, "onnxruntime", None, None, False)) == ("onnxruntime", "fp32", "onnx")
    with pytest.raises(UsageError, match="no TensorRT int8"):
        choose_target(nano, None, "int8", None, False)
    with pytest.raises(UsageError, match="does not run 'onnxruntime-tensorrt'"):
        choose_target(pi, "onnxruntime-tensorrt", None, None, False)


@pytest.mark.slow
def test_pi_default_build_quantizes_verifies_and_is_reused(digits_npz, keys, tmp_path):
    home = tmp_path / "home"
    keys_dir = keys[0].private.parent
    kwargs = dict(input_shapes="1x1x8x8", data=digits_npz, registry_dir=home, key_dir=keys_dir)
    first = build_for_profile("builder.zoo.digits_cnn:trained", "raspberry-pi-4", **kwargs)
    m = first.manifest
    # int8's CNN recipe may keep the stem / classifier in float: "mixed" is int8 with float nodes
    assert (m.target.runtime, m.target.format) == ("onnxruntime", "ort") and m.target.precision in ("int8", "mixed")
    assert m.recipe["step"][0]["type"] == "int8" and m.metrics["accuracy"] >= 0.9
    assert m.metrics["size_bytes"] < 0.5 * 270_000  # int8 weights vs ~270 KB fp32
    again = build_for_profile("builder.zoo.digits_cnn:trained", "raspberry-pi-4", **kwargs)
    assert again.reused and again.artifact_id == first.artifact_id and again.report is None


def test_a_refusal_on_generated_inputs_says_to_pass_real_data(keys, tmp_path):
    """Verification on random inputs says little for a text/image model: the refusal names that
    and the fix (--data), and nothing is registered."""
    from builder.artifacts.registry import Registry
    from builder.errors import VerificationError
    from builder.zoo import digits_cnn

    model = digits_cnn.write_onnx(tmp_path / "digits.onnx", digits_cnn.untrained())
    home = tmp_path / "home"
    with pytest.raises(VerificationError, match="judged on synthetic inputs.*pass --data with real samples"):
        build_for_profile(str(model), "x86-64-host", precision="fp32", input_shapes="1x1x8x8", registry_dir=home,
                          key_dir=keys[0].private.parent, min_cosine=1.5)  # a floor nothing can meet
    assert Registry(home).records() == []


def test_push_passes_data_to_its_build_and_refuses_it_with_an_artifact(tmp_path):
    from builder.fleet.rollout.push_artifacts import ArtifactChooser

    class NoRegistry:
        def resolve(self, artifact):
            return artifact

    chooser = ArtifactChooser(NoRegistry(), tmp_path, model="m.onnx", data="builder.zoo.minilm:sentences", task="embed")
    assert (chooser.data, chooser.task) == ("builder.zoo.minilm:sentences", "embed")
    with pytest.raises(UsageError, match="--data/--train-data/--task apply to --model builds"):
        ArtifactChooser(NoRegistry(), tmp_path, artifact="abc", data="x.npz")
