"""ONNX -> PyTorch module that ``litert-torch`` can export, so an ONNX-only model gets a ``.tflite``.

The path (see docs/android.md for why this one and not onnx2tf): freeze the graph's inputs to the
sample's shapes and constant-fold it with onnxslim (so ``Shape`` chains become constants), convert
with ``onnx2torch``, then inline its small constant tensors (shape/axes/scales/clip bounds) into the
fx graph as ``torch.tensor`` literals. onnx2torch keeps those as buffers and calls ``.tolist()`` or
``.item()`` on them; ``torch.export`` lifts buffers to graph inputs, so every such call is a
data-dependent guard ("Could not guard on data-dependent expression Eq(u0, 1)"). Inlined literals,
with fake-tensor constant propagation raised to their size during export
(``constant_propagation_for_export``), resolve to real values instead.

An op that cannot convert is found before any heavy work (``first_unconvertible``) or mapped back to
its ONNX node from the failing frame (``node_of_failure``), so the caller can name it and take the
device profile's fallback runtime.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from builder.errors import TargetError, UnsupportedOpError

log = logging.getLogger(__name__)

ONNX2TORCH_VERSION = "1.5.15"
INSTALL_HINT = (f"pip install --no-deps onnx2torch=={ONNX2TORCH_VERSION} (--no-deps: it requires torchvision, which "
                "does not import beside torch 2.13 and would pull another torch)")
# Constant tensors up to this many elements are inlined as literals (shape vectors, axes, scales,
# pads, clip bounds); bigger ones are weights and stay buffers.
INLINE_MAX_ELEMENTS = 64
# ONNX ops with no TFLite builtin: litert-torch would need Flex ops the runtime lacks. Control flow
# (If/Loop/Scan) has no onnx2torch converter either.
TFLITE_UNSUPPORTED = frozenset({"NonMaxSuppression", "RoiAlign", "Loop", "Scan", "If", "Unique", "StringNormalizer",
                                "TfIdfVectorizer", "Col2Im", "DeformConv", "GridSample", "STFT", "Einsum"})


@dataclass(frozen=True)
class UnconvertibleOp:
    """The first ONNX node LiteRT conversion cannot take, and why."""

    op_type: str
    node_name: str
    domain: str
    reason: str

    def describe(self) -> str:
        domain = f"{self.domain}::" if self.domain else ""
        return f"op {domain}{self.op_type} (node {self.node_name or '?'})"


class LiteRtConversionError(UnsupportedOpError):
    """An ONNX model cannot become a ``.tflite``; ``op`` names the node. A device profile with a
    fallback runtime builds for that runtime instead (``profile_build``)."""

    def __init__(self, op: UnconvertibleOp) -> None:
        super().__init__(f"LiteRT: {op.describe()} does not convert ({op.reason})")
        self.op = op


def import_onnx2torch() -> Any:
    """``onnx2torch``, imported even where torchvision is absent (its NMS/RoiAlign converters
    import it at module level; those ops are refused before conversion, see TFLITE_UNSUPPORTED)."""
    if sys.modules.get("onnx2torch") is not None:
        return sys.modules["onnx2torch"]
    placeholder = None
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        placeholder = _torchvision_placeholder()
    try:
        return importlib.import_module("onnx2torch")
    except ImportError as exc:
        raise TargetError(f"converting an ONNX model for LiteRT needs onnx2torch: {INSTALL_HINT}") from exc
    finally:
        if placeholder is not None:
            for name in placeholder:
                sys.modules.pop(name, None)


def _torchvision_placeholder() -> list[str]:
    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise TargetError("this op needs torchvision, which is not installed beside torch 2.13")

    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = package, ops
    return ["torchvision", "torchvision.ops"]


def first_unconvertible(model: Any) -> UnconvertibleOp | None:
    """The first node (graph order) with a custom domain, no TFLite builtin, or no onnx2torch
    converter for its opset. Cheap: no conversion is run."""
    onnx2torch = import_onnx2torch()
    registry = importlib.import_module("onnx2torch.node_converters.registry")
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for index, node in enumerate(model.graph.node):
        domain = node.domain if node.domain not in ("ai.onnx",) else ""
        name = node.name or f"#{index}"
        if domain:
            return UnconvertibleOp(node.op_type, name, domain, f"custom domain '{domain}' has no TFLite builtin")
        if node.op_type in TFLITE_UNSUPPORTED:
            return UnconvertibleOp(node.op_type, name, domain, "no TFLite builtin op")
        try:
            registry.get_converter(operation_type=node.op_type, version=opsets.get("", 13), domain="")
        except NotImplementedError:
            return UnconvertibleOp(node.op_type, name, domain,
                                   f"onnx2torch {getattr(onnx2torch, '__version__', ONNX2TORCH_VERSION)} has no converter at opset {opsets.get('', '?')}")
    return None


def freeze_and_fold(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The graph with inputs fixed to ``shapes`` and constants folded (onnxslim); the original
    graph when onnxslim fails (conversion may still work; verification judges the result)."""
    import onnxslim

    spec = [f"{name}:{','.join(str(d) for d in shape)}" for name, shape in shapes.items() if len(shape) > 0]
    try:
        return onnxslim.slim(model, input_shapes=spec or None, model_check=False)
    except Exception as exc:  # noqa: BLE001 - onnxslim is an optimisation here, not a requirement
        log.warning("onnxslim could not fold the graph (%s); converting it unfolded", str(exc).splitlines()[0] if str(exc) else exc)
        return model


