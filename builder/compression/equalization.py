"""Cross-layer equalisation of consecutive Convs: step ``equalize``.

After BatchNorm folding, the output channels of a Conv (a depthwise one above all) have ranges that
differ by 100x and more; per-tensor int8 activations then waste their levels on a few channels and
crush the rest. For two Convs in a row with a positively homogeneous activation between them
(none or ReLU: ``relu(x / s) = relu(x) / s`` for ``s > 0``), dividing output channel i of the first
by ``s_i`` and multiplying input channel i of the second by ``s_i`` is an exact identity in float.
Nagel et al. (2019, "Data-Free Quantization Through Weight Equalization and Bias Correction") pick
``s_i = sqrt(r1_i / r2_i)`` (``r`` = the channel's weight range), which gives both layers the same
per-channel range ``sqrt(r1_i r2_i)``; iterating over a chain converges.

ReLU6 (``Clip(0, 6)``) is not homogeneous: ``relu6_as_relu = true`` treats it as ReLU (as the paper
does for MobileNetV2), which changes the float outputs wherever an activation exceeds 6; the default
leaves such pairs alone. Run after ``fold`` (the scales must see the folded BatchNorm) and before
``quantize``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from builder.compression.base import CompressionStep, ModelForm, ModelState, StepContext, StepRecord
from builder.errors import CompressionError, UsageError

log = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu", "Identity")


@dataclass(frozen=True)
class ConvPair:
    first: str  # node names
    second: str
    activation: Optional[str]  # op type between them, None when direct


def _groups(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _clip_bounds(node: Any, inits: dict[str, Any]) -> tuple[Optional[float], Optional[float]]:
    from onnx import numpy_helper

    low = next((a.f for a in node.attribute if a.name == "min"), None)
    high = next((a.f for a in node.attribute if a.name == "max"), None)
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in inits:
                return None, None
            value = float(numpy_helper.to_array(inits[node.input[index]]))
            low, high = (value, high) if index == 1 else (low, value)
    return low, high


def find_pairs(model: Any, relu6_as_relu: bool = False) -> list[ConvPair]:
    """Conv -> [Relu | ReLU6] -> Conv chains whose middle tensors have exactly one consumer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_consumer(tensor: str) -> Optional[Any]:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    def weighted_conv(node: Any) -> bool:
        return (node.op_type == "Conv" and node.input[1] in inits
                and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits))

    pairs = []
    for node in graph.node:
        if not weighted_conv(node):
            continue
        tensor = node.output[0]
        nxt = only_consumer(tensor)
        activation = None
        if nxt is not None and (nxt.op_type in HOMOGENEOUS
                                or nxt.op_type == "Clip" and relu6_as_relu and _clip_bounds(nxt, inits)[0] == 0.0):
            activation = nxt.op_type
            tensor = nxt.output[0]
            nxt = only_consumer(tensor)
        if nxt is None or not weighted_conv(nxt) or nxt.input[0] != tensor:
            continue
        out_channels = inits[node.input[1]].dims[0]
        second = inits[nxt.input[1]].dims
        groups = _groups(nxt)
        if _groups(node) != 1 and _groups(node) != out_channels:
            continue  # grouped (not depthwise) first conv: channel blocks do not line up simply
        if groups == 1 and second[1] == out_channels or groups == out_channels and second[1] == 1:
            pairs.append(ConvPair(node.name, nxt.name, activation))
    return pairs


def _channel_range(weight: np.ndarray, axis: int, depthwise: bool) -> np.ndarray:
    if depthwise:  # [C, 1, kh, kw]: input channel i is output channel i
        return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    moved = np.moveaxis(np.abs(weight), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def equalize(model: Any, pairs: list[ConvPair], iterations: int = 4, max_scale: float = 1e4) -> dict[str, float]:
    """Equalise every pair in place, ``iterations`` sweeps; returns the mean range spread before/after."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    def spread() -> float:
        values = []
        for pair in pairs:
            w = array(nodes[pair.first].input[1])
            r = _channel_range(w, 0, False)
            values.append(float(r.max() / max(r.min(), 1e-12)))
        return float(np.mean(values)) if values else 1.0

    before = spread()
    for _ in range(iterations):
        for pair in pairs:
            first, second = nodes[pair.first], nodes[pair.second]
            w1, w2 = array(first.input[1]), array(second.input[1])
            depthwise2 = _groups(second) == w2.shape[0] and w2.shape[1] == 1
            r1 = _channel_range(w1, 0, False)
            r2 = _channel_range(w2, 1, depthwise2) if not depthwise2 else _channel_range(w2, 0, True)
            alive = (r1 > 0) & (r2 > 0)
            scale = np.ones_like(r1)
            scale[alive] = np.sqrt(r1[alive] / r2[alive])
            scale = np.clip(scale, 1 / max_scale, max_scale)
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            arrays[first.input[1]] = w1 / scale.reshape(shape1)
            if len(first.input) > 2 and first.input[2]:
                arrays[first.input[2]] = array(first.input[2]) / scale
            if depthwise2:
                arrays[second.input[1]] = w2 * scale.reshape(shape1)
            else:
                arrays[second.input[1]] = w2 * scale.reshape((1, -1) + (1,) * (w2.ndim - 2))
    after = spread()
    for name, value in arrays.items():
        dtype = numpy_helper.to_array(inits[name]).dtype
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return {"range_spread_before": round(before, 2), "range_spread_after": round(after, 2)}


@dataclass(frozen=True)
class EqualizeStep(CompressionStep):
    """Cross-layer equalisation of Conv -> (ReLU) -> Conv pairs on the ONNX graph (see module doc)."""

    name: ClassVar[str] = "equalize"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    iterations: int = 4
    relu6_as_relu: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise UsageError(f"iterations must be >= 1, got {self.iterations}")

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx

        from builder.atomic_files import atomic_write_bytes

        if state.onnx_path is None:
            raise CompressionError("equalize needs an ONNX model; the engine exports before graph steps")
        model = onnx.load(str(state.onnx_path))
        pairs = find_pairs(model, self.relu6_as_relu)
        facts: dict[str, Any] = {"pairs": len(pairs)}
        warnings: list[str] = []
        if pairs:
            facts.update(equalize(model, pairs, self.iterations))
            if self.relu6_as_relu and any(p.activation == "Clip" for p in pairs):
                warnings.append("ReLU6 treated as ReLU between equalised convs: float outputs change where "
                                "activations exceed 6")
        else:
            warnings.append("no Conv -> (ReLU) -> Conv pair to equalise (run fold first; SiLU/ReLU6 pairs "
                            "are not homogeneous)")
        out = Path(ctx.workdir) / "model.onnx"
        atomic_write_bytes(out, model.SerializeToString())
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts, warnings=tuple(warnings))
