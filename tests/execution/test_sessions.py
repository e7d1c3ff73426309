"""builder/execution: the one place host ORT sessions are made and latency is measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.errors import CompressionError, DataError
from builder.execution.sessions import (make_session, open_session, rebatch, run_onnx, run_session, session_options,
                                        session_with_outputs, static_batch, with_outputs)
from builder.execution.timing import measure_interleaved, median_run_ms, round_paired_ratio


def _model(batch: int | str = "N") -> onnx.ModelProto:
    """y = relu(x @ W + b) with the intermediate tensors h and z."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
                              initializer=[numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
                                           numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_options_follow_the_conventions() -> None:
    import onnxruntime as ort

    options = session_options(threads=2, level="basic", log_severity=4, optimized_path=Path("/tmp/x.onnx"))
    assert (options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level) == (2, 1, 4)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.optimized_model_filepath == "/tmp/x.onnx"
    assert session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # ORT's default
    with pytest.raises(KeyError):
        session_options(level="everything")


def test_a_session_from_a_path_bytes_or_proto_computes_the_same(tmp_path: Path) -> None:
    model = _model()
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.ones((2, 4), np.float32)
    results = [open_session(source).run(None, {"x": x})[0]
               for source in (tmp_path / "m.onnx", str(tmp_path / "m.onnx"), model.SerializeToString(), model)]
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])
    open_session(tmp_path / "m.onnx", level="extended", optimized_path=tmp_path / "opt.onnx")
    assert onnx.load(str(tmp_path / "opt.onnx")).graph.node
    with pytest.raises(CompressionError, match="cannot load"):
        make_session(tmp_path / "missing.onnx")


def test_intermediate_outputs_come_after_the_models_own_and_leave_the_model_unchanged() -> None:
    model = _model()
    before = model.SerializeToString()
    session = session_with_outputs(model, ["h", "z", "y", ""])
    assert [o.name for o in session.get_outputs()] == ["y", "h", "z"]
    assert model.SerializeToString() == before
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    y, h, z = session.run(None, {"x": x})
    np.testing.assert_allclose(np.maximum(z, 0), y, rtol=1e-6)
    np.testing.assert_allclose(h, x @ numpy_helper.to_array(model.graph.initializer[0]), rtol=1e-5)
    assert [o.name for o in onnx.ModelProto.FromString(with_outputs(model, ["h"])).graph.output] == ["y", "h"]


def test_a_fixed_batch_graph_is_fed_its_batch_size_and_bad_feeds_are_one_line(tmp_path: Path) -> None:
    onnx.save(_model(batch=2), str(tmp_path / "fixed.onnx"))
    session = make_session(tmp_path / "fixed.onnx")
    assert static_batch(session) == 2
    batches = [{"x": np.ones((3, 4), np.float32)}, {"x": np.zeros((2, 4), np.float32)}]
    assert [real for _, real in rebatch(batches, 2)] == [2, 2, 1]
    assert run_onnx(tmp_path / "fixed.onnx", batches).shape == (5, 3)
    with pytest.raises(DataError, match=r"model input 'x' expects shape \[2, 4\], got \[2, 5\]"):
        run_session(session, {"x": np.ones((2, 5), np.float32)})


def test_timing_helpers() -> None:
    calls = []
    assert median_run_ms(lambda: calls.append(1), runs=5, warmup=2) >= 0.0 and len(calls) == 7
    session = open_session(_model())
    (p50, p95), (q50, q95) = measure_interleaved([session, session], {"x": np.ones((1, 4), np.float32)}, 1, 5)
    assert 0 < p50 <= p95 and 0 < q50 <= q95
    # per-round medians, then the median over rounds: one slow round does not decide the ratio
    times = [[[1.0, 1.0], [1.0], [1.0]], [[2.0], [2.0, 2.0], [50.0]]]
    assert round_paired_ratio(times, 1, 0) == 2.0
