"""Which tensors of an ONNX graph are weights, wherever the exporter put them.

Exporters store weights as initializers (PyTorch), as ``Constant`` nodes (Paddle's paddle2onnx), and
inside the subgraphs of ``If``/``Loop``/``Scan`` (a model whose branches are whole networks, such as
a voice-activity RNN with one branch per sample rate). Conventions:

* every initializer is a weight (its element count is a parameter), as before;
* a ``Constant`` is a weight when it holds a numeric tensor that is not a shape or index
  (int64/int32/bool): the int64 constants Paddle writes for Reshape targets and axes are not
  parameters, its float kernels (and float scalars, as scalar initializers would be) are. So a
  model counts the same whether its weights are initializers or Constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from builder.analysis.shapes import all_graphs, constant_array, dtype_bytes

# TensorProto data types that hold shapes, indices or masks rather than learned values.
NON_WEIGHT_DTYPES = frozenset({"int64", "int32", "bool", "object", "str"})


@dataclass(frozen=True)
class WeightTensor:
    name: str
    elements: int
    stored_bytes: int


def is_weight_constant(node: Any) -> bool:
    """A ``Constant`` node that holds a weight (see the module docstring)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return False
    array = constant_array(node)
    return array is not None and array.dtype.name not in NON_WEIGHT_DTYPES


def graph_weights(graph: Any) -> dict[str, WeightTensor]:
    """Weights defined directly in ``graph`` (not in its subgraphs): initializers and weight Constants."""
    from onnx import helper

    weights: dict[str, WeightTensor] = {}
    for init in graph.initializer:
        elements = element_count(init.dims)
        try:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type).name
        except (KeyError, TypeError, ValueError):
            dtype = "unknown"
        weights[init.name] = WeightTensor(init.name, elements, elements * dtype_bytes(dtype))
    for node in graph.node:
        if is_weight_constant(node):
            array = constant_array(node)
            weights[node.output[0]] = WeightTensor(node.output[0], int(array.size),
                                                   int(array.size) * dtype_bytes(array.dtype.name))
    return weights


def count_parameters(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of ``model``: every weight of the module docstring in the
    main graph and its subgraphs. The one definition of "parameters": ``analyze_model(...).params``
    and the compression report's ``params`` are both this total."""
    import numpy as np
    from onnx import numpy_helper

    total = nonzero = 0
    for graph in all_graphs(model.graph):
        arrays = [numpy_helper.to_array(init) for init in graph.initializer]
        arrays += [constant_array(node) for node in graph.node if is_weight_constant(node)]
        for array in arrays:
            total += int(array.size)
            nonzero += int(np.count_nonzero(array))
    return total, nonzero


def iter_all_weights(graph: Any) -> Iterator[WeightTensor]:
    """Weights of ``graph`` and of every subgraph below it."""
    for sub in all_graphs(graph):
        yield from graph_weights(sub).values()


def subgraph_weights(node: Any) -> list[WeightTensor]:
    """Weights held inside a node's subgraphs (an ``If``'s branches, a ``Loop``'s body)."""
    from onnx import AttributeProto

    found: list[WeightTensor] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
        for graph in graphs:
            found.extend(iter_all_weights(graph))
    return found


def integer_scalars(graph: Any) -> dict[str, int]:
    """One-element integer initializers and Constants of ``graph`` by name (a Loop's trip count)."""
    from onnx import numpy_helper

    found: dict[str, int] = {}
    arrays = [(init.name, numpy_helper.to_array(init)) for init in graph.initializer if element_count(init.dims) == 1]
    arrays += [(node.output[0], constant_array(node)) for node in graph.node
               if node.op_type == "Constant" and node.domain in ("", "ai.onnx")]
    for name, array in arrays:
        if array is not None and array.size == 1 and array.dtype.kind in "iu":
            found[name] = int(array.reshape(-1)[0])
    return found


def element_count(dims: Any) -> int:
    """Product of ``dims`` (1 for a scalar)."""
    count = 1
    for dim in dims:
        count *= int(dim)
    return count
