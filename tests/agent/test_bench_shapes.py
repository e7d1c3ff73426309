"""`agent bench` on a model with dynamic dims: never times them silently as 1; --input-shape and
--sample give the shape, and the shape timed is printed. LiteRT's default threads follow ORT's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]


def _detector_like(path: Path) -> Path:
    """Conv over a 1x3xHxW image with H and W dynamic (like a text detector) plus a 0-d int64 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["y", "sr_f"], ["out"])],
        "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"]),
                helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, "H", "W"])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "bench", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_bench_refuses_to_time_dynamic_dims_as_one(tmp_path):
    model = _detector_like(tmp_path / "det.onnx")
    out = _bench(str(model), "--runs", "2", "--warmup", "0")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "dynamic dims (1x3xHxW)" in out.stderr and "--input-shape x=1x3xNxN" in out.stderr, out.stderr


def test_bench_input_shape_and_sample_give_the_shape_it_prints(tmp_path):
    model = _detector_like(tmp_path / "det.onnx")
    out = _bench(str(model), "--input-shape", "x=1x3x64x96", "--input-shape", "sr=scalar:int64", "--runs", "2",
                 "--warmup", "0", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["inputs"] == {"x": [1, 3, 64, 96], "sr": []}
    np.savez(tmp_path / "sample.npz", x=np.ones((1, 3, 40, 24), np.float32), sr=np.array(16000, np.int64))
    # the existing --model option keeps working beside the positional form
    out = _bench("--model", str(model), "--sample", str(tmp_path / "sample.npz"), "--runs", "2", "--warmup", "0")
    assert out.returncode == 0, out.stderr
    assert "timed inputs: x 1x3x40x24 float32, sr scalar int64" in out.stdout
    out = _bench(str(model), "--input-shape", "x=1x4x64x64", "--runs", "1")
    assert out.returncode != 0 and "expects 1x3xHxW" in out.stderr


def test_resolve_feeds_defaults_only_a_dynamic_batch_axis():
    from agent.bench_feeds import resolve_feeds
    from agent.errors import AgentError
    from agent.runtime.base import TensorInfo

    feeds = resolve_feeds((TensorInfo("ids", ("batch", 16), "int64"),))
    assert feeds["ids"].shape == (1, 16) and feeds["ids"].dtype == np.int64
    with pytest.raises(AgentError, match="seq"):
        resolve_feeds((TensorInfo("ids", ("batch", "seq"), "int64"),))
    with pytest.raises(AgentError, match="name each"):
        resolve_feeds((TensorInfo("a", (1, 2), "float32"), TensorInfo("b", (1, 2), "float32")),
                      shapes={None: ((1, 2), None)})


def test_litert_default_threads_follow_onnxruntime():
    import psutil

    from agent.runtime.litert import default_threads

    assert default_threads() == (psutil.cpu_count(logical=False) or psutil.cpu_count())
