"""Unsupported operators are found before conversion and named with the alternative."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builder.errors import UnsupportedOpError
from builder.targets import get_target
from builder.targets.pipeline import check_ops_or_raise


def _model(path: Path, op: str, domain: str = "") -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r"], ["y"], domain=domain)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets)
    onnx.save(model, str(path))
    return path


def test_custom_domain_op_blocks_every_runtime_by_name(tmp_path):
    path = _model(tmp_path / "m.onnx", "FancyAttention", "com.example")
    for runtime in ("onnxruntime", "onnxruntime-tensorrt", "litert"):
        with pytest.raises(UnsupportedOpError, match=r"com\.example::FancyAttention x1.*alternative"):
            check_ops_or_raise(get_target(runtime), path, "fp32")


def test_tensorrt_hands_contrib_ops_to_cuda_instead_of_failing(tmp_path):
    path = _model(tmp_path / "m.onnx", "FastGelu", "com.microsoft")
    fallbacks = check_ops_or_raise(get_target("onnxruntime-tensorrt"), path, "fp16")
    assert [op.op_type for op in fallbacks] == ["FastGelu"] and "CUDA" in fallbacks[0].alternative


def test_litert_refuses_ops_without_a_tflite_builtin_and_points_to_onnxruntime(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,jk->ik")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "e.onnx"))
    with pytest.raises(UnsupportedOpError, match="Einsum.*onnxruntime"):
        check_ops_or_raise(get_target("litert"), tmp_path / "e.onnx", "fp32")
    assert check_ops_or_raise(get_target("onnxruntime"), tmp_path / "e.onnx", "fp32") == []


def test_fp16_lists_ops_kept_in_float(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    k = helper.make_tensor("k", TensorProto.INT64, [1], np.array([3]))
    node = helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1)
    graph = helper.make_graph([node], "g", [x], [y], initializer=[k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "t.onnx"))
    kept = check_ops_or_raise(get_target("onnxruntime-tensorrt"), tmp_path / "t.onnx", "fp16")
    assert kept[0].op_type == "TopK" and "fp32" in kept[0].alternative
