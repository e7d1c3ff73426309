"""LiteRT target: fp32/fp16/int8 .tflite from the PyTorch module (or the ONNX model), run in ai-edge-litert's interpreter."""
from __future__ import annotations

import sys

import pytest

from builder.errors import TargetError
from builder.targets import get_target
from builder.targets.base import TOLERANCES
from tests.targets.conftest import input_specs, reference

pytestmark = pytest.mark.litert


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tflite_builds_and_verifies_in_the_litert_interpreter(digits, digits_samples, tmp_path, precision):
    pytest.importorskip("litert_torch")
    loaded, _ = digits
    target = get_target("litert")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), precision,
                              {"torch_module": loaded.torch_module, "example_inputs": digits_samples.inputs[0]}, tmp_path)
    assert compiled.format == "tflite" and compiled.model_file.path.read_bytes()[4:8] == b"TFL3"
    # the signature keeps the model's input name; the manifest lists the tensor names the agent feeds
    assert list(compiled.input_sources.values()) == [loaded.inputs[0].name]
    assert compiled.runtime_options["signature"]["inputs"] == dict(compiled.input_sources)
    assert compiled.inputs[0].dtype == "float32"  # int8 keeps float IO (dynamic-range quantization)
    report = target.verify(compiled, digits_samples.inputs, reference(loaded, digits_samples), TOLERANCES[precision])
    assert report.passed, report.summary()
    size = compiled.model_file.path.stat().st_size
    bound = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1.0}[precision]
    assert report.worst.max_abs_diff < bound
    if precision == "int8":
        assert report.worst.top1_agreement >= 0.9 and size < 0.4 * loaded.onnx_path.stat().st_size
    if precision == "fp16":
        assert size < 0.6 * loaded.onnx_path.stat().st_size


@pytest.mark.slow
def test_onnx_only_model_converts_through_onnx2torch(digits, digits_samples, tmp_path):
    pytest.importorskip("litert_torch")
    loaded, _ = digits
    target = get_target("litert")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), "fp32",
                              {"example_inputs": digits_samples.inputs[0]}, tmp_path)
    assert any("ONNX via onnx2torch" in note for note in compiled.notes)
    report = target.verify(compiled, digits_samples.inputs, reference(loaded, digits_samples), TOLERANCES["fp32"])
    assert report.passed and report.worst.top1_agreement == 1.0, report.summary()


def test_missing_onnx2torch_names_how_to_install_it(digits, tmp_path, monkeypatch):
    pytest.importorskip("litert_torch")
    loaded, _ = digits
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import now raises ImportError
    with pytest.raises(TargetError, match=r"pip install --no-deps onnx2torch==1\.5\.15"):
        get_target("litert").compile(loaded.onnx_path, input_specs(loaded), "fp32", {}, tmp_path)


def test_missing_converter_names_the_extra_to_install(digits, tmp_path, monkeypatch):
    loaded, _ = digits
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import now raises ImportError
    with pytest.raises(TargetError, match=r"pip install -e '\.\[convert-litert\]'"):
        get_target("litert").compile(loaded.onnx_path, input_specs(loaded), "fp32",
                                     {"torch_module": loaded.torch_module}, tmp_path)
