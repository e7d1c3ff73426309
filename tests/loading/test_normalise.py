"""Every ONNX file is normalised at load (weight Constants -> initializers, opset >= 13, shape
inference) and the result is checked against the original in ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder.loading import load_model
from builder.loading.normalise import _apply, _run, constants_to_initializers, sample_feeds
from tests.analysis.test_any_graph_analysis import constant_weight_conv, if_lstm_model


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture()
def paddle_like(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    model, weights = constant_weight_conv(opset=11)
    path = tmp_path / "paddle_like.onnx"
    onnx.save(model, path)
    return path, weights


def test_constant_weights_become_initializers_and_opset_reaches_13(paddle_like, tmp_path: Path) -> None:
    path, weights = paddle_like
    loaded = load_model(path, "2x3x8x8", workdir=tmp_path / "work")
    record = loaded.normalisation
    assert (record.opset_from, record.opset_to, loaded.opset) == (11, 13, 13)
    assert record.constants_to_initializers == 2 and record.checked and not record.skipped
    assert loaded.onnx_path.parent == tmp_path / "work" and loaded.onnx_path != path
    normalised = onnx.load(str(loaded.onnx_path))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in normalised.graph.initializer}
    assert set(initializers) == set(weights)
    np.testing.assert_array_equal(initializers["W"], weights["W"])
    assert [n.op_type for n in normalised.graph.node if n.op_type == "Constant"] == ["Constant"]  # the int64 shape
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_session(loaded.onnx_path).run(None, {"x": x})[0], _session(path).run(None, {"x": x})[0],
                               rtol=0, atol=1e-6)
    assert "opset 11->13" in record.summary() and "2 weight Constants" in record.summary()


def test_normalised_opset_11_model_quantizes_per_channel_and_loads(paddle_like, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    path, _ = paddle_like
    loaded = load_model(path, "2x3x8x8", workdir=tmp_path / "work")
    rng = np.random.default_rng(0)
    batches = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

    class Reader:
        def get_next(self):
            return next(batches, None)

    static = tmp_path / "static.onnx"
    quantize_static(str(loaded.onnx_path), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert _session(static).run(None, {"x": x})[0].shape == (1, 4 * 8 * 8)
    dequant_axes = [a for n in onnx.load(str(static)).graph.node if n.op_type == "DequantizeLinear"
                    for a in n.attribute if a.name == "axis"]
    assert dequant_axes  # per-channel really happened
    dynamic = tmp_path / "dynamic.onnx"  # failed on the raw file: "Expected W to be an initializer"
    quantize_dynamic(str(loaded.onnx_path), str(dynamic), per_channel=True)
    assert _session(dynamic).run(None, {"x": x})[0].shape == (1, 4 * 8 * 8)


def test_a_step_that_changes_the_outputs_is_skipped_and_named(paddle_like) -> None:
    path, _ = paddle_like
    original = onnx.load(str(path))
    feeds = sample_feeds(load_model(path, "2x3x8x8").inputs, {})
    reference, _ = _run(original, feeds)

    def corrupt(model):
        broken, _ = constants_to_initializers(model)
        for init in broken.graph.initializer:
            if init.name == "W":
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.5, "W"))
        return broken

    model, _, failures = _apply(original, [("constants", lambda m: constants_to_initializers(m)[0]),
                                           ("corrupt", corrupt)], reference, feeds, check_each=True)
    assert len(failures) == 1 and failures[0].startswith("corrupt: changed the outputs")
    assert {init.name for init in model.graph.initializer} == {"W", "B"}
    np.testing.assert_array_equal(_run(model, feeds)[0][0], reference[0])


def test_given_input_values_let_a_branching_model_be_checked(tmp_path: Path) -> None:
    model, _, _ = if_lstm_model()
    path = tmp_path / "vad_like.onnx"
    onnx.save(model, path)
    loaded = load_model(path, "x=5x1x4", workdir=tmp_path / "work", input_values={"sr": np.array(16000)})
    assert loaded.normalisation.checked
    assert loaded.normalisation.constants_to_initializers == 6  # W, R, B of both branches, inside the Ifs
    assert [s.shape for s in loaded.inputs] == [(5, 1, 4), ()]
