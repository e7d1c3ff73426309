"""Per-layer and whole-model statistics of an ONNX graph at concrete input shapes.

Pure over (graph, tensor infos); ``analyze_onnx`` adds the file and shape-inference edge. Conventions:

* A tensor is *static* when it is an initializer, a Constant, or computed only from static tensors or
  from ``Shape``/``Size`` (weight preparation such as DequantizeLinear of an int8 weight, and the
  shape arithmetic PyTorch exports with dynamic axes). Static nodes are not layers: they cost nothing
  and their initializers count towards the layer that consumes them.
* ``params`` of the model = the element count of every weight (``weights.py``: every initializer,
  quantized ones included, and every numeric non-index ``Constant``) in the main graph and in every
  subgraph, untaken ``If`` branches included (they are loaded too); each weight is attributed to its
  first consuming layer.
* Subgraphs: ``analyze_model`` first inlines the ``If`` branches the inputs select (``branches.py``);
  a top-level ``If`` whose condition needs a value not given is analysed both ways and the branch
  with more MACs kept; what is left (``If`` inside ``Loop`` bodies...) counts as one layer: its
  weights, the larger branch's MACs, or a ``Loop``/``Scan`` body times its iterations. ``notes``
  say which choice was made.
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

from builder.analysis.op_costs import INTEGER_OPS, LINEAR_OPS, OpCost, op_cost
from builder.analysis.shapes import TensorInfo, infer_tensor_infos
from builder.analysis.weights import graph_weights, integer_scalars, iter_all_weights

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
    op_histogram: Mapping[str, int]  # every node of the analysed graph (taken If branches inlined), static ones included
    macs_by_precision: Mapping[str, int]
    node_count: int
    unresolved_tensors: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)  # how subgraphs were counted, normalisation...

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
        data["notes"] = list(self.notes)
        data["flops"] = self.flops
        return data


def analyze_onnx(path: Path | str, input_shapes: Mapping[str, Sequence[int]],
                 input_values: Mapping[str, Any] | None = None) -> GraphStats:
    """Load ``path`` and analyse it at ``input_shapes`` ({input name: concrete dims})."""
    import onnx

    model = onnx.load(str(path))
    return analyze_model(model, input_shapes, input_values)


def analyze_model(model: Any, input_shapes: Mapping[str, Sequence[int]],
                  input_values: Mapping[str, Any] | None = None) -> GraphStats:
    """Analyse an in-memory ``onnx.ModelProto`` at ``input_shapes``.

    ``input_values`` (arrays by input name, e.g. a sample rate) let ``If`` conditions that depend on
    input values be evaluated; the branch taken is counted (``branches``). Totals of parameters and
    weight bytes cover every weight in the file, untaken branches included (they are loaded too).
    """
    import dataclasses

    import numpy as np

    values, ignored = {}, []
    for name, value in (input_values or {}).items():
        if name in input_shapes and tuple(np.shape(value)) == tuple(int(d) for d in input_shapes[name]):
            values[name] = value
        elif name in input_shapes:
            ignored.append(f"the value given for {name} has shape {tuple(np.shape(value))}, not the analysed "
                           f"{tuple(input_shapes[name])}: not used")
    stats = _analyze_branches(model, input_shapes, values, [MAX_BRANCH_VARIANTS])
    notes = ignored + list(stats.notes)
    everywhere = list(iter_all_weights(model.graph))
    params = sum(w.elements for w in everywhere)
    if params != stats.params:
        notes.append(f"{params - stats.params:,} of the {params:,} parameters sit in branches not counted")
    return dataclasses.replace(stats, params=params, weight_bytes=sum(w.stored_bytes for w in everywhere),
                               fp32_weight_bytes=4 * params, notes=tuple(notes))


MAX_BRANCH_VARIANTS = 8  # whole-graph analyses spent on Ifs whose condition is unknown


def _analyze_branches(model: Any, input_shapes: Mapping[str, Sequence[int]], input_values: Mapping[str, Any] | None,
                      budget: list[int]) -> GraphStats:
    """Inline the branches the inputs select; for a top-level If whose condition needs a value not
    given, analyse the graph with each branch inlined and keep the one with more MACs."""
    import copy
    import dataclasses

    from builder.analysis.branches import inline_branch, resolve_branches

    flat, notes = resolve_branches(model, input_shapes, input_values)
    pending = next((i for i, node in enumerate(flat.graph.node) if node.op_type == "If"), None)
    if pending is not None and budget[0] >= 2:
        budget[0] -= 2
        results = {}
        for branch in ("then_branch", "else_branch"):
            variant = copy.deepcopy(flat)
            inline_branch(variant, pending, branch)
            results[branch] = _analyze_branches(variant, input_shapes, input_values, budget)
        best = max(results, key=lambda b: results[b].macs)
        node = flat.graph.node[pending]
        figures = ", ".join(f"{b.split('_')[0]} {results[b].macs:,} MACs"
                            + (f" with {len(results[b].unresolved_tensors)} tensors of unknown shape"
                               if results[b].unresolved_tensors else "") for b in results)
        choice = [f"If '{node.name or node.input[0]}': counted the larger branch ({figures})"]
        kept = [n for n in notes if not n.startswith(f"If '{node.name}': its condition")]
        missing = [n for n in notes if n not in kept]
        return dataclasses.replace(results[best], notes=tuple(kept + missing + choice) + results[best].notes)
    infos, _ = infer_tensor_infos(flat, input_shapes, input_values=input_values)
    stats = analyze_graph(flat.graph, infos, input_shapes)
    return dataclasses.replace(stats, notes=tuple(notes) + stats.notes)


def analyze_graph(graph: Any, infos: Mapping[str, TensorInfo], input_shapes: Mapping[str, Sequence[int]]) -> GraphStats:
    """The pure part: a ``GraphProto`` plus the shape/dtype of its tensors -> ``GraphStats``."""
    weights = graph_weights(graph)
    init_elements = {name: w.elements for name, w in weights.items()}
    init_bytes = {name: w.stored_bytes for name, w in weights.items()}
    initializers = {init.name for init in graph.initializer}
    nodes = list(graph.node)

    # Static tensors and the weights (initializers, weight Constants) / DequantizeLinear behind each.
    sources: dict[str, frozenset[str]] = {name: frozenset([name]) for name in weights}
    dequantized: set[str] = set()
    static_nodes: set[int] = set()
    for index, node in enumerate(nodes):
        inputs = [name for name in node.input if name]
        is_static = (node.op_type == "Constant" or node.op_type in SHAPE_OPS
                     or (inputs and node.op_type not in NONDETERMINISTIC and not _has_subgraph(node)
                         and all(name in sources for name in inputs)))
        if not is_static:
            continue
        static_nodes.add(index)
        if node.op_type == "Constant" and node.output and node.output[0] in weights:
            continue  # a weight of its own
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
    notes: list[str] = []
    layers: list[LayerStats] = []
    unresolved: list[str] = []
    for index, node in enumerate(nodes):
        if index in static_nodes:
            continue
        dynamic_inputs = [name for name in node.input if name and name not in sources]
        static_inputs = [name for name in node.input if name and name in sources]
        node_weights = sorted({init for name in static_inputs for init in sources[name]} - assigned)
        assigned.update(node_weights)
        params = sum(init_elements[w] for w in node_weights)
        weight_bytes = sum(init_bytes[w] for w in node_weights)
        if _has_subgraph(node):
            cost, inner_params, inner_bytes = _subgraph_cost(node, infos, integer_scalars(graph), notes)
            params += inner_params
            weight_bytes += inner_bytes
        else:
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
    everywhere = list(iter_all_weights(graph))
    total_params = sum(w.elements for w in everywhere)
    return GraphStats(
        input_shapes={name: tuple(int(d) for d in shape) for name, shape in input_shapes.items()},
        layers=tuple(layers),
        params=total_params,
        macs=sum(layer.macs for layer in layers),
        other_ops=sum(layer.other_ops for layer in layers),
        weight_bytes=sum(w.stored_bytes for w in everywhere),
        fp32_weight_bytes=4 * total_params,
        peak_activation_bytes=_peak_activation_bytes(nodes, static_nodes, sources, graph_inputs, graph_outputs, info),
        op_histogram=dict(histogram.most_common()),
        macs_by_precision=dict(macs_by_precision),
        node_count=len(nodes),
        unresolved_tensors=tuple(unresolved),
        notes=tuple(notes),
    )


def _has_subgraph(node: Any) -> bool:
    from onnx import AttributeProto

    return any(attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for attr in node.attribute)


def _subgraph_cost(node: Any, infos: Mapping[str, TensorInfo], scalars: Mapping[str, int],
                   notes: list[str]) -> tuple[OpCost, int, int]:
    """(cost, params, weight bytes) of a node with subgraphs left in the graph (an ``If`` whose
    condition could not be evaluated, a ``Loop``, a ``Scan``): weights are all those inside; MACs
    are the larger branch for ``If`` and body x iterations for ``Loop``/``Scan``."""
    from onnx import AttributeProto

    bodies = {attr.name: analyze_graph(attr.g, infos, {}) for attr in node.attribute if attr.type == AttributeProto.GRAPH}
    params = sum(b.params for b in bodies.values())
    weight_bytes = sum(b.weight_bytes for b in bodies.values())
    label = node.name or node.op_type
    for sub in bodies.values():
        notes.extend(sub.notes)
    if node.op_type == "If" and bodies:
        branch = max(bodies, key=lambda name: bodies[name].macs)
        chosen = bodies[branch]
        notes.append(f"{node.op_type} '{label}': condition unknown, counted the larger branch ({branch})")
        return OpCost(chosen.macs, chosen.other_ops), params, weight_bytes
    body = bodies.get("body")
    if body is None:
        return OpCost(0, 0), params, weight_bytes
    iterations = _iterations(node, infos, scalars)
    if iterations is None:
        notes.append(f"{node.op_type} '{label}': iteration count unknown, body counted once")
        iterations = 1
    return OpCost(body.macs * iterations, body.other_ops * iterations), params, weight_bytes


def _iterations(node: Any, infos: Mapping[str, TensorInfo], scalars: Mapping[str, int]) -> int | None:
    """Trip count of a Loop (its ``M`` input, when a known value) or the scan length of a Scan."""
    from onnx import helper

    if node.op_type == "Scan":
        count = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "num_scan_inputs"), 0)
        axes = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "scan_input_axes"), [])
        scanned = list(node.input)[-count:] if count else []
        if scanned:
            shape = infos.get(scanned[0], TensorInfo(None, "unknown")).shape
            axis = axes[0] if axes else 0
            if shape is not None and len(shape) > abs(axis):
                return int(shape[axis])
        return None
    if node.op_type == "Loop" and node.input and node.input[0]:
        return scalars.get(node.input[0])
    return None


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
