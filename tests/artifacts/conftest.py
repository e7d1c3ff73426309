"""Fixtures: signed artifacts packaged from small real ONNX files (no training needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.manifest import Target, TensorSpec


def make_onnx(path: Path, seed: int) -> Path:
    """A one-layer model whose weights depend on ``seed`` (distinct seeds -> distinct artifacts)."""
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def package(tmp: Path, seed: int, private_key, name: str = "m", version: str = "1") -> Path:
    from builder.artifacts.packaging import package_artifact

    tmp.mkdir(parents=True, exist_ok=True)
    model = make_onnx(tmp / f"model{seed}.onnx", seed)
    dest = tmp / f"artifact{seed}"
    package_artifact(dest, {"model.onnx": (model, "model")}, model_name=name, model_version=version,
                     target=Target("raspberry-pi-4", "onnxruntime", ("CPUExecutionProvider",), "fp32", "onnx"),
                     inputs=[TensorSpec("x", (1, 4), "float32")], outputs=[TensorSpec("y", (1, 3), "float32")],
                     private_key=private_key, metrics={"size_bytes": model.stat().st_size, "fidelity": {"min_cosine": 1.0}})
    return dest


@pytest.fixture()
def keys(tmp_path: Path):
    from builder.artifacts.signing import init_keys, load_private_key

    paths = init_keys(tmp_path / "home" / "keys")
    return paths, load_private_key(paths.private)
