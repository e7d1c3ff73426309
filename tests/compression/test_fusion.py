"""fold removes BatchNorm without changing outputs; optimize_graph stays portable and exact."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.compression.fusion import FoldStep, OptimizeGraphStep, non_portable_ops
from builder.errors import UsageError
from builder.loading.types import InputSpec


def conv_bn_model(path: Path) -> Path:
    """Conv -> BN -> Relu -> Conv(no bias) -> BN, with non-trivial BN statistics."""
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array.astype(np.float32), name)

    inits = [
        init("w1", rng.normal(size=(8, 1, 3, 3))), init("b1", rng.normal(size=8)),
        init("g1", rng.uniform(0.5, 2, 8)), init("be1", rng.normal(size=8)),
        init("m1", rng.normal(size=8)), init("v1", rng.uniform(0.5, 2, 8)),
        init("w2", rng.normal(size=(4, 8, 3, 3))),
        init("g2", rng.uniform(0.5, 2, 4)), init("be2", rng.normal(size=4)),
        init("m2", rng.normal(size=4)), init("v2", rng.uniform(0.5, 2, 4)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], epsilon=1e-3, name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["y"], name="bn2"),
    ]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def state(tmp_path: Path) -> ModelState:
    path = conv_bn_model(tmp_path / "convbn.onnx")
    return ModelState(inputs=(InputSpec("x", (1, 1, 8, 8)),), output_names=("y",), onnx_path=path)


def ctx_for(tmp_path: Path, name: str) -> StepContext:
    workdir = tmp_path / name
    workdir.mkdir()
    return StepContext(workdir=workdir)


def test_fold_removes_batchnorm_and_keeps_outputs(state: ModelState, tmp_path: Path) -> None:
    new_state, record = FoldStep().apply(state, ctx_for(tmp_path, "fold"))
    ops = [node.op_type for node in onnx.load(str(new_state.onnx_path)).graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2
    assert record.facts["batchnorm_folded"] == 2
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(new_state.onnx_path, x), run(state.onnx_path, x), rtol=1e-5, atol=1e-5)


def test_optimize_graph_extended_is_portable_and_exact(state: ModelState, tmp_path: Path) -> None:
    new_state, record = OptimizeGraphStep(level="extended").apply(state, ctx_for(tmp_path, "opt"))
    model = onnx.load(str(new_state.onnx_path))
    assert non_portable_ops(model) == []
    assert "BatchNormalization" not in [node.op_type for node in model.graph.node]
    x = np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(new_state.onnx_path, x), run(state.onnx_path, x), rtol=1e-5, atol=1e-5)


def test_optimize_graph_refuses_the_non_portable_level() -> None:
    with pytest.raises(UsageError, match="not portable"):
        OptimizeGraphStep(level="all")


def test_portability_check_spots_nchwc_ops(state: ModelState, tmp_path: Path) -> None:
    """What ORT_ENABLE_ALL writes on x86 (NCHWc Conv) is what the check must catch."""
    out = tmp_path / "all.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(state.onnx_path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out))
    if not any(node.domain == "com.microsoft.nchwc" for node in model.graph.node):
        pytest.skip("this CPU's ORT build writes no NCHWc ops")
    assert non_portable_ops(model)
