"""Inputs of any shape: dims from --data, 0-d inputs, inputs batched on axis 1 (an RNN state), and
builds without data that fail in one line instead of an ONNX Runtime traceback."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.compression.data import DataSource, load_model_with_data
from builder.errors import DataError, UsageError


def _stateful(path: Path, named_batch: bool = True) -> Path:
    """input [B, 8], state [2, B, 4] (batched on axis 1), sr [] int64 -> out [B, 4], stateN [2, B, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    batch = "batch" if named_batch else None
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["input", "w"], ["h"]),
             helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["sr_f", "k"], ["scale"]),
             helper.make_node("Mul", ["h", "scale"], ["hs"]),
             helper.make_node("Add", ["state", "hs"], ["stateN"]),
             helper.make_node("ReduceSum", ["stateN"], ["out"], axes=[0], keepdims=0)]
    graph = helper.make_graph(
        nodes, "rnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, batch, 4])],
        [w, numpy_helper.from_array(np.array(16000.0, np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def _image_model(path: Path) -> Path:
    """A conv with dynamic H and W, like a text detector."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
                               helper.make_node("Sigmoid", ["y"], ["p"])], "det",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 2, "h", "w"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _vad_arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {"input": rng.standard_normal((n, 8)).astype(np.float32),
            "state": rng.standard_normal((2, n, 4)).astype(np.float32), "sr": np.array(16000, np.int64)}


def test_zero_d_input_and_state_on_axis_1_come_in_from_an_npz(tmp_path):
    from builder.execution.sessions import run_onnx

    model = _stateful(tmp_path / "rnn.onnx")
    np.savez(tmp_path / "d.npz", **_vad_arrays(10))
    loaded = load_model_with_data(str(model), None, str(tmp_path / "d.npz"))
    axes = {s.name: s.batch_axis for s in loaded.inputs}
    assert axes == {"input": 0, "state": 1, "sr": None}  # state's axis 1 holds the batch symbol
    source = DataSource.from_arg(str(tmp_path / "d.npz"), loaded.inputs)
    assert len(source) == 10
    first, = source.per_sample(1)
    assert first["state"].shape == (2, 1, 4) and first["sr"].shape == ()
    batches = list(source.batches(4))
    assert [b["state"].shape[1] for b in batches] == [4, 4, 2]
    out = run_onnx(model, source.batches(4), axes=source.batch_axes)
    import onnxruntime as ort

    whole = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["out"], _vad_arrays(10))[0]
    np.testing.assert_allclose(out, whole, rtol=1e-6)  # batches cut on axis 1 of state, sr shared


def test_unnamed_dims_need_a_declared_batch_axis(tmp_path):
    model = _stateful(tmp_path / "rnn.onnx", named_batch=False)
    arrays = _vad_arrays(6)
    np.savez(tmp_path / "plain.npz", **arrays)
    with pytest.raises(DataError, match="--batch-axis state=AXIS"):
        loaded = load_model_with_data(str(model), None, str(tmp_path / "plain.npz"))
        DataSource.from_arg(str(tmp_path / "plain.npz"), loaded.inputs)
    loaded = load_model_with_data(str(model), None, str(tmp_path / "plain.npz"), batch_axes={"state": 1})
    assert len(DataSource.from_arg(str(tmp_path / "plain.npz"), loaded.inputs)) == 6
    # the same declared inside the .npz; sr given as 6 equal values is that one value
    declared = dict(arrays, sr=np.full(6, 16000, np.int64), __batch_axes__=np.array(json.dumps({"state": 1, "sr": None})))
    np.savez(tmp_path / "declared.npz", **declared)
    loaded = load_model_with_data(str(model), None, str(tmp_path / "declared.npz"))
    source = DataSource.from_arg(str(tmp_path / "declared.npz"), loaded.inputs)
    assert source.inputs["sr"].shape == () and source.batch_axes["state"] == 1
    np.savez(tmp_path / "mixed.npz", **dict(declared, sr=np.arange(6, dtype=np.int64)))
    with pytest.raises(DataError, match="one value for all samples"):
        DataSource.from_arg(str(tmp_path / "mixed.npz"), loaded.inputs)


def test_scalar_in_input_shape():
    from builder.loading import parse_input_shapes
    from builder.loading.input_shapes import parse_batch_axes

    (sr,) = parse_input_shapes("sr=scalar:int64")
    assert sr.shape == () and sr.dtype == "int64" and sr.batch_axis is None
    assert parse_batch_axes(["state=1", "sr=none"]) == {"state": 1, "sr": None}
    with pytest.raises(UsageError):
        parse_batch_axes(["state"])


def test_dynamic_dims_come_from_the_data_without_input_shape(tmp_path):
    model = _image_model(tmp_path / "det.onnx")
    with pytest.raises(UsageError, match="--input-shape x=1x3xNxN or pass --data"):
        load_model_with_data(str(model), None, None)
    np.savez(tmp_path / "imgs.npz", x=np.random.default_rng(3).random((5, 3, 40, 56)).astype(np.float32))
    loaded = load_model_with_data(str(model), None, str(tmp_path / "imgs.npz"))
    assert loaded.inputs[0].shape == (1, 3, 40, 56)


def test_build_without_data_fails_in_one_line_when_the_model_rejects_generated_inputs(tmp_path):
    """A Gather indexed by an int64 input: generated token-like ids fall outside the table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from builder.artifacts.signing import init_keys
    from builder.targets.profile_build import build_for_profile

    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["emb"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 3, 4])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "g.onnx"))
    init_keys(tmp_path / "home" / "keys")
    with pytest.raises(DataError) as info:
        build_for_profile(str(tmp_path / "g.onnx"), "x86-64-host", registry_dir=tmp_path / "home", precision="fp32")
    message = str(info.value)
    assert "\n" not in message and "ids 1x3 int64" in message and "pass --data" in message