def drop_trailing_empty_inputs(model: Any) -> int:
    """Remove trailing ``""`` inputs (an omitted optional input, the same as leaving it out):
    onnx2torch looks ``""`` up as a constant and refuses, e.g. a ``Clip(x, min, "")`` from
    torch.clamp(min=...) in MiniLM's mean pooling ("Dynamic value of min/max is not implemented")."""
    dropped = 0
    for node in model.graph.node:
        while len(node.input) and node.input[-1] == "":
            node.input.pop()
            dropped += 1
    return dropped


def onnx_to_torch(onnx_path: Path, samples: Mapping[str, np.ndarray]) -> tuple[Any, list[str], Mapping[str, str]]:
    """(module, input names in positional order, torch submodule name -> ONNX op type).

    ``samples`` fixes the static shapes. Raises ``LiteRtConversionError`` naming the node that
    onnx2torch cannot take.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    found = first_unconvertible(model)
    if found is not None:
        raise LiteRtConversionError(found)
    init_names = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init_names]
    folded = freeze_and_fold(model, {n: tuple(np.shape(samples[n])) for n in names if n in samples})
    drop_trailing_empty_inputs(folded)
    onnx2torch = import_onnx2torch()
    try:
        module = onnx2torch.convert(folded)
    except NotImplementedError as exc:  # a converter refused an attribute (e.g. Reshape allowzero=1)
        raise LiteRtConversionError(_node_refused_by_converter(folded) or
                                    UnconvertibleOp("?", "?", "", f"onnx2torch: {exc}")) from exc
    except Exception as exc:  # noqa: BLE001 - onnx2torch raises plain exceptions on odd graphs
        raise TargetError(f"onnx2torch could not convert the model: {_first_line(exc)}") from exc
    graph = importlib.import_module("onnx2torch.onnx_graph").OnnxGraph(folded.graph)
    op_types = {name: node.operation_type for name, node in graph.nodes.items()}
    inline_small_constants(module)
    bind_constant_slices(module)
    return module.eval(), names, op_types


def _node_refused_by_converter(model: Any) -> UnconvertibleOp | None:
    """Run onnx2torch's converters one node at a time to find the one that raised."""
    import_onnx2torch()
    registry = importlib.import_module("onnx2torch.node_converters.registry")
    graph_mod = importlib.import_module("onnx2torch.onnx_graph")
    graph = graph_mod.OnnxGraph(model.graph)
    opset = {o.domain or "": o.version for o in model.opset_import}.get("", 13)
    for node in graph.nodes.values():
        try:
            registry.get_converter(operation_type=node.operation_type, version=opset, domain=node.domain)(node, graph)
        except NotImplementedError as exc:
            return UnconvertibleOp(node.operation_type, node.name, node.domain, f"onnx2torch: {exc}")
        except Exception:  # noqa: BLE001 - only NotImplementedError identifies the refusing node
            continue
    return None


