"""Small hand-built ONNX graphs for analysis tests."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def single_node_model(op: str, x_shape: list, weights: dict[str, np.ndarray], y_shape: list | None = None,
                      inputs: list[str] | None = None, **attrs):
    """A one-node graph ``y = op(x, *weights)`` with fp32 initializers; shapes left to inference."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    node = helper.make_node(op, inputs or ["x", *weights], ["y"], name=f"the_{op.lower()}", **attrs)
    inits = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    graph = helper.make_graph([node], "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
