"""Independent counts of parameters, weight bytes and MACs, to check ``builder analyze`` against.

Independent means: none of ``builder.analysis`` is used. Weights are every float or 8-bit tensor
held in the file, as initializers or ``Constant`` nodes, in the main graph and in every subgraph
(int32/int64 tensors are shapes and indices, not weights). MACs come from the shapes ONNX Runtime
itself produces: ``If`` nodes are first replaced by the branch their condition selects for the
given inputs (evaluated by ORT, repeatedly for nested ``If``), then every intermediate tensor is
exposed as a graph output and one run gives all shapes. A ``.tflite`` file is read with the
flatbuffer schema that ``ai-edge-litert`` ships, and its shapes with LiteRT's interpreter.

Conventions (the textbook ones): Conv = output elements x C_in/group x kernel area; ConvTranspose
= input elements x C_out/group x kernel area; MatMul = output elements x K; Gemm = M x N x K;
LSTM / GRU / RNN = steps x batch x directions x gates x hidden x (input + hidden).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

_WEIGHT_ONNX_TYPES = {1: 4, 10: 2, 16: 2, 11: 8, 2: 1, 3: 1}  # float, float16, bfloat16, double, uint8, int8
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass(frozen=True)
class Counts:
    params: int
    weight_bytes: int
    macs: Optional[int]  # None when the shapes could not be obtained


def _graphs(graph) -> Iterator:
    """The graph and every subgraph under it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _tensor_weight(tensor) -> tuple[int, int]:
    if tensor.data_type not in _WEIGHT_ONNX_TYPES:
        return 0, 0
    elements = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return elements, elements * _WEIGHT_ONNX_TYPES[tensor.data_type]


def onnx_weights(model) -> tuple[int, int]:
    """(parameter count, weight bytes) over initializers and Constant nodes of every graph."""
    params = size = 0
    for graph in _graphs(model.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                tensors.extend(a.t for a in node.attribute if a.name == "value")
        for tensor in tensors:
            n, b = _tensor_weight(tensor)
            params += n
            size += b
    return params, size


def _session(model, outputs: Optional[list[str]] = None):
    import onnx
    import onnxruntime as ort

    model = copy.deepcopy(model)
    if outputs is not None:
        del model.graph.output[:]
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _top_level_values(graph) -> list[str]:
    produced = [out for node in graph.node for out in node.output if out]
    seen: dict[str, None] = {}
    for name in produced:
        seen.setdefault(name, None)
    return list(seen)


def inline_taken_branches(model, feeds: Mapping[str, np.ndarray]):
    """A copy of ``model`` where each ``If`` is replaced by the branch its condition picks for ``feeds``."""
    import onnx

    model = copy.deepcopy(model)
    for _ in range(16):  # nested Ifs surface one level per pass
        ifs = [n for n in model.graph.node if n.op_type == "If"]
        if not ifs:
            return model
        conds = dict(zip([n.input[0] for n in ifs],
                         _session(model, [n.input[0] for n in ifs]).run([n.input[0] for n in ifs], dict(feeds))))
        nodes = []
        for node in model.graph.node:
            if node.op_type != "If":
                nodes.append(node)
                continue
            branch_name = "then_branch" if bool(np.asarray(conds[node.input[0]]).reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == branch_name)
            model.graph.initializer.extend(branch.initializer)
            nodes.extend(branch.node)
            for inner, outer in zip(branch.output, node.output):
                nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer], name=f"{outer}__taken"))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    raise ValueError("more than 16 levels of nested If")


