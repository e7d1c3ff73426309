"""Concrete shape and dtype of every tensor in a graph, for given input shapes.

ONNX shape inference (``data_prop=True``) runs on a copy of the graph whose inputs carry the concrete
dims. On PyTorch exports with dynamic axes it leaves some tensors symbolic (Reshape targets computed
from ``Shape`` ops); those few are then measured by running the copy once in ONNX Runtime on
placeholder inputs (ones) with the missing tensors exposed as outputs. If that run is impossible
(e.g. an fp16 op the CPU build lacks) the tensors stay unknown and are listed as unresolved.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...] | None  # None when unknown
    dtype: str  # numpy dtype name ("float32", "int8", ...); "unknown" when not inferred

    @property
    def elements(self) -> int:
        if self.shape is None:
            return 0
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.elements * dtype_bytes(self.dtype)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element; 4 for unknown (the fp32 assumption)."""
    import numpy as np

    if dtype in ("unknown", ""):
        return 4
    if dtype == "bfloat16":
        return 2
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 4


def _np_name(elem_type: int) -> str:
    from onnx import helper

    if not elem_type:
        return "unknown"
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return "unknown"


def _value_info(value: Any) -> TensorInfo:
    tensor_type = value.type.tensor_type
    dtype = _np_name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return TensorInfo(None, dtype)
    dims = []
    for dim in tensor_type.shape.dim:
        # -1 (written by some exporters for "unknown") is no size: resolved by measuring instead.
        if not dim.HasField("dim_value") or dim.dim_value < 0:
            return TensorInfo(None, dtype)
        dims.append(int(dim.dim_value))
    return TensorInfo(tuple(dims), dtype)


def all_graphs(graph: Any) -> list[Any]:
    """``graph`` and every subgraph below it (If branches, Loop/Scan bodies), outermost first."""
    from onnx import AttributeProto

    graphs = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                graphs.extend(all_graphs(attr.g))
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    graphs.extend(all_graphs(sub))
    return graphs


def constant_array(node: Any) -> Any:
    """The tensor a ``Constant`` node holds as a numpy array (``value``, ``value_float(s)``,
    ``value_int(s)``); None for sparse or string constants."""
    import numpy as np
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


def with_concrete_inputs(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> Any:
    """A copy of ``model`` whose graph inputs have the given concrete dims (other inputs unchanged)."""
    fixed = copy.deepcopy(model)
    for value in fixed.graph.input:
        if value.name not in input_shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = list(input_shapes[value.name])
        while len(dims) > 0:
            dims.pop()
        for size in shape:
            dims.add().dim_value = int(size)
    return fixed


def infer_tensor_infos(model: Any, input_shapes: Mapping[str, Sequence[int]],
                       measure_missing: bool = True,
                       input_values: Mapping[str, Any] | None = None) -> tuple[dict[str, TensorInfo], Any]:
    """``({tensor name: TensorInfo}, inferred model)`` for every tensor of the main graph and its
    subgraphs. ``input_values`` (given arrays by input name) feed the measuring run; other inputs get
    placeholders."""
    import onnx

    fixed = with_concrete_inputs(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors on exotic graphs: keep what we have
        log.warning("ONNX shape inference failed (%s); measuring shapes instead", exc)
        inferred = fixed
    infos: dict[str, TensorInfo] = {}
    for init in inferred.graph.initializer:
        infos[init.name] = TensorInfo(tuple(int(d) for d in init.dims), _np_name(init.data_type))
    for graph in all_graphs(inferred.graph):  # subgraphs of If/Loop/Scan too (their names are their own)
        for init in graph.initializer:
            infos.setdefault(init.name, TensorInfo(tuple(int(d) for d in init.dims), _np_name(init.data_type)))
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            info = _value_info(value)
            if value.name not in infos or infos[value.name].shape is None:
                infos[value.name] = info
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                array = constant_array(node)
                if array is not None:
                    infos[node.output[0]] = TensorInfo(tuple(array.shape), array.dtype.name)
    missing = [out for node in inferred.graph.node for out in node.output
               if out and (out not in infos or infos[out].shape is None)]
    if missing and measure_missing:
        infos.update(_measure(fixed, missing, input_shapes, infos, input_values or {}))
    return infos, inferred


def _measure(model: Any, names: list[str], input_shapes: Mapping[str, Sequence[int]],
             known: Mapping[str, TensorInfo], input_values: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """Run the graph once in ONNX Runtime to read the shapes inference could not give."""
    import numpy as np

    from builder.execution.sessions import session_with_outputs

    feeds = {}
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        info = _value_info(value)
        shape = tuple(input_shapes.get(value.name, info.shape or ()))
        dtype = info.dtype if info.dtype != "unknown" else "float32"
        given = input_values.get(value.name)
        feeds[value.name] = (np.asarray(given, dtype=np.dtype(dtype)) if given is not None
                             else np.ones(shape, dtype=np.dtype(dtype)))
    try:  # log severity 4: failures are logged below as one warning
        session = session_with_outputs(model, names, threads=1, log_severity=4)
        outputs = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's pybind types; ValueError for protos over 2 GB
        log.warning("could not measure %d tensor shapes with ONNX Runtime (%s); they count as unknown",
                    len(names), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}
    return {name: TensorInfo(tuple(int(d) for d in np.asarray(value).shape), np.asarray(value).dtype.name)
            for name, value in zip(names, outputs)}