def inline_small_constants(module: Any, max_elements: int = INLINE_MAX_ELEMENTS) -> int:
    """Replace ``get_attr`` nodes of small constant buffers by ``torch.tensor(<literal>)``; returns
    how many. Weights stay buffers (bigger than ``max_elements``)."""
    import torch

    graph = module.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        try:
            value = module.get_buffer(node.target)
        except AttributeError:
            continue
        if value.numel() > max_elements:
            continue
        with graph.inserting_before(node):
            literal = graph.call_function(torch.tensor, (value.tolist(),), {"dtype": value.dtype})
        node.replace_all_uses_with(literal)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    module.recompile()
    return replaced


def bind_constant_slices(module: Any) -> int:
    """Replace onnx2torch ``Slice`` modules whose starts/ends/axes/steps are inlined literals by a
    module holding the Python slices: onnx2torch computes them with ``.numpy()``, which fake
    tensors refuse (".numpy() is not supported for tensor subclasses", PP-OCRv4's recogniser).
    Returns how many were bound."""
    import torch

    slice_mod = importlib.import_module("onnx2torch.node_converters.slice")
    graph = module.graph
    bound = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), slice_mod.OnnxSlice):
            continue
        params = list(node.args[1:])
        if not all(isinstance(p, torch.fx.Node) and p.op == "call_function" and p.target is torch.tensor for p in params):
            continue
        values = [torch.tensor(p.args[0], **p.kwargs) for p in params] + [None] * (4 - len(params))
        flip_dims, pos, neg = slice_mod._get_slices(*values)  # the converter's own arithmetic, run once here
        static = _StaticSlice([int(d) for d in flip_dims], _plain_slices(pos), _plain_slices(neg))
        module.add_submodule(node.target, static)
        node.args = (node.args[0],)
        bound += 1
    graph.eliminate_dead_code()
    module.recompile()
    return bound


def _plain_slices(items: Sequence[Any]) -> list[Any]:
    def plain(value: Any) -> Any:
        return None if value is None else int(value)

    return [item if not isinstance(item, slice) else slice(plain(item.start), plain(item.stop), plain(item.step))
            for item in items]


def _static_slice_class() -> type:
    import torch

    class StaticSlice(torch.nn.Module):
        """ONNX Slice with constant starts/ends/axes/steps, as Python slices."""

        def __init__(self, flip_dims: list[int], pos: list[Any], neg: list[Any]) -> None:
            super().__init__()
            self.flip_dims, self.pos, self.neg = flip_dims, pos, neg

        def forward(self, x: Any) -> Any:
            if self.flip_dims:
                x = torch.flip(x, dims=self.flip_dims)
            if self.pos:
                x = x[tuple(self.pos)]
            if self.neg:
                x = x[tuple(self.neg)]
            return x

    return StaticSlice


def _StaticSlice(flip_dims: list[int], pos: list[Any], neg: list[Any]) -> Any:  # noqa: N802 - a factory
    return _static_slice_class()(flip_dims, pos, neg)


@contextlib.contextmanager
def constant_propagation_for_export(max_elements: int = INLINE_MAX_ELEMENTS) -> Iterator[None]:
    """Let fake tensors carry the values of inlined constants up to ``max_elements`` (torch keeps
    only 1-element constants by default), so ``.tolist()`` on a shape vector is a real list."""
    fake_tensor: Any = importlib.import_module("torch._subclasses.fake_tensor")  # ModuleType has no attributes
    before = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = max(before, max_elements)
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = before


def node_of_failure(exc: BaseException, module: Any, op_types: Mapping[str, str]) -> UnconvertibleOp | None:
    """The ONNX node whose converted submodule was running when ``exc`` was raised (the deepest
    frame whose ``self`` is one of ``module``'s children), or None (e.g. a failure in lowering)."""
    names = {id(child): name for name, child in module.named_children()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and names[id(owner)] != "initializers":
            found = names[id(owner)]
        tb = tb.tb_next
    if found is None and exc.__cause__ is not None and exc.__cause__ is not exc:
        return node_of_failure(exc.__cause__, module, op_types)
    if found is None:
        return None
    return UnconvertibleOp(op_types.get(found, "?"), found, "", f"litert-torch: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["LiteRtConversionError", "UnconvertibleOp", "bind_constant_slices", "constant_propagation_for_export", "first_unconvertible",
           "freeze_and_fold", "import_onnx2torch", "inline_small_constants", "node_of_failure", "onnx_to_torch"]
