"""ONNX Runtime target: portable .onnx and .ort, both loaded and run in ORT on the host."""
from __future__ import annotations

import onnx
import pytest

from builder.errors import TargetError
from builder.targets import get_target
from builder.targets.base import TOLERANCES
from tests.targets.conftest import input_specs, reference


def test_ort_format_build_ships_ort_and_operator_config_and_verifies_both(digits, digits_samples, tmp_path):
    loaded, _ = digits
    target = get_target("onnxruntime")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), "fp32", {"format": "ort"}, tmp_path)
    names = {f.name: f.role for f in compiled.files}
    assert names["model.ort"] == "model"
    config = next(f for f in compiled.files if f.role == "aux")
    assert config.name.endswith(".config") and "Conv" in config.path.read_text()
    # the portable .onnx the .ort came from carries no x86-only NCHWc ops
    portable = onnx.load(str(compiled.verify_files[0].path))
    assert not [n for n in portable.graph.node if n.domain == "com.microsoft.nchwc"]
    report = target.verify(compiled, digits_samples.inputs, reference(loaded, digits_samples), TOLERANCES["fp32"])
    assert report.passed, report.summary()
    assert {c.payload for c in report.checks} == {"model.ort", "model.onnx"}
    assert report.worst.max_abs_diff < 1e-4 and report.worst.top1_agreement == 1.0
    assert report.host_latency_ms and report.host_latency_ms > 0


def test_onnx_format_build_is_one_portable_file(digits, digits_samples, tmp_path):
    loaded, _ = digits
    target = get_target("onnxruntime")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), "fp32", {"format": "onnx"}, tmp_path)
    assert [f.name for f in compiled.files] == ["model.onnx"]
    assert compiled.inputs[0].name == loaded.inputs[0].name and compiled.inputs[0].dtype == "float32"
    assert target.verify(compiled, digits_samples.inputs, reference(loaded, digits_samples), TOLERANCES["fp32"]).passed


def test_non_portable_optimization_level_is_refused(digits, tmp_path):
    loaded, _ = digits
    with pytest.raises(TargetError, match="not portable"):
        get_target("onnxruntime").compile(loaded.onnx_path, input_specs(loaded), "fp32",
                                          {"format": "onnx", "optimization_level": "all"}, tmp_path)
