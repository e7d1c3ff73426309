"""fp32 -> fp16 conversion that does not overflow: ranges measured first, overflowing nodes kept in float.

fp16 holds magnitudes up to 65504. A tensor past that (a BatchNorm variance of 9.8e7 in a Paddle text
detector, a MatMul producing 1e5) becomes inf and the fp16 model outputs NaN or zeros. Before
converting, the fp32 model is run on the samples with every intermediate tensor as an output
(``execution.sessions.session_with_outputs``); every node that produces or consumes a tensor (or
a weight) whose max |value| exceeds ``FP16_SAFE_MAX`` is kept in float (the converter's
``node_block_list``, with Casts around it). Half the fp16 range is the limit: the samples do not
cover every input the device will see.

The converter routes even the edge between two float nodes through fp16 (Cast to fp16, Cast back):
such round trips are replaced by an Identity. The converted graph gets unique node names first (a
fold-then-fp16 recipe had duplicates, which the block list cannot address) and is topologically
sorted after (the converter appends its Casts at the
end of the node list, which onnx's checker refuses as "not topologically sorted").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_SAFE_MAX = FP16_MAX / 2


@dataclass(frozen=True)
class Fp16Conversion:
    model: Any  # onnx.ModelProto
    kept_in_float: tuple[str, ...]  # node names kept in fp32 because of their ranges
    worst: tuple[tuple[str, float], ...]  # (tensor, max |value|) of the overflowing tensors, largest first

    def note(self) -> str | None:
        if not self.kept_in_float:
            return None
        shown = ", ".join(f"{name} (max |x| {value:.3g})" for name, value in self.worst[:3])
        return (f"fp16 overflow found before conversion: {len(self.worst)} tensor(s) exceed {FP16_SAFE_MAX:g} "
                f"({shown}); kept {len(self.kept_in_float)} node(s) in float: {', '.join(self.kept_in_float[:5])}"
                + (" ..." if len(self.kept_in_float) > 5 else ""))


def unique_node_names(model: Any) -> int:
    """Give every node of the main graph a unique name (in place); returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{index}"
            candidate, suffix = base, 1
            while candidate in seen:
                candidate, suffix = f"{base}_{suffix}", suffix + 1
            node.name = candidate
            renamed += 1
        seen.add(node.name)
    return renamed


def topological_sort(graph: Any) -> None:
    """Order ``graph.node`` so every node comes after the producers of its inputs (in place).
    Inputs of subgraphs (If/Loop bodies) that come from the outer graph count as dependencies."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)

    def needs(node: Any) -> set[str]:
        names = set(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {
                    i.name for i in sub.initializer}
                names |= {name for n in sub.node for name in n.input if name not in inner}
        return names

    produced_here = {o for n in nodes for o in n.output}
    pending = [(node, {name for name in needs(node) if name in produced_here}) for node in nodes]
    ordered: list[Any] = []
    while pending:
        ready = [(n, deps) for n, deps in pending if deps <= available]
        if not ready:  # a cycle or a dangling input: keep the rest as it was, the checker will say
            ordered.extend(n for n, _ in pending)
            break
        ready_ids = {id(n) for n, _ in ready}
        for node, _ in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [(n, d) for n, d in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def drop_fp16_round_trips(graph: Any) -> int:
    """Replace Cast(to fp16) -> Cast(to fp32) chains by an Identity of the fp32 tensor (in place);
    returns how many. The converter routes every edge through fp16, also the edge between two nodes
    it keeps in float (a Constant holding a variance of 9.8e7 and its BatchNorm): the round trip
    turns the value into inf and keeping the nodes in float would fix nothing."""
    import onnx

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {o: n for n in graph.node for o in n.output}
    dropped = 0
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT or not node.input:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != onnx.TensorProto.FLOAT16 or not first.input:
            continue
        node.op_type = "Identity"
        del node.attribute[:]
        node.input[0] = first.input[0]
        dropped += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [n for n in graph.node if cast_to(n) == onnx.TensorProto.FLOAT16 and not (set(n.output) & used)]
    for node in unused:
        graph.node.remove(node)
    return dropped


def tensor_ranges(model: Any, samples: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """max |value| of every float tensor the fp32 model computes on ``samples`` (and of its weights)."""
    import onnx
    from onnx import numpy_helper

    from builder.execution.sessions import session_with_outputs

    ranges: dict[str, float] = {}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            array = numpy_helper.to_array(init)
            if array.size:
                ranges[init.name] = float(np.max(np.abs(array)))
    names = [o for node in model.graph.node for o in node.output if o]
    session = session_with_outputs(model, names)
    wanted = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    for sample in samples:
        values = session.run(None, {k: v for k, v in sample.items() if k in wanted})
        for name, value in zip(outputs, values):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                finite = np.abs(value[np.isfinite(value)])
                peak = float(finite.max()) if finite.size else float("inf")
                ranges[name] = max(ranges.get(name, 0.0), peak)
    return ranges


def overflow_nodes(model: Any, ranges: Mapping[str, float], limit: float = FP16_SAFE_MAX) -> list[str]:
    """Names of the nodes that produce or consume a tensor (or weight) past ``limit``."""
    hot = {name for name, peak in ranges.items() if peak > limit}
    return [node.name for node in model.graph.node if hot & (set(node.input) | set(node.output))]


def convert_to_fp16(model: Any, samples: Sequence[Mapping[str, np.ndarray]] | None,
                    op_block_list: Sequence[str] | None = None,
                    node_block_list: Sequence[str] = ()) -> Fp16Conversion:
    """fp16 weights and compute, fp32 graph inputs/outputs; overflowing nodes (measured on
    ``samples``; weights only when there are none) and ``op_block_list`` ops stay in float."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    unique_node_names(model)
    ranges = tensor_ranges(model, samples or [])
    kept = overflow_nodes(model, ranges)
    worst = tuple(sorted(((n, v) for n, v in ranges.items() if v > FP16_SAFE_MAX), key=lambda t: -t[1]))
    if kept:
        log.info("fp16: keeping %d node(s) in float for range: %s", len(kept), kept[:10])
    blocked_ops = sorted(set(op_block_list or ()) | set(DEFAULT_OP_BLOCK_LIST))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked_ops,
                                         node_block_list=sorted(set(kept) | set(node_block_list)) or None)
    drop_fp16_round_trips(converted.graph)
    topological_sort(converted.graph)
    onnx.checker.check_model(converted)
    return Fp16Conversion(converted, tuple(kept), worst)
