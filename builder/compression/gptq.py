"""GPTQ weight rounding for int8 models written by ``onnxruntime.quantization`` (``quantize``
step, ``weight_rounding = "gptq"``).

Round-to-nearest picks each int8 weight alone. GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") rounds the inputs of a layer
one after the other and spreads each rounding error over the not-yet-rounded weights, weighted by
the inverse Hessian ``H = XᵀX`` of the layer's real inputs on calibration data — so the layer's
*outputs* on that data move as little as possible. Measured on MiniLM (smoothed, per-channel uint8
dynamic int8): nearest-neighbour agreement with fp32 93.0% → 96.3%, cosine 0.9968 → 0.9976, same
graph and speed.

Why after ORT and not instead of it: ORT's quantizer has already chosen the scales, zero points and
the graph (DynamicQuantizeMatMul, QAttention, QDQ pairs); only the integer values of weight
initializers (``W_quantized`` beside ``W_scale`` and ``W_zero_point``) are replaced, under the
same scales, so every kernel and fusion stays exactly as ORT built it.

Covered: weights of MatMul and (com.microsoft) Attention nodes laid out ``[K, N]`` with a scalar or
per-column (axis 1) scale. Others (Conv, Gemm, embeddings) keep ORT's rounding and are listed.
Rows of padding do not count: when the model has an ``attention_mask``-like input whose shape is the
activation's leading dimensions, only positions where it is 1 enter ``H``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from builder.errors import CompressionError

log = logging.getLogger(__name__)

GPTQ_OPS = ("MatMul", "Attention")
DEFAULT_DAMP = 0.01  # fraction of the mean diagonal added to H (the paper's default)
BLOCK = 128


@dataclass
class RoundingReport:
    """What GPTQ changed, with the layer-wise error proxy ``tr(ΔWᵀ H ΔW)`` before and after."""

    rounded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    changed_fraction: float = 0.0
    error_nearest: float = 0.0
    error_gptq: float = 0.0

    def as_facts(self) -> dict[str, Any]:
        return {"gptq_rounded": len(self.rounded), "gptq_skipped": self.skipped,
                "gptq_changed_fraction": round(self.changed_fraction, 4),
                "gptq_layer_error_ratio": round(self.error_gptq / self.error_nearest, 4) if self.error_nearest else None}


class Hessians:
    """``XᵀX / n`` of every quantizable layer's input, collected once from the float model.

    The float model's activations do not depend on which nodes are later kept in float, so one
    collection serves every candidate of a mixed-precision search.
    """

    def __init__(self, float_path: Path, batches: Iterable[dict[str, np.ndarray]]) -> None:
        import onnx

        from onnx import numpy_helper

        model = onnx.load(str(float_path))
        inits = {i.name: i for i in model.graph.initializer}
        self.layer_inputs: dict[str, str] = {}  # weight initializer -> activation tensor
        self.weights: dict[str, np.ndarray] = {}  # the float weights GPTQ rounds (read once, not per candidate)
        for node in model.graph.node:
            if node.op_type in GPTQ_OPS and len(node.input) > 1 and node.input[1] in inits:
                self.layer_inputs[node.input[1]] = node.input[0]
                self.weights[node.input[1]] = numpy_helper.to_array(inits[node.input[1]])
        self.matrices: dict[str, np.ndarray] = {}
        self._collect(model, list(batches))

    def _collect(self, model: Any, batches: list[dict[str, np.ndarray]]) -> None:
        from builder.execution.sessions import session_with_outputs

        if not batches:
            raise CompressionError("GPTQ rounding needs calibration data; pass --data")
        wanted = sorted(set(self.layer_inputs.values()))
        session = session_with_outputs(model, wanted)
        names = [o.name for o in session.get_outputs()]
        input_names = {i.name for i in session.get_inputs()}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for batch in batches:
            feed = {k: v for k, v in batch.items() if k in input_names}
            outputs = dict(zip(names, session.run(None, feed)))
            for name in wanted:
                rows = _rows(outputs[name], feed)
                sums[name] = sums.get(name, 0) + rows.T @ rows
                counts[name] = counts.get(name, 0) + len(rows)
        for name in wanted:
            self.matrices[name] = sums[name] / max(counts[name], 1)


def _rows(activation: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The activation as ``[rows, K]`` float64, without padded positions when a mask says which."""
    matrix = activation.reshape(-1, activation.shape[-1]).astype(np.float64)
    if activation.ndim >= 3:
        for name, value in feed.items():
            if "mask" in name.lower() and value.shape == activation.shape[:-1]:
                return matrix[value.reshape(-1).astype(bool)]
    return matrix


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                  low: int, high: int, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Integer weights for ``weight`` ``[K, N]`` under fixed per-column ``scale``/``zero_point``.

    Inputs are processed in order of decreasing ``H`` diagonal ("act order"), the most influential
    first, so their errors are the ones compensated by the most remaining weights.
    """
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    scale = np.broadcast_to(np.asarray(scale, np.float64), (w.shape[1],))
    zero_point = np.broadcast_to(np.asarray(zero_point, np.float64), (w.shape[1],))
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[order][:, order]
    h += damp * float(np.mean(np.diag(h))) * np.eye(len(h))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError as exc:
        raise CompressionError(f"GPTQ: the layer's Hessian is not positive definite ({exc}); raise gptq_damp") from exc
    q = np.empty_like(w)
    for start in range(0, w.shape[0], BLOCK):  # the paper's lazy batch updates: rows inside a block,
        stop = min(start + BLOCK, w.shape[0])  # one matrix product for the rest
        errors = np.empty((stop - start, w.shape[1]))
        for k in range(start, stop):
            row = np.clip(np.round(w[k] / scale + zero_point), low, high)
            error = (w[k] - (row - zero_point) * scale) / upper[k, k]
            w[k + 1:stop] -= np.outer(upper[k, k + 1:stop], error)
            q[k], errors[k - start] = row, error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return q[np.argsort(order)]


def _layer_error(weight: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 hessian: np.ndarray) -> float:
    delta = weight.astype(np.float64) - (q.astype(np.float64) - zero_point) * scale
    return float(np.sum(delta * (hessian @ delta)))


def round_weights(quantized_path: Path, hessians: Hessians, damp: float = DEFAULT_DAMP) -> RoundingReport:
    """Replace the integer weights of ``quantized_path`` (in place) by GPTQ's choice."""
    import onnx
    from onnx import numpy_helper

    from builder.atomic_files import atomic_write_bytes

    model = onnx.load(str(quantized_path))
    inits = {i.name: i for i in model.graph.initializer}
    report = RoundingReport()
    changed = total = 0
    for weight_name, activation in hessians.layer_inputs.items():
        q_init = inits.get(weight_name + "_quantized")
        if q_init is None:
            report.skipped[weight_name] = "kept in float"
            continue
        weight = hessians.weights[weight_name]
        q_old = numpy_helper.to_array(q_init)
        scale = numpy_helper.to_array(inits[weight_name + "_scale"]).astype(np.float64)
        zero_point = numpy_helper.to_array(inits[weight_name + "_zero_point"]).astype(np.float64)
        if weight.ndim != 2 or q_old.shape != weight.shape or scale.size not in (1, weight.shape[1]):
            report.skipped[weight_name] = f"layout {weight.shape} / scale {scale.shape} not [K, N] per column"
            continue
        hessian = hessians.matrices[activation]
        # The levels ORT used (e.g. -127..127 symmetric, -64..64 with reduce_range, 0..255 uint8):
        # per-column scales put each column's extreme exactly on a limit, so the tensor's range is it.
        low, high = int(q_old.min()), int(q_old.max())
        q_new = gptq_quantize(weight, hessian, scale.reshape(-1), zero_point.reshape(-1), low, high, damp)
        report.error_nearest += _layer_error(weight, q_old, scale, zero_point, hessian)
        report.error_gptq += _layer_error(weight, q_new, scale, zero_point, hessian)
        changed += int((q_new != q_old).sum())
        total += q_old.size
        q_init.CopyFrom(numpy_helper.from_array(q_new.astype(q_old.dtype), q_init.name))
        report.rounded.append(weight_name)
    report.changed_fraction = changed / total if total else 0.0
    atomic_write_bytes(Path(quantized_path), model.SerializeToString())
    log.info("GPTQ rounded %d layers (%.1f%% of weights changed), layer error x%.3f", len(report.rounded),
             100 * report.changed_fraction, report.error_gptq / report.error_nearest if report.error_nearest else 1)
    return report
