"""ONNX models whose batch axis is a number (x: [1, 4]): evaluation and calibration feed exactly that
many samples per run instead of crashing in ONNX Runtime on 32-wide batches, and a feed ORT still
rejects is a one-line DataError naming the input and both shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.data import DataSource
from builder.compression.engine import run_recipe
from builder.compression.evaluate import EvalConfig
from builder.execution.sessions import make_session, rebatch, run_onnx, static_batch
from builder.compression.recipe import Recipe, StepSpec
from builder.errors import DataError
from builder.loading.types import InputSpec, LoadedModel
from tests.support.cli import run_builder

FAST = EvalConfig(warmup_runs=2, timed_runs=5)


def _mlp(path: Path, batch: int, width: int, classes: int = 10) -> tuple[Path, np.ndarray, np.ndarray]:
    """x: [batch, width] -> MatMul -> Relu -> MatMul -> y: [batch, classes], batch fixed in the graph."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w2 = (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, w1, w2


def _expected(x: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w1, 0) @ w2


def test_fixed_batch_graph_is_run_that_many_samples_at_a_time(tmp_path: Path) -> None:
    path, w1, w2 = _mlp(tmp_path / "b2.onnx", batch=2, width=8)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)  # 5 = 2 + 2 + 1 (padded)
    session = make_session(path)
    assert static_batch(session) == 2
    out = run_onnx(path, DataSource({"x": x}, None, "t").batches(32), session=session)
    assert out.shape == (5, 10)
    np.testing.assert_allclose(out, _expected(x, w1, w2), rtol=1e-4, atol=1e-5)
    # Re-batching keeps the order and says how many rows of the padded last feed are real.
    feeds = list(rebatch(DataSource({"x": x}, None, "t").batches(3), 2))
    assert [real for _, real in feeds] == [2, 2, 1] and all(f["x"].shape == (2, 8) for f, _ in feeds)
    np.testing.assert_array_equal(np.concatenate([f["x"][:r] for f, r in feeds]), x)


def test_wrong_sample_shape_is_a_one_line_data_error(tmp_path: Path) -> None:
    path, _, _ = _mlp(tmp_path / "b1.onnx", batch=1, width=4)
    with pytest.raises(DataError) as info:
        run_onnx(path, [{"x": np.zeros((1, 5), np.float32)}])
    message = str(info.value)
    assert "'x'" in message and "[1, 4]" in message and "[1, 5]" in message and "\n" not in message


def test_engine_evaluates_and_calibrates_a_batch_1_model(tmp_path: Path) -> None:
    path, w1, w2 = _mlp(tmp_path / "b1.onnx", batch=1, width=16)
    spec = InputSpec("x", (1, 16), "float32", {})
    model = LoadedModel(name="fixed", source=str(path), source_kind="onnx", onnx_path=path, inputs=(spec,),
                        output_names=("y",))
    x = np.random.default_rng(2).standard_normal((40, 16)).astype(np.float32)  # > the 32-wide eval batches
    data = DataSource({"x": x}, None, "test")
    recipe = Recipe((StepSpec("quantize", {"mode": "static", "check_latency": False}),))
    out = tmp_path / "out"
    result = run_recipe(model, recipe, data=data, train_data=None, out_dir=out, eval_config=FAST)
    report = json.loads(result.report_path.read_text())
    assert report["baseline"]["evaluation"]["samples"] == 40
    assert report["steps"][0]["facts"]["mode"] == "static"  # calibrated on 1-sample batches
    assert result.final.fidelity.cosine_mean > 0.95
    got, want = run_onnx(result.model_path, data.batches(32)), _expected(x, w1, w2)
    assert got.shape == want.shape == (40, 10)
    assert float((got.argmax(1) == want.argmax(1)).mean()) >= 0.9


@pytest.mark.slow
def test_builder_build_for_the_pi_on_a_fixed_batch_onnx_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """The reported repro: `builder build model.onnx -p raspberry-pi-4` (int8 from the profile) on
    x: [1, N]. Wide enough that int8 really is faster, so the quantize step's own latency trap passes."""
    path, _, _ = _mlp(tmp_path / "model.onnx", batch=1, width=1024)
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def builder(*args: str) -> tuple[int, str, str]:
        return run_builder(monkeypatch, capsys, *args)

    assert builder("keys", "init")[0] == 0
    code, stdout, stderr = builder("build", str(path), "-p", "raspberry-pi-4")
    assert code == 0, stderr
    assert "Traceback" not in stderr and "artifact id" in stdout + stderr
