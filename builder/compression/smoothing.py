"""Activation smoothing (SmoothQuant) on an ONNX graph: step ``smooth``.

Transformers carry a few activation channels with values 10-20x larger than the rest (MiniLM's
FFN inputs, measured: max/median per-channel range up to ~20). Per-tensor int8 activation
quantization then wastes its range on those channels. Smoothing divides each input channel k of a
weighted op's activation by s_k and multiplies row k of the weight by s_k, an exact identity in
float:  X @ W == (X / s) @ (s * W),  with  s_k = max|X_k|^alpha / max|W_k|^(1 - alpha).
alpha moves quantization difficulty from activations (alpha -> 1) to weights.

The 1/s goes into the producing LayerNormalization's gamma and beta when every consumer of its
output is a smoothed op; otherwise into an explicit Mul (one cheap elementwise op per tensor).
ORT's own SmoothQuant option needs neural-compressor 2.x (FACTS.md), hence this module.
Weighted ops handled: MatMul with a constant 2-D weight, com.microsoft Attention (packed QKV weight).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import CompressionError, DataError, UsageError

log = logging.getLogger(__name__)

WEIGHTED_OPS = {("", "MatMul"), ("com.microsoft", "Attention")}


def smoothable_nodes(model: Any) -> list[Any]:
    """Nodes whose input 0 is an activation and input 1 a constant 2-D weight [in, out]."""
    inits = {init.name: init for init in model.graph.initializer}
    return [node for node in model.graph.node
            if (node.domain, node.op_type) in WEIGHTED_OPS and len(node.input) > 1
            and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] not in inits]


def activation_stats(model: Any, batches: Iterable[dict[str, np.ndarray]], tensor_names: list[str],
                     keep_samples: int = 0, threads: int = 1
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel (last axis) max |x| of the named tensors over all batches, every position included
    (dynamic quantization sees padding positions too), and the first ``keep_samples`` samples of each
    tensor as [samples, positions, channels] (for choosing alpha by simulated quantization error)."""
    from builder.execution.sessions import session_with_outputs

    try:  # unoptimised: the probed tensors must survive as outputs exactly as they are in the graph
        session = session_with_outputs(model, tensor_names, threads=threads, log_severity=3)
    except Exception as exc:  # ORT's own error types
        raise CompressionError(f"cannot run the model to measure activation ranges: {exc}") from exc
    wanted = {i.name for i in session.get_inputs()}
    output_names = [out.name for out in session.get_outputs()]
    ranges: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in tensor_names}
    kept = 0
    seen = 0
    for batch in batches:
        seen += 1
        size = len(next(iter(batch.values())))
        take = max(0, min(size, keep_samples - kept))
        for name, value in zip(output_names, session.run(None, {k: v for k, v in batch.items() if k in wanted})):
            if name in samples:
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[name] = np.maximum(ranges[name], channel_max) if name in ranges else channel_max
                if take and value.shape[0] == size:
                    samples[name].append(value[:take].reshape(take, -1, value.shape[-1]))
        kept += take
    if not seen:
        raise DataError("smoothing needs calibration batches; pass --data")
    return ranges, {k: np.concatenate(v) for k, v in samples.items() if v}


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    x_max, w_max = np.maximum(x_max.astype(np.float64), 1e-5), np.maximum(w_max.astype(np.float64), 1e-5)
    return np.clip(np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha), 1e-4, 1e4).astype(np.float32)


def _fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """uint8 asymmetric per-tensor quantization of each sample, as ORT's DynamicQuantizeLinear does."""
    axes = tuple(range(1, x.ndim))
    low = np.minimum(x.min(axis=axes, keepdims=True), 0.0)
    high = np.maximum(x.max(axis=axes, keepdims=True), 0.0)
    scale = np.maximum((high - low) / 255.0, 1e-12)
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """int8 symmetric per-output-channel (column) quantization of a [in, out] weight."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True) / 127.0, 1e-12)
    return np.clip(np.round(w / scale), -127, 127) * scale


def quantization_error(x: np.ndarray, weights: list[np.ndarray], scale: Optional[np.ndarray]) -> float:
    """Relative output error of int8 (dynamic activations, per-channel weights) X @ W, smoothed by ``scale``."""
    xs = x if scale is None else x / scale
    qx = _fake_quant_activation(xs).reshape(-1, x.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    num = den = 0.0
    for w in weights:
        ws = w if scale is None else w * scale[:, None]
        exact = flat @ w
        num += float(np.square(qx @ _fake_quant_weight(ws) - exact).sum())
        den += float(np.square(exact).sum())
    return (num / max(den, 1e-30)) ** 0.5


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def choose_alphas(model: Any, ranges: dict[str, np.ndarray], samples: dict[str, np.ndarray],
                  grid: Sequence[float] = ALPHA_GRID) -> dict[str, dict[str, Any]]:
    """Per activation tensor, the alpha (or None: leave unsmoothed) with the smallest simulated int8
    error of its consumers' outputs on the calibration samples. SmoothQuant's per-layer auto-alpha."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in smoothable_nodes(model):
        groups.setdefault(node.input[0], []).append(node)
    chosen: dict[str, dict[str, Any]] = {}
    for tensor, nodes in groups.items():
        if tensor not in samples or tensor not in ranges:
            continue
        x = samples[tensor].astype(np.float32)
        weights = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float32) for node in nodes]
        if any(w.shape[0] != x.shape[-1] for w in weights):
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        best_alpha, best_error = None, quantization_error(x, weights, None)
        plain = best_error
        for alpha in grid:
            error = quantization_error(x, weights, smoothing_scale(ranges[tensor], w_max, alpha))
            if error < best_error:
                best_alpha, best_error = alpha, error
        chosen[tensor] = {"alpha": best_alpha, "error": round(best_error, 5), "error_unsmoothed": round(plain, 5)}
    return chosen


