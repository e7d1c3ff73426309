"""Bad input to `builder analyze` gives one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

BUILDER = str(Path(sys.executable).with_name("builder"))

USER_MODULE = '''
import torch

def not_a_model():
    return 42

def linear():
    return torch.nn.Linear(4, 2)

def explodes():
    raise RuntimeError("weights missing")
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "userfactories.py").write_text(USER_MODULE)
    (root / "notes.onnx").write_text("not a model\n")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    opset = [helper.make_opsetid("", 17)]
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=opset), root / "relu.onnx")
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["ghost"], ["y"])], "g", [x], [y]),
                                opset_imports=opset), root / "dangling.onnx")
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Warp", ["x"], ["y"], name="w")], "g", [x], [y]),
                                opset_imports=opset), root / "custom.onnx")
    dynamic = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [dynamic],
                                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])]),
                                opset_imports=opset), root / "dynamic.onnx")
    return root


CASES = [
    (["missing.onnx"], "missing.onnx not found"),
    (["notes.onnx"], "not an ONNX model"),
    (["dangling.onnx"], "not a valid ONNX model"),
    (["custom.onnx"], "operator 'Warp' (node 'w')"),
    (["dynamic.onnx"], "dynamic dims"),
    (["relu.onnx", "--input-shape", "1x4x4"], "expects 2"),
    (["relu.onnx", "--input-shape", "1xx4"], "cannot read dims"),
    (["relu.onnx", "--profile", "pi-9"], "unknown device profile 'pi-9'"),
    (["no_such_pkg.models:make", "--input-shape", "1x4"], "cannot import module 'no_such_pkg.models'"),
    (["userfactories:nothing", "--input-shape", "1x4"], "has no attribute 'nothing'"),
    (["userfactories:not_a_model", "--input-shape", "1x4"], "returned int, not a torch.nn.Module"),
    (["userfactories:explodes", "--input-shape", "1x4"], "raised RuntimeError: weights missing"),
    (["userfactories:linear"], "needs --input-shape"),
    (["userfactories:linear", "--input-shape", "1x5"], "check --input-shape"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1] for c in CASES])
def test_analyze_bad_input_is_one_line(workdir, args, message):
    result = subprocess.run([BUILDER, "analyze", *args], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("builder: error: ") and message in lines[0]
    assert result.stdout == ""
