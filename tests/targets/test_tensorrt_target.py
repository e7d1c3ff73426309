"""TensorRT-ready ONNX: fp16 weights with fp32 IO, EP settings for the agent, verified on ORT CPU."""
from __future__ import annotations

import numpy as np
import onnx

from builder.targets import get_target
from builder.targets.base import TOLERANCES
from tests.targets.conftest import input_specs, reference


def test_fp16_onnx_keeps_fp32_io_and_verifies_on_host_cpu(digits, digits_samples, tmp_path):
    loaded, _ = digits
    target = get_target("onnxruntime-tensorrt")
    compiled = target.compile(loaded.onnx_path, input_specs(loaded), "fp16", {}, tmp_path)
    model = onnx.load(str(compiled.model_file.path))
    weights = [i for i in model.graph.initializer if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert compiled.inputs[0].dtype == "float32" and compiled.outputs[0].dtype == "float32"
    assert compiled.model_file.path.stat().st_size < 0.6 * loaded.onnx_path.stat().st_size
    report = target.verify(compiled, digits_samples.inputs, reference(loaded, digits_samples), TOLERANCES["fp16"])
    assert report.passed, report.summary()
    assert 1e-6 < report.worst.max_abs_diff < 2e-2  # really computed in fp16, within the fp16 tolerance
    assert "no GPU" in report.checked  # honest about what was not exercised


def test_runtime_options_put_tensorrt_first_with_an_on_device_engine_cache(digits, tmp_path):
    loaded, _ = digits
    compiled = get_target("onnxruntime-tensorrt").compile(loaded.onnx_path, input_specs(loaded), "fp16", {}, tmp_path)
    assert compiled.execution_providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    trt = compiled.runtime_options["provider_options"]["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert "trt_engine_cache_path" not in trt  # the agent points it at its own data dir
    assert not any(f.name.endswith((".engine", ".plan", ".trt")) for f in compiled.files)  # never ship an engine


def test_int8_writes_a_calibration_table_and_enables_int8(digits, digits_samples, tmp_path):
    loaded, _ = digits
    compiled = get_target("onnxruntime-tensorrt").compile(
        loaded.onnx_path, input_specs(loaded), "int8", {"calibration_samples": list(digits_samples.inputs)}, tmp_path)
    table = next(f for f in compiled.files if f.role == "aux")
    assert table.name == "calibration.flatbuffers" and table.path.stat().st_size > 100
    trt = compiled.runtime_options["provider_options"]["TensorrtExecutionProvider"]
    assert trt["trt_int8_enable"] is True and trt["trt_int8_calibration_table_name"] == "calibration.flatbuffers"
    assert compiled.runtime_options["copy_to_engine_cache"] == ["calibration.flatbuffers"]
    report = get_target("onnxruntime-tensorrt").verify(compiled, digits_samples.inputs, reference(loaded, digits_samples),
                                                      TOLERANCES["fp32"])
    assert report.passed and "NOT simulated" in report.checked
    assert np.isfinite(report.worst.max_abs_diff)
