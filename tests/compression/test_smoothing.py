"""smooth: exact in float, folds into LayerNorm when it can, and 'auto' picks alphas that cut the
simulated int8 error on an outlier channel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.execution.sessions import run_onnx
from builder.compression.smoothing import SmoothStep
from builder.loading.types import InputSpec


def layernorm_matmul_model(path: Path) -> Path:
    """x -> LayerNormalization (gamma with one 30x channel: an outlier) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    gamma = np.ones(16, np.float32)
    gamma[3] = 30.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "lnmm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run_smooth(tmp_path: Path, step: SmoothStep):
    batches = [{"x": np.random.default_rng(i).normal(size=(16, 16)).astype(np.float32)} for i in range(3)]
    source = layernorm_matmul_model(tmp_path / "lnmm.onnx")
    workdir = tmp_path / "work"
    workdir.mkdir()
    state, record = step.apply(ModelState((InputSpec("x", (1, 16)),), ("y",), onnx_path=source),
                               StepContext(workdir=workdir, calibration_batches=lambda: iter(batches)))
    return source, state, record, batches


def test_smoothing_folds_into_layernorm_and_is_exact(tmp_path: Path) -> None:
    source, state, record, batches = run_smooth(tmp_path, SmoothStep(alpha=0.8))
    assert record.facts["smoothed"][0]["folded_into"] == "layernorm"
    ops = [node.op_type for node in onnx.load(str(state.onnx_path)).graph.node]
    assert ops == ["LayerNormalization", "MatMul"]  # no extra Mul: the scales live in gamma and beta
    np.testing.assert_allclose(run_onnx(state.onnx_path, batches), run_onnx(source, batches), rtol=1e-4, atol=1e-4)
    gamma = numpy_helper.to_array(next(i for i in onnx.load(str(state.onnx_path)).graph.initializer
                                       if i.name.startswith("gamma")))
    assert gamma.max() / np.median(gamma) < 30.0 / 2  # the outlier channel was tamed


def test_auto_alpha_reduces_simulated_int8_error(tmp_path: Path) -> None:
    _, _, record, _ = run_smooth(tmp_path, SmoothStep(alpha="auto"))
    choice = next(iter(record.facts["simulated_error"].values()))
    assert choice["alpha"] is not None and choice["error"] < choice["error_unsmoothed"]