def _node_macs(node, shapes: Mapping[str, tuple[int, ...]], attrs: Mapping[str, object]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes[node.input[3 if op == "QLinearConv" else 1]]
        return int(np.prod(out)) * int(np.prod(w[1:]))  # w = (C_out, C_in/group, kH, kW)
    if op == "ConvTranspose":
        x, w = shapes[node.input[0]], shapes[node.input[1]]
        return int(np.prod(x)) * int(np.prod(w[1:]))  # w = (C_in, C_out/group, kH, kW)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes[node.input[0]]
        return int(np.prod(out)) * int(a[-1])
    if op == "Gemm":
        a = shapes[node.input[0]]
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return int(np.prod(out)) * int(k)
    if op in _GATES:
        x, w = shapes[node.input[0]], shapes[node.input[1]]  # x (seq, batch, in) ; w (dirs, gates*hidden, in)
        hidden = int(w[1]) // _GATES[op]
        seq, batch = (x[1], x[0]) if attrs.get("layout", 0) else (x[0], x[1])
        return int(seq) * int(batch) * int(w[0]) * _GATES[op] * hidden * (int(w[2]) + hidden)
    return 0


def onnx_macs(model, feeds: Mapping[str, np.ndarray]) -> int:
    """MACs for one run on ``feeds``, from the shapes ORT produces (``If`` resolved first)."""
    import onnx

    flat = inline_taken_branches(model, feeds)
    names = _top_level_values(flat.graph)
    session = _session(flat, names)
    values = session.run(names, dict(feeds))
    shapes: dict[str, tuple[int, ...]] = {name: tuple(np.shape(v)) for name, v in zip(names, values)}
    shapes.update({k: tuple(np.shape(v)) for k, v in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in flat.graph.initializer})
    total = 0
    for node in flat.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.type == onnx.AttributeProto.INT}
        total += _node_macs(node, shapes, attrs)
    return total


def onnx_counts(path: Path, feeds: Optional[Mapping[str, np.ndarray]]) -> Counts:
    import onnx

    model = onnx.load(str(path))
    params, size = onnx_weights(model)
    return Counts(params, size, onnx_macs(model, feeds) if feeds is not None else None)


# --- .tflite -------------------------------------------------------------------------------------

_TFLITE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 9: 1, 7: 2, 10: 8, 16: 2}  # FLOAT32, FLOAT16, INT32, UINT8, INT64, INT8, INT16, FLOAT64, BFLOAT16
_TFLITE_WEIGHT_TYPES = {0, 1, 3, 9, 10, 16}


def _tflite_model(path: Path):
    from ai_edge_litert import schema_py_generated as schema

    buf = path.read_bytes()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0)), schema


def tflite_counts(path: Path) -> Counts:
    """Weights = tensors backed by a non-empty buffer (float / 8-bit); MACs from the interpreter's shapes."""
    from ai_edge_litert.interpreter import Interpreter

    model, schema = _tflite_model(path)
    opnames = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    params = size = macs = 0
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    for sg_index, subgraph in enumerate(model.subgraphs):
        for tensor in subgraph.tensors:
            buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
            has_data = buffer is not None and ((buffer.data is not None and len(buffer.data) > 0) or (buffer.size or 0) > 0)
            if has_data and tensor.type in _TFLITE_WEIGHT_TYPES:
                n = int(np.prod(tensor.shape)) if tensor.shape is not None and len(tensor.shape) else 1
                params += n
                size += n * _TFLITE_BYTES[tensor.type]
        if sg_index:
            continue
        shape = {i: tuple(int(d) for d in (t.shape if t.shape is not None else ())) for i, t in enumerate(subgraph.tensors)}
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = opnames.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
            inputs, outputs = list(op.inputs), list(op.outputs)
            if name == "CONV_2D":
                w = shape[inputs[1]]  # (C_out, kH, kW, C_in/group)
                macs += int(np.prod(shape[outputs[0]])) * int(np.prod(w[1:]))
            elif name == "DEPTHWISE_CONV_2D":
                w = shape[inputs[1]]  # (1, kH, kW, C_out)
                macs += int(np.prod(shape[outputs[0]])) * int(w[1] * w[2])
            elif name == "TRANSPOSE_CONV":
                w = shape[inputs[1]]  # (C_out, kH, kW, C_in)
                macs += int(np.prod(shape[inputs[2]])) * int(w[0] * w[1] * w[2])
            elif name == "FULLY_CONNECTED":
                w = shape[inputs[1]]  # (units, K)
                macs += int(np.prod(shape[outputs[0]])) * int(w[-1])
            elif name == "BATCH_MATMUL":
                macs += int(np.prod(shape[outputs[0]])) * int(shape[inputs[0]][-1])
    return Counts(params, size, macs)


def count(path: Path, feeds: Optional[Mapping[str, np.ndarray]] = None) -> Counts:
    return tflite_counts(path) if path.suffix == ".tflite" else onnx_counts(path, feeds)
