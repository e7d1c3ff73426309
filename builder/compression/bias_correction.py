"""Bias correction for static int8 models (``quantize`` step, ``bias_correction = true``).

Rounding a layer's weights to int8 shifts the mean of its outputs: ``E[(Wq - W) x] = (Wq - W) E[x]``
per output channel, not zero when a channel has few weights (a 3x3 depthwise filter has 9) or its
inputs are all positive (after ReLU). Nagel et al. (2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction") subtract that expected error from the bias; here ``E[x]`` is the
per-channel mean of the layer's real float input on the calibration data (one run of the float
model), so each layer's correction counts only its own weight error, never one already corrected
upstream.

The correction edits the int32 bias that ORT's QDQ quantizer wrote (``B_quantized`` under its scale
``in_scale x w_scale``): the graph, the scales and every kernel stay as ORT built them.
Covered: Conv (any group count) and Gemm / MatMul with a quantized bias input; others are listed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_SAMPLES = 64


@dataclass
class BiasReport:
    corrected: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    mean_shift: float = 0.0  # mean |correction| / mean |bias| over the corrected layers

    def as_facts(self) -> dict[str, Any]:
        return {"bias_corrected": len(self.corrected), "bias_skipped": len(self.skipped),
                "bias_relative_shift": round(self.mean_shift, 5)}


def _dequantize_source(node_by_output: dict[str, Any], inits: dict[str, Any], name: str) -> Any:
    """(DequantizeLinear node, its integer initializer) that produces ``name``, or None."""
    node = node_by_output.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
        return None
    return node


def _dequantized(node: Any, inits: dict[str, Any]) -> np.ndarray:
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] \
        else np.zeros_like(scale)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def correct_biases(float_path: Path, quantized_path: Path, batches: list[dict[str, np.ndarray]]) -> BiasReport:
    """Correct the int32 biases of ``quantized_path`` (in place) against the float model's inputs."""
    import onnx
    from onnx import numpy_helper

    from builder.atomic_files import atomic_write_bytes
    from builder.execution.sessions import session_with_outputs
    from builder.compression.quantization import limit_samples

    model = onnx.load(str(quantized_path))
    float_model = onnx.load(str(float_path))
    inits = {i.name: i for i in model.graph.initializer}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    producers = {out: n for n in model.graph.node for out in n.output}
    report = BiasReport()
    plans = []  # (node name, weight error, float input tensor, bias dq node, kind)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        label = node.name or node.output[0]
        float_node = float_nodes.get(node.name)
        w_dq = _dequantize_source(producers, inits, node.input[1])
        if float_node is None or w_dq is None:
            continue  # kept in float, or not a QDQ weight
        if len(node.input) < 3 or not node.input[2]:
            report.skipped[label] = "no bias"
            continue
        b_dq = _dequantize_source(producers, inits, node.input[2])
        weight_name = float_node.input[1]
        if b_dq is None or weight_name not in float_inits:
            report.skipped[label] = "bias or weight not a QDQ initializer"
            continue
        weight = numpy_helper.to_array(float_inits[weight_name]).astype(np.float64)
        error = _dequantized(w_dq, inits) - weight
        if node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute}
            if attrs.get("transA", 0):
                report.skipped[label] = "Gemm with transA"
                continue
            if not attrs.get("transB", 0):
                error = error.T  # -> [N, K]
        elif node.op_type == "MatMul":
            error = error.T
        plans.append((node, error, float_node.input[0], b_dq))
    if not plans:
        atomic_write_bytes(Path(quantized_path), model.SerializeToString())
        return report
    session = session_with_outputs(float_model, sorted({p[2] for p in plans}))
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in limit_samples(batches, MAX_SAMPLES):
        outputs = dict(zip(names, session.run(None, {k: v for k, v in batch.items() if k in wanted})))
        for tensor in {p[2] for p in plans}:
            value = np.asarray(outputs[tensor], dtype=np.float64)
            axes = tuple(i for i in range(value.ndim) if i != (1 if value.ndim == 4 else value.ndim - 1))
            sums[tensor] = sums.get(tensor, 0) + value.sum(axis=axes)
            counts[tensor] = counts.get(tensor, 0) + int(np.prod([value.shape[i] for i in axes]))
    shifts = []
    for node, error, tensor, b_dq in plans:
        mean_x = sums[tensor] / max(counts[tensor], 1)
        if node.op_type == "Conv":
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            out_ch, in_per_group = error.shape[0], error.shape[1]
            per_out = error.reshape(out_ch, in_per_group, -1).sum(axis=2)  # [Cout, Cin/g]
            out_per_group = out_ch // groups
            group_of = np.arange(out_ch) // out_per_group
            inputs = mean_x.reshape(groups, in_per_group)[group_of]  # [Cout, Cin/g]
            shift = (per_out * inputs).sum(axis=1)
        else:
            shift = error @ mean_x
        q_init = inits[b_dq.input[0]]
        q_bias = numpy_helper.to_array(q_init)
        scale = numpy_helper.to_array(inits[b_dq.input[1]]).astype(np.float64).reshape(-1)
        if q_bias.shape != shift.shape:
            report.skipped[node.name] = f"bias shape {q_bias.shape} vs {shift.shape}"
            continue
        step = np.round(shift / np.broadcast_to(scale, shift.shape))
        info = np.iinfo(q_bias.dtype)
        new = np.clip(q_bias.astype(np.int64) - step.astype(np.int64), info.min, info.max).astype(q_bias.dtype)
        q_init.CopyFrom(numpy_helper.from_array(new, q_init.name))
        report.corrected.append(node.name)
        shifts.append(float(np.abs(shift).mean() / max(np.abs(q_bias * scale).mean(), 1e-12)))
    report.mean_shift = float(np.mean(shifts)) if shifts else 0.0
    atomic_write_bytes(Path(quantized_path), model.SerializeToString())
    log.info("bias correction: %d layers corrected, %d skipped", len(report.corrected), len(report.skipped))
    return report
