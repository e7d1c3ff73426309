"""Per-layer and whole-model statistics of an ONNX graph at concrete input shapes.

Pure over (graph, tensor infos); ``analyze_onnx`` adds the file and shape-inference edge. Conventions:

* A tensor is *static* when it is an initializer, a Constant, or computed only from static tensors or
  from ``Shape``/``Size`` (weight preparation such as DequantizeLinear of an int8 weight, and the
  shape arithmetic PyTorch exports with dynamic axes). Static nodes are not layers: they cost nothing
  and their initializers count towards the layer that consumes them.
* ``params`` of the model = the element count of every initializer (quantized ones included); each
  initializer is attributed to its first consuming layer.
* Peak activation memory: walk the layers in graph order (a sequential schedule), allocate each
  output, free a tensor after its last consumer; graph inputs are live from the start and graph outputs
  to the end. No in-place reuse or aliasing is assumed (conservative).
* Precision of a layer: ``int8`` for integer kernels (QLinearConv, MatMulInteger...) and for
  Conv/MatMul/Gemm whose weight and activation both come from DequantizeLinear (QDQ: runtimes fuse
  them into int8 kernels, so the Q/DQ nodes on activations are marked ``fused`` and cost nothing);
  ``fp16`` when the output is float16; else ``fp32``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from builder.analysis.op_costs import INTEGER_OPS, LINEAR_OPS, op_cost
from builder.analysis.shapes import TensorInfo, dtype_bytes, infer_tensor_infos

VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
SHAPE_OPS = frozenset({"Shape", "Size"})
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                              "Bernoulli"})


@dataclass(frozen=True)
class LayerStats:
    """One executed node. Bytes are at the tensors' stored dtypes."""

    name: str
    op_type: str
    params: int
    macs: int
    other_ops: int  # non-MAC arithmetic (see op_costs)
    output_shape: tuple[int, ...] | None
    activation_bytes: int  # bytes of the node's outputs
    input_bytes: int  # bytes of the activations it reads
    weight_bytes: int  # stored bytes of the weights attributed to it
    traffic_bytes: int  # what the roofline moves: weights + inputs + outputs (0 for views and fused Q/DQ)
    precision: str  # "fp32" | "fp16" | "int8"
    fused: bool = False  # Q/DQ on activations of an int8 kernel: folded into it by the runtime

    @property
    def flops(self) -> int:
        return 2 * self.macs + self.other_ops


@dataclass(frozen=True)
class GraphStats:
    """Everything ``builder analyze`` reports about a model, before any device is considered."""

    input_shapes: Mapping[str, tuple[int, ...]]
    layers: tuple[LayerStats, ...]
    params: int
    macs: int
    other_ops: int
    weight_bytes: int  # stored size of all initializers
    fp32_weight_bytes: int  # params x 4
    peak_activation_bytes: int
    op_histogram: Mapping[str, int]  # every node of the main graph, static ones included
    macs_by_precision: Mapping[str, int]
    node_count: int
    unresolved_tensors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def flops(self) -> int:
        return 2 * self.macs + self.other_ops

    @property
    def dominant_precision(self) -> str:
        """The precision most MACs run at ("fp32" for a graph without MACs)."""
        if not self.macs_by_precision:
            return "fp32"
        return max(self.macs_by_precision, key=lambda p: self.macs_by_precision[p])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dominant_precision"] = self.dominant_precision
        data["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        data["layers"] = [{**asdict(layer), "output_shape": list(layer.output_shape) if layer.output_shape else None}
                          for layer in self.layers]
        data["op_histogram"] = dict(self.op_histogram)
        data["macs_by_precision"] = dict(self.macs_by_precision)
        data["unresolved_tensors"] = list(self.unresolved_tensors)
        data["flops"] = self.flops
        return data


def analyze_onnx(path: Path | str, input_shapes: Mapping[str, Sequence[int]]) -> GraphStats:
    """Load ``path`` and analyse it at ``input_shapes`` ({input name: concrete dims})."""
    import onnx

    model = onnx.load(str(path))
    return analyze_model(model, input_shapes)


