"""Analyse a ``.tflite`` file: parameters, weight bytes, op histogram, MACs, activations.

Read from the flatbuffer with the schema module ``ai_edge_litert`` ships (``schema_py_generated``),
so no interpreter is built and nothing runs. The result is the same ``GraphStats`` the ONNX analysis
gives, so the per-profile estimates and tables work unchanged. Conventions (first subgraph = the
model's entry point; tensors at their stored shape, dynamic dims as written there, usually 1):

* a tensor is a *weight* when it has data in the file (a non-empty buffer); ``params`` = their
  elements, except int32/int64 constants that feed no weighted op (shapes, axes, paddings);
* MACs: CONV_2D ``out x kh x kw x C_in`` (filter ``[O, kh, kw, I]``: out elements x prod(filter[1:]));
  DEPTHWISE_CONV_2D ``out x kh x kw`` (filter ``[1, kh, kw, C_out]``); TRANSPOSE_CONV ``in elements x
  O x kh x kw``; FULLY_CONNECTED ``out x K`` (weights ``[O, K]``); BATCH_MATMUL ``out x K`` (K the
  contracted axis of the left operand, ``adj_x`` honoured); CONV_3D ``out x prod(filter[:-1])``;
* DEQUANTIZE / DENSIFY of a constant (fp16 or sparse weights expanded at load) are weight
  preparation, not layers: their weight counts towards the op that consumes the result;
* precision: ``int8`` when a weighted op's weights are 8-bit, ``fp16`` when they are stored as
  float16, else ``fp32``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from builder.analysis.graph_stats import GraphStats, LayerStats
from builder.analysis.weights import element_count
from builder.errors import ModelLoadError

TFLITE_SUFFIXES = (".tflite", ".lite")
WEIGHTED_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL",
                          "CONV_3D", "UNIDIRECTIONAL_SEQUENCE_LSTM", "EMBEDDING_LOOKUP"})
WEIGHT_PREPARATION = frozenset({"DEQUANTIZE", "DENSIFY"})
VIEW_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS"})
ELEMENTWISE = frozenset({"ADD", "SUB", "MUL", "DIV", "RELU", "RELU6", "RELU_N1_TO_1", "LOGISTIC", "TANH", "HARD_SWISH",
                         "PRELU", "LEAKY_RELU", "MAXIMUM", "MINIMUM", "EXP", "SQRT", "RSQRT", "POW", "ABS", "NEG",
                         "QUANTIZE", "DEQUANTIZE", "GELU", "SQUARED_DIFFERENCE", "ELU"})
NP_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "UINT8": "uint8", "INT64": "int64",
             "BOOL": "bool", "INT16": "int16", "INT8": "int8", "FLOAT64": "float64", "UINT32": "uint32",
             "UINT16": "uint16", "INT4": "int8", "BFLOAT16": "bfloat16"}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "uint8": 1, "int8": 1, "int64": 8,
         "bool": 1, "int16": 2, "uint16": 2, "float64": 8}


@dataclass(frozen=True)
class TfliteTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    constant: bool

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= max(int(dim), 0)
        return count

    @property
    def nbytes(self) -> int:
        return self.elements * BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class TfliteOp:
    name: str  # builtin operator name, e.g. "CONV_2D"; custom ops as "CUSTOM:<code>"
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    adj_x: bool = False


@dataclass(frozen=True)
class TfliteGraph:
    """The entry subgraph of a ``.tflite`` file as plain data."""

    tensors: tuple[TfliteTensor, ...]
    ops: tuple[TfliteOp, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    subgraphs: int


def is_tflite(path: Path | str) -> bool:
    """By suffix, or by the flatbuffer identifier ``TFL3`` at bytes 4-8."""
    path = Path(path)
    if path.suffix.lower() in TFLITE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def read_tflite(path: Path | str) -> TfliteGraph:
    """Parse the file's first subgraph; ModelLoadError with one line when it is not a TFLite model."""
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found; check the path")
    data = path.read_bytes()
    if data[4:8] != b"TFL3":
        raise ModelLoadError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier); give a real .tflite file")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    except Exception as exc:  # flatbuffers raises struct/index errors on truncated files
        raise ModelLoadError(f"{path} could not be read as TFLite ({type(exc).__name__}); re-convert it") from exc
    if not model.subgraphs:
        raise ModelLoadError(f"{path} has no subgraph; re-convert it")
    type_names = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
    op_names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = []
    for code in model.operatorCodes or []:
        builtin = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            name = f"CUSTOM:{custom}"
        codes.append(name)
    buffers = model.buffers or []

    def has_data(index: int) -> bool:
        if index <= 0 or index >= len(buffers):
            return False
        buffer = buffers[index]
        return (buffer.data is not None and len(buffer.data) > 0) or int(getattr(buffer, "size", 0) or 0) > 0

    graph = model.subgraphs[0]
    tensors = []
    for tensor in graph.tensors or []:
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
        shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else []))
        dtype = NP_DTYPES.get(type_names.get(tensor.type, ""), "float32")
        tensors.append(TfliteTensor(name=name, shape=shape, dtype=dtype, constant=has_data(int(tensor.buffer))))
    ops = []
    for op in graph.operators or []:
        name = codes[op.opcodeIndex] if op.opcodeIndex < len(codes) else "UNKNOWN"
        options = op.builtinOptions
        ops.append(TfliteOp(name=name, inputs=tuple(int(i) for i in (op.inputs if op.inputs is not None else [])),
                            outputs=tuple(int(i) for i in (op.outputs if op.outputs is not None else [])),
                            adj_x=bool(getattr(options, "adjX", False))))
    return TfliteGraph(tensors=tuple(tensors), ops=tuple(ops),
                       inputs=tuple(int(i) for i in (graph.inputs if graph.inputs is not None else [])),
                       outputs=tuple(int(i) for i in (graph.outputs if graph.outputs is not None else [])),
                       subgraphs=len(model.subgraphs))


