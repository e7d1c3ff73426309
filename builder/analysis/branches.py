"""Count the ``If`` branch a run takes: evaluate each condition, inline the branch it selects.

An ``If`` whose condition depends only on constants and on input *shapes* (the Squeeze/Unsqueeze
guards exporters write around RNNs) is evaluated with ONNX Runtime on placeholder inputs of the
given shapes; one that depends on input *values* (a voice-activity model's 0-d ``sr`` selecting the
16 kHz or the 8 kHz network) is evaluated only when those values are given — placeholder values
would pick an arbitrary branch. Evaluation runs only the nodes the condition needs. The chosen branch
is inlined (its nodes replace the ``If``, an ``Identity`` carries each branch output to the ``If``
output), so shape inference and the per-layer walk see a flat graph. Conditions that cannot be
evaluated are left to ``graph_stats``, which counts the larger branch and says so.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli"})
MAX_ROUNDS = 64  # nested Ifs are inlined round by round; real models need a handful


def resolve_branches(model: Any, input_shapes: Mapping[str, Sequence[int]],
                     input_values: Mapping[str, Any] | None = None) -> tuple[Any, list[str]]:
    """``(model with every evaluable top-level If inlined, notes)``; the input model is not changed."""
    values = dict(input_values or {})
    if not any(node.op_type == "If" for node in model.graph.node):
        return model, []
    flat = copy.deepcopy(model)
    notes: list[str] = []
    for _ in range(MAX_ROUNDS):
        candidates = []
        for node in flat.graph.node:
            if node.op_type != "If" or not node.input:
                continue
            needed = value_dependencies(flat.graph, node.input[0])
            if needed is not None and needed <= set(values):
                candidates.append((node, needed))
        if not candidates:
            break
        conditions = evaluate_tensors(flat, [node.input[0] for node, _ in candidates], input_shapes, values)
        if not conditions:
            break
        for node, needed in candidates:
            if node.input[0] not in conditions:
                continue
            taken = "then_branch" if bool(conditions[node.input[0]].reshape(-1)[0]) else "else_branch"
            if needed:
                given = ", ".join(f"{name}={_show(values[name])}" for name in sorted(needed))
                notes.append(f"If '{node.name or node.input[0]}': {taken.split('_')[0]} branch taken ({given})")
            index = list(flat.graph.node).index(node)
            inline_branch(flat, index, taken)
    for node in flat.graph.node:
        if node.op_type == "If":
            needed = value_dependencies(flat.graph, node.input[0]) or set()
            missing = sorted(needed - set(values))
            if missing:
                notes.append(f"If '{node.name}': its condition depends on the value of {', '.join(missing)}, which "
                             f"was not given (--data); counting the larger branch")
    return flat, notes


def value_dependencies(graph: Any, name: str) -> set[str] | None:
    """Graph inputs whose *values* ``name`` depends on (``Shape``/``Size`` depend on shapes only);
    None when it depends on a random op (never evaluable)."""
    producers = {out: node for node in graph.node for out in node.output if out}
    inputs = {value.name for value in graph.input} - {init.name for init in graph.initializer}
    seen: dict[str, set[str] | None] = {}

    def walk(tensor: str) -> set[str] | None:
        if tensor in seen:
            return seen[tensor]
        seen[tensor] = set()  # cycles cannot occur in a valid graph; this guards the recursion
        if tensor in inputs:
            result: set[str] | None = {tensor}
        elif tensor not in producers:
            result = set()
        else:
            node = producers[tensor]
            if node.op_type in NONDETERMINISTIC:
                result = None
            elif node.op_type in SHAPE_ONLY_OPS:
                result = set()
            else:
                result = set()
                for dep in [n for n in node.input if n] + sorted(outer_references(node)):
                    sub = walk(dep)
                    if sub is None:
                        result = None
                        break
                    result |= sub
        seen[tensor] = result
        return result

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph.node) + 1000))
    try:
        return walk(name)
    finally:
        sys.setrecursionlimit(limit)


def outer_references(node: Any) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    from onnx import AttributeProto

    refs: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
        for graph in graphs:
            refs |= _graph_outer_references(graph)
    return refs


def _graph_outer_references(graph: Any) -> set[str]:
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used |= {name for name in node.input if name and name not in defined}
        used |= outer_references(node) - defined
        defined |= {out for out in node.output if out}
    used |= {v.name for v in graph.output if v.name not in defined}
    return used


def evaluate_tensors(model: Any, names: Sequence[str], input_shapes: Mapping[str, Sequence[int]],
                     input_values: Mapping[str, Any]) -> dict[str, Any]:
    """Values of ``names`` from a run of only the nodes they need (given values, else placeholders:
    random floats, ones for integers); {} when that run fails (logged)."""
    import numpy as np
    from onnx import helper

    from builder.execution.sessions import open_session

    graph = model.graph
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    needed_nodes: set[int] = set()
    needed_tensors: set[str] = set()
    stack = list(names)
    while stack:
        tensor = stack.pop()
        if tensor in needed_tensors:
            continue
        needed_tensors.add(tensor)
        index = producers.get(tensor)
        if index is not None and index not in needed_nodes:
            needed_nodes.add(index)
            node = graph.node[index]
            stack.extend(n for n in node.input if n)
            stack.extend(outer_references(node))
    inits = [init for init in graph.initializer if init.name in needed_tensors]
    init_names = {init.name for init in inits}
    inputs = [value for value in graph.input if value.name in needed_tensors and value.name not in init_names]
    outputs = [helper.make_empty_tensor_value_info(name) for name in names]
    sub = helper.make_graph([graph.node[i] for i in sorted(needed_nodes)], "condition", inputs, outputs,
                            initializer=inits)
    probe = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    rng = np.random.default_rng(0)
    feeds = {}
    for value in inputs:
        elem = value.type.tensor_type.elem_type
        dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else np.dtype("float32")
        if value.name in input_values:
            feeds[value.name] = np.asarray(input_values[value.name], dtype=dtype)
            continue
        shape = tuple(int(d) for d in input_shapes.get(value.name, ()))
        feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                             else np.ones(shape, dtype=dtype))
    try:
        session = open_session(probe, threads=1, level="disabled", log_severity=4)
        results = session.run(list(names), feeds)
    except Exception as exc:  # onnxruntime's pybind error types
        log.warning("could not evaluate %d If condition(s) with ONNX Runtime (%s); counting the larger branch",
                    len(names), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return {}
    return {name: np.asarray(value) for name, value in zip(names, results)}


def inline_branch(model: Any, index: int, branch: str) -> None:
    """Replace the ``If`` at ``graph.node[index]`` by the nodes of ``branch`` (in place). Branch-local
    names that clash with names of the enclosing graph are renamed."""
    from onnx import AttributeProto, helper

    graph = model.graph
    node = graph.node[index]
    sub = next(attr.g for attr in node.attribute if attr.name == branch and attr.type == AttributeProto.GRAPH)
    outer = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    for other in graph.node:
        if other is not node:
            outer |= {out for out in other.output if out}
    local = {out for n in sub.node for out in n.output if out} | {i.name for i in sub.initializer}
    rename = {}
    for name in sorted(local & (outer | set(node.output))):
        fresh, count = f"{node.name or 'If'}/{name}", 0
        while fresh in outer or fresh in local:
            count += 1
            fresh = f"{node.name or 'If'}/{name}_{count}"
        rename[name] = fresh
    new_nodes = [copy.deepcopy(n) for n in sub.node]
    for n in new_nodes:
        _rename_tensors(n, rename)
    branch_outputs = [rename.get(v.name, v.name) for v in sub.output]
    for i, (source, target) in enumerate(zip(branch_outputs, node.output)):
        if target:
            new_nodes.append(helper.make_node("Identity", [source], [target], name=f"{node.name or 'If'}/out{i}"))
    for init in sub.initializer:
        added = copy.deepcopy(init)
        added.name = rename.get(init.name, init.name)
        graph.initializer.append(added)
    for value in sub.value_info:
        added = copy.deepcopy(value)
        added.name = rename.get(value.name, value.name)
        graph.value_info.append(added)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[:index] + new_nodes + nodes[index + 1:])


def _rename_tensors(node: Any, rename: Mapping[str, str]) -> None:
    """Apply ``rename`` to a node's inputs and outputs and to the outer references of its subgraphs."""
    from onnx import AttributeProto

    if not rename:
        return
    for i, name in enumerate(node.input):
        node.input[i] = rename.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = rename.get(name, name)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs) if attr.type == AttributeProto.GRAPHS else []
        for graph in graphs:
            shadowed = {v.name for v in graph.input} | {i.name for i in graph.initializer}
            inner = {k: v for k, v in rename.items() if k not in shadowed}
            for sub_node in graph.node:
                _rename_tensors(sub_node, inner)
            for value in graph.output:
                value.name = inner.get(value.name, value.name)


def _show(value: Any) -> str:
    import numpy as np

    array = np.asarray(value)
    return str(array.reshape(-1)[0].item()) if array.size == 1 else f"array{list(array.shape)}"