def analyze_model(model: Any, input_shapes: Mapping[str, Sequence[int]]) -> GraphStats:
    """Analyse an in-memory ``onnx.ModelProto`` at ``input_shapes``."""
    infos, _ = infer_tensor_infos(model, input_shapes)
    return analyze_graph(model.graph, infos, input_shapes)


def analyze_graph(graph: Any, infos: Mapping[str, TensorInfo], input_shapes: Mapping[str, Sequence[int]]) -> GraphStats:
    """The pure part: a ``GraphProto`` plus the shape/dtype of its tensors -> ``GraphStats``."""
    initializers = {init.name: init for init in graph.initializer}
    init_elements = {name: _elements(init.dims) for name, init in initializers.items()}
    init_bytes = {name: init_elements[name] * dtype_bytes(infos[name].dtype if name in infos else "float32")
                  for name in initializers}
    nodes = list(graph.node)

    # Static tensors and the initializers / DequantizeLinear behind each.
    sources: dict[str, frozenset[str]] = {name: frozenset([name]) for name in initializers}
    dequantized: set[str] = set()
    static_nodes: set[int] = set()
    for index, node in enumerate(nodes):
        inputs = [name for name in node.input if name]
        is_static = (node.op_type == "Constant" or node.op_type in SHAPE_OPS
                     or (inputs and node.op_type not in NONDETERMINISTIC and all(name in sources for name in inputs)))
        if not is_static:
            continue
        static_nodes.add(index)
        merged = frozenset().union(*(sources[name] for name in inputs)) if inputs and node.op_type not in SHAPE_OPS else frozenset()
        via_dq = node.op_type == "DequantizeLinear" or any(name in dequantized for name in inputs)
        for out in node.output:
            if out:
                sources[out] = merged
                if via_dq:
                    dequantized.add(out)

    producers = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    graph_inputs = [v.name for v in graph.input if v.name not in initializers]
    graph_outputs = {v.name for v in graph.output}

    def info(name: str) -> TensorInfo:
        return infos.get(name, TensorInfo(None, "unknown"))

    def produced_by_dq(name: str) -> bool:
        index = producers.get(name)
        return index is not None and nodes[index].op_type == "DequantizeLinear"

    # Activation Q/DQ pairs next to an int8-capable op are fused by the runtime.
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(index)

    assigned: set[str] = set()
    layers: list[LayerStats] = []
    unresolved: list[str] = []
    for index, node in enumerate(nodes):
        if index in static_nodes:
            continue
        dynamic_inputs = [name for name in node.input if name and name not in sources]
        static_inputs = [name for name in node.input if name and name in sources]
        weights = sorted({init for name in static_inputs for init in sources[name]} - assigned)
        assigned.update(weights)
        params = sum(init_elements[w] for w in weights)
        weight_bytes = sum(init_bytes[w] for w in weights)
        cost = op_cost(node, infos)
        outputs = [name for name in node.output if name]
        for name in outputs:
            if info(name).shape is None:
                unresolved.append(name)
        out_info = info(outputs[0]) if outputs else TensorInfo(None, "unknown")
        precision = _precision(node, static_inputs, dynamic_inputs, dequantized, produced_by_dq, out_info)
        fused = node.op_type in QDQ_OPS and _next_to_int8_kernel(node, nodes, consumers, producers, dequantized)
        activation_bytes = sum(info(name).nbytes for name in outputs)
        input_bytes = sum(info(name).nbytes for name in dynamic_inputs)
        if fused or node.op_type in VIEW_OPS:
            traffic = 0
        elif precision == "int8":  # QDQ activations are float in the graph, int8 in the fused kernel
            traffic = weight_bytes + _int8_bytes(dynamic_inputs, info) + _int8_bytes(outputs, info)
        else:
            traffic = weight_bytes + input_bytes + activation_bytes
        layers.append(LayerStats(
            name=node.name or f"{node.op_type}_{index}", op_type=node.op_type, params=params, macs=cost.macs,
            other_ops=0 if fused else cost.other_ops, output_shape=out_info.shape, activation_bytes=activation_bytes,
            input_bytes=input_bytes, weight_bytes=weight_bytes, traffic_bytes=traffic, precision=precision, fused=fused))

    macs_by_precision: Counter[str] = Counter()
    for layer in layers:
        if layer.macs:
            macs_by_precision[layer.precision] += layer.macs
    histogram = Counter(node.op_type for node in nodes)
    total_params = sum(init_elements.values())
    return GraphStats(
        input_shapes={name: tuple(int(d) for d in shape) for name, shape in input_shapes.items()},
        layers=tuple(layers),
        params=total_params,
        macs=sum(layer.macs for layer in layers),
        other_ops=sum(layer.other_ops for layer in layers),
        weight_bytes=sum(init_bytes.values()),
        fp32_weight_bytes=4 * total_params,
        peak_activation_bytes=_peak_activation_bytes(nodes, static_nodes, sources, graph_inputs, graph_outputs, info),
        op_histogram=dict(histogram.most_common()),
        macs_by_precision=dict(macs_by_precision),
        node_count=len(nodes),
        unresolved_tensors=tuple(unresolved),
    )