def op_macs(op: TfliteOp, tensors: tuple[TfliteTensor, ...]) -> int:
    """MACs of one operator (see the module docstring); 0 for ops without MACs or unknown shapes."""
    def shape(position: int) -> tuple[int, ...] | None:
        index = op.inputs[position] if len(op.inputs) > position else -1
        return tensors[index].shape if index >= 0 else None

    out = tensors[op.outputs[0]] if op.outputs and op.outputs[0] >= 0 else None
    out_elements = out.elements if out is not None else 0
    if op.name == "CONV_2D":
        weight = shape(1)
        return out_elements * element_count(weight[1:]) if weight else 0
    if op.name == "DEPTHWISE_CONV_2D":
        weight = shape(1)
        return out_elements * element_count(weight[1:3]) if weight and len(weight) == 4 else 0
    if op.name == "CONV_3D":
        weight = shape(1)  # [kd, kh, kw, I, O]
        return out_elements * element_count(weight[:-1]) if weight else 0
    if op.name == "TRANSPOSE_CONV":
        weight, x = shape(1), shape(2)  # inputs: output_shape, weights [O, kh, kw, I], input
        return element_count(x) * element_count(weight[:3]) if weight and x else 0
    if op.name == "FULLY_CONNECTED":
        weight = shape(1)
        return out_elements * weight[-1] if weight else 0
    if op.name == "BATCH_MATMUL":
        lhs = shape(0)
        if not lhs:
            return 0
        return out_elements * (lhs[-2] if op.adj_x and len(lhs) >= 2 else lhs[-1])
    return 0


