"""The analysis reads int8 (QDQ and QOperator) and fp16 models: same MACs, int8/fp16 precision,
quantized initializers counted, smaller weights, faster as-built estimate."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from builder.analysis import analyze_onnx, estimate_latency
from builder.loading import load_model
from builder.profiles import load_profiles

SHAPE = {"input": (1, 1, 8, 8)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from builder.zoo.digits_cnn import load_digits_split

    root = tmp_path_factory.mktemp("quant")
    fp32 = load_model("builder.zoo.digits_cnn:untrained", "1x1x8x8", workdir=root).onnx_path
    samples = load_digits_split().x_test[:16]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": samples[i:i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32), str(root / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(fp32), str(root / "dynamic.onnx"), weight_type=QuantType.QUInt8)
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False), str(root / "fp16.onnx"))
    return {"fp32": fp32, "qdq": root / "qdq.onnx", "dynamic": root / "dynamic.onnx", "fp16": root / "fp16.onnx"}


def _initializer_elements(path: Path) -> int:
    return sum(numpy_helper.to_array(i).size for i in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize("kind, precision", [("qdq", "int8"), ("dynamic", "int8"), ("fp16", "fp16")])
def test_compressed_models_keep_macs_and_report_precision(models, kind, precision):
    base = analyze_onnx(models["fp32"], SHAPE)
    stats = analyze_onnx(models[kind], SHAPE)
    assert stats.macs == base.macs
    assert stats.params == _initializer_elements(models[kind])
    assert stats.params >= base.params  # quantized weights plus their scales / zero points
    assert stats.weight_bytes < 0.6 * base.weight_bytes
    assert stats.macs_by_precision.get(precision, 0) >= 0.99 * base.macs
    convs = [layer for layer in stats.layers if layer.macs and "Conv" in layer.op_type]
    assert len(convs) == 3 and all(layer.precision == precision for layer in convs)
    assert all(layer.params > 0 for layer in convs)  # weights reached through DequantizeLinear / Cast


def test_int8_as_built_is_estimated_faster_than_fp32(models):
    pi4 = load_profiles()["raspberry-pi-4"]
    fp32 = estimate_latency(analyze_onnx(models["fp32"], SHAPE), pi4)
    qdq = estimate_latency(analyze_onnx(models["qdq"], SHAPE), pi4)
    assert qdq.latency_ms < fp32.latency_ms
    assert qdq.weight_bytes < fp32.weight_bytes


def test_what_if_at_the_built_precision_equals_as_built(models):
    """An fp16 graph asked "what if fp16" is not shrunk a second time."""
    orin = load_profiles()["jetson-orin-nano"]
    stats = analyze_onnx(models["fp16"], SHAPE)
    assert stats.dominant_precision == "fp16"
    as_built, what_if = estimate_latency(stats, orin), estimate_latency(stats, orin, "fp16")
    assert what_if.latency_ms == pytest.approx(as_built.latency_ms)
    assert what_if.memory_needed_bytes == as_built.memory_needed_bytes
