"""One definition of "parameters" and one MAC counter: ``builder analyze`` and the compression
report (``compression.evaluate``) give the same numbers, including for the tensors the two used to
count differently (an int64 initializer, a float scalar, a weight stored as a Constant)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.analysis import analyze_onnx
from builder.analysis.weights import count_parameters
from builder.compression.evaluate import EvalConfig, baseline_evaluation, synthetic_data
from builder.loading.types import InputSpec


def _model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, :4] = 0.0  # 32 zeros
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["hs"]),
        helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2c")),
        helper.make_node("MatMul", ["hs", "W2"], ["y0"]),
        helper.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.float32(0.5), "scale"),
             numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_analyze_and_the_compression_report_agree(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _model(path)
    inputs = (InputSpec("x", (1, 8)),)
    stats = analyze_onnx(path, {"x": (1, 8)})
    evaluation, _ = baseline_evaluation(path, synthetic_data(inputs, samples=4), inputs,
                                        EvalConfig(warmup_runs=1, timed_runs=2))
    # W1 128 + scale 1 + shape 2 + Constant W2 64: every weight counts (weights.py's definition)
    assert stats.params == evaluation.params == 128 + 1 + 2 + 64
    assert evaluation.nonzero_params == stats.params - 32
    assert count_parameters(onnx.load(str(path))) == (195, 163)
    assert stats.macs == evaluation.macs == 8 * 16 + 16 * 4