def analyze_tflite(path: Path | str) -> GraphStats:
    """``GraphStats`` of the file's entry subgraph (see the module docstring)."""
    graph = read_tflite(path)
    tensors = graph.tensors
    weighted_inputs = {i for op in graph.ops if op.name in WEIGHTED_OPS for i in op.inputs[1:] if i >= 0}
    # fp16 / sparse weights are stored as constants and expanded by DEQUANTIZE / DENSIFY at load.
    dequantized = {op.outputs[0]: op.inputs[0] for op in graph.ops
                   if op.name in WEIGHT_PREPARATION and op.inputs and op.outputs and tensors[op.inputs[0]].constant}

    def is_weight(index: int) -> bool:
        tensor = tensors[index]
        if not tensor.constant:
            return False
        return tensor.dtype not in ("int32", "int64") or index in weighted_inputs

    assigned: set[int] = set()
    layers = []
    for position, op in enumerate(graph.ops):
        if op.name in WEIGHT_PREPARATION and op.outputs and op.outputs[0] in dequantized:
            continue  # weight preparation: its weight counts towards the op that consumes it
        constant_inputs = [i for i in op.inputs if i >= 0 and tensors[i].constant]
        dynamic_inputs = [i for i in op.inputs if i >= 0 and not tensors[i].constant and i not in dequantized]
        own = [i for i in constant_inputs if is_weight(i) and i not in assigned]
        own += [dequantized[i] for i in op.inputs if i in dequantized and dequantized[i] not in assigned]
        assigned.update(own)
        params = sum(tensors[i].elements for i in own)
        weight_bytes = sum(tensors[i].nbytes for i in own)
        macs = op_macs(op, tensors)
        outputs = [tensors[i] for i in op.outputs if i >= 0]
        activation = sum(t.nbytes for t in outputs)
        input_bytes = sum(tensors[i].nbytes for i in dynamic_inputs)
        other = sum(t.elements for t in outputs) if op.name in ELEMENTWISE else 0
        precision = _precision(op, own, tensors)
        layers.append(LayerStats(
            name=outputs[0].name if outputs else f"{op.name}_{position}", op_type=op.name, params=params, macs=macs,
            other_ops=other, output_shape=outputs[0].shape if outputs else None, activation_bytes=activation,
            input_bytes=input_bytes, weight_bytes=weight_bytes,
            traffic_bytes=0 if op.name in VIEW_OPS else weight_bytes + input_bytes + activation, precision=precision))
    weights = [i for i in range(len(tensors)) if is_weight(i)]
    params = sum(tensors[i].elements for i in weights)
    by_precision: Counter[str] = Counter()
    for layer in layers:
        if layer.macs:
            by_precision[layer.precision] += layer.macs
    notes = [f"TFLite file: {graph.subgraphs} subgraphs, the first (entry) analysed"] if graph.subgraphs > 1 else []
    return GraphStats(
        input_shapes={tensors[i].name: tensors[i].shape for i in graph.inputs},
        layers=tuple(layers), params=params, macs=sum(layer.macs for layer in layers),
        other_ops=sum(layer.other_ops for layer in layers),
        weight_bytes=sum(tensors[i].nbytes for i in weights), fp32_weight_bytes=4 * params,
        peak_activation_bytes=_peak_activation_bytes(graph),
        op_histogram=dict(Counter(op.name for op in graph.ops).most_common()),
        macs_by_precision=dict(by_precision), node_count=len(graph.ops), notes=tuple(notes))


def tflite_inputs(path: Path | str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, numpy dtype) of the entry subgraph's inputs."""
    graph = read_tflite(path)
    return [(graph.tensors[i].name, graph.tensors[i].shape, graph.tensors[i].dtype) for i in graph.inputs]


def _precision(op: TfliteOp, weights: list[int], tensors: tuple[TfliteTensor, ...]) -> str:
    dtypes = {tensors[i].dtype for i in weights}
    if op.name in WEIGHTED_OPS and dtypes & {"int8", "uint8"}:
        return "int8"
    if dtypes & {"float16"} or any(tensors[i].dtype == "float16" for i in op.outputs if i >= 0):
        return "fp16"
    return "fp32"


def _peak_activation_bytes(graph: TfliteGraph) -> int:
    """Sequential schedule, a tensor freed after its last reader (as in ``graph_stats``)."""
    tensors = graph.tensors
    last_use: dict[int, int] = {}
    for position, op in enumerate(graph.ops):
        for i in op.inputs:
            if i >= 0 and not tensors[i].constant:
                last_use[i] = position
    keep = set(graph.outputs)
    live = sum(tensors[i].nbytes for i in graph.inputs)
    peak = live
    for position, op in enumerate(graph.ops):
        outputs = [i for i in op.outputs if i >= 0]
        live += sum(tensors[i].nbytes for i in outputs)
        peak = max(peak, live)
        for i in set(i for i in op.inputs if i >= 0 and not tensors[i].constant) | set(outputs):
            if last_use.get(i, position) <= position and i not in keep:
                live -= tensors[i].nbytes
                last_use[i] = len(graph.ops) + 1  # freed once
    return peak