def smooth_model(model: Any, ranges: dict[str, np.ndarray], alpha: Union[float, Mapping[str, Optional[float]]],
                 min_outlier_ratio: float = 0.0, fold_into_layernorm: bool = True) -> list[dict[str, Any]]:
    """Smooth ``model`` in place; returns one record per smoothed activation tensor.

    ``alpha`` is one value for every tensor or a per-tensor map (None or absent: leave it). Only tensors whose channel range ratio (max / median of per-channel max|x|) is at least
    ``min_outlier_ratio`` are touched; every consumer of a smoothed tensor gets the same scales.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in smoothable_nodes(model):
        groups.setdefault(node.input[0], []).append(node)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {out.name for out in graph.output}
    records = []
    for tensor, nodes in groups.items():
        if tensor not in ranges:
            continue
        x_max = np.maximum(ranges[tensor].astype(np.float64), 1e-5)
        ratio = float(x_max.max() / np.median(x_max))
        tensor_alpha = alpha.get(tensor) if isinstance(alpha, Mapping) else alpha
        if ratio < min_outlier_ratio or tensor_alpha is None:
            continue
        weights = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float64) for node in nodes]
        if any(w.shape[0] != x_max.shape[0] for w in weights):
            continue
        scale = smoothing_scale(x_max, np.max([np.abs(w).max(axis=1) for w in weights], axis=0), tensor_alpha)
        for node, weight in zip(nodes, weights):
            new_name = f"{node.input[1]}_smoothed_{len(graph.initializer)}"
            graph.initializer.append(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), new_name))
            node.input[1] = new_name
        producer = producers.get(tensor)
        foldable = (fold_into_layernorm and producer is not None and producer.op_type == "LayerNormalization"
                    and tensor not in graph_outputs and len(producer.output) >= 1 and producer.output[0] == tensor
                    and all(c in nodes for c in consumers.get(tensor, []))
                    and all(name in inits for name in producer.input[1:3]) and len(producer.input) >= 3)
        if foldable and producer is not None:
            for index in (1, 2):
                array = numpy_helper.to_array(inits[producer.input[index]]).astype(np.float64) / scale
                new_name = f"{producer.input[index]}_smoothed_{len(graph.initializer)}"
                graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), new_name))
                producer.input[index] = new_name
            where = "layernorm"
        else:
            scale_name, smoothed = f"{tensor}_smooth_scale", f"{tensor}_smoothed"
            graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), scale_name))
            mul = helper.make_node("Mul", [tensor, scale_name], [smoothed], name=f"{tensor}_smooth_mul")
            first = min(list(graph.node).index(node) for node in nodes)
            graph.node.insert(first, mul)
            for node in nodes:
                node.input[0] = smoothed
            where = "mul"
        records.append({"tensor": tensor, "alpha": tensor_alpha, "consumers": [node.name for node in nodes], "outlier_ratio": round(ratio, 2),
                        "folded_into": where})
    _drop_unused_initializers(model)
    return records


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


@dataclass(frozen=True)
class SmoothStep(CompressionStep):
    """Per-channel activation smoothing before int8 quantization (needs calibration data)."""

    name: ClassVar[str] = "smooth"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = StepOrder(before=("quantize",))  # it moves range into the weights quantize rounds
    # One value for every tensor, or "auto": per tensor, the alpha (or none) with the least simulated
    # int8 error on the calibration samples. MiniLM, measured: 0.85 best (0.5 hurt per-channel dynamic
    # int8; "auto" picked 0.6-0.95 per tensor but gave lower neighbour agreement than a flat 0.85).
    alpha: Union[float, str] = 0.85
    min_outlier_ratio: float = 0.0  # smooth only tensors whose max/median channel range is at least this
    calibration_samples: int = 128
    error_samples: int = 8  # samples kept in memory for the "auto" error simulation

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise UsageError(f"smooth alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise UsageError(f"smooth alpha must be in [0, 1] or 'auto', got {self.alpha}")

    def requires_data(self) -> bool:
        return True

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        if not (options.has_matmul and options.usable("quantize")):  # only before int8 quantization of MatMuls
            return ()
        return (SearchParam("use_smooth", (False, True)), SearchParam("smooth_alpha", (0.5, 0.7, 0.85)))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if values.get("quant_mode", "none") not in ("dynamic", "static") or not values.get("use_smooth"):
            return ()
        return (SearchEntry({"alpha": float(values["smooth_alpha"])}),)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx

        if state.onnx_path is None:
            raise CompressionError("smooth needs an ONNX model")
        if ctx.calibration_batches is None:
            raise DataError("smooth needs calibration data to measure activation ranges; pass --data")
        model = onnx.load(str(state.onnx_path))
        from builder.compression.quantization import limit_samples

        tensors = sorted({node.input[0] for node in smoothable_nodes(model)})
        auto = self.alpha == "auto"
        ranges, samples = activation_stats(model, limit_samples(ctx.calibration_batches(), self.calibration_samples),
                                           tensors, keep_samples=self.error_samples if auto else 0)
        facts: dict[str, Any] = {}
        if auto:
            choice = choose_alphas(model, ranges, samples)
            alphas: Union[float, dict[str, Optional[float]]] = {t: c["alpha"] for t, c in choice.items()}
            facts["simulated_error"] = choice
        else:
            alphas = float(self.alpha)
        records = smooth_model(model, ranges, alphas, self.min_outlier_ratio)
        out = Path(ctx.workdir) / "model.onnx"
        tmp = out.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(out)
        facts.update(smoothed_tensors=len(records), smoothed=records)
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts,
            warnings=() if records else ("no weighted op found to smooth",))