def _elements(dims: Sequence[int]) -> int:
    count = 1
    for dim in dims:
        count *= int(dim)
    return count


def _int8_bytes(names: Sequence[str], info: Any) -> int:
    total = 0
    for name in names:
        tensor = info(name)
        total += tensor.elements if tensor.dtype.startswith("float") else tensor.nbytes
    return total


def _precision(node: Any, static_inputs: Sequence[str], dynamic_inputs: Sequence[str], dequantized: set[str],
               produced_by_dq: Any, out_info: TensorInfo) -> str:
    if node.op_type in INTEGER_OPS:
        return "int8"
    if node.op_type in LINEAR_OPS and any(name in dequantized for name in static_inputs) \
            and dynamic_inputs and all(produced_by_dq(name) for name in dynamic_inputs):
        return "int8"
    if node.op_type in LINEAR_OPS and len(dynamic_inputs) >= 2 and all(produced_by_dq(n) for n in dynamic_inputs):
        return "int8"  # activation x activation matmul in a QDQ graph
    if out_info.dtype in ("float16", "bfloat16"):
        return "fp16"
    return "fp32"


def _next_to_int8_kernel(node: Any, nodes: Sequence[Any], consumers: Mapping[str, list[int]],
                         producers: Mapping[str, int], dequantized: set[str]) -> bool:
    """A Q/DQ on activations that feeds (DQ) or follows (Q) a linear op: part of a QDQ int8 kernel."""
    if node.op_type == "DequantizeLinear":
        return any(nodes[i].op_type in LINEAR_OPS or nodes[i].op_type in VIEW_OPS or nodes[i].op_type == "QuantizeLinear"
                   or nodes[i].op_type in ("Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu")
                   for i in consumers.get(node.output[0], []))
    # QuantizeLinear: fused when its producer is a float op whose result is re-quantized for an int8 consumer.
    return any(nodes[i].op_type == "DequantizeLinear" for i in consumers.get(node.output[0], []))


def _peak_activation_bytes(nodes: Sequence[Any], static_nodes: set[int], sources: Mapping[str, Any],
                           graph_inputs: Sequence[str], graph_outputs: set[str], info: Any) -> int:
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if index in static_nodes:
            continue
        for name in node.input:
            if name and name not in sources:
                last_use[name] = index
    live = sum(info(name).nbytes for name in graph_inputs)
    peak = live
    for index, node in enumerate(nodes):
        if index in static_nodes:
            continue
        outputs = [name for name in node.output if name]
        live += sum(info(name).nbytes for name in outputs)
        peak = max(peak, live)
        for name in set(n for n in node.input if n and n not in sources) | set(outputs):
            if last_use.get(name, index) <= index and name not in graph_outputs:
                live -= info(name).nbytes
                last_use[name] = -1  # freed once
    return peak
