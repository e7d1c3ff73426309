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
from typing import Any, ClassVar, Iterable

import numpy as np

from builder.compression.base import ModelForm, ModelState, StepContext, StepRecord
from builder.errors import CompressionError, DataError, UsageError

log = logging.getLogger(__name__)

WEIGHTED_OPS = {("", "MatMul"), ("com.microsoft", "Attention")}


def smoothable_nodes(model: Any) -> list[Any]:
    """Nodes whose input 0 is an activation and input 1 a constant 2-D weight [in, out]."""
    inits = {init.name: init for init in model.graph.initializer}
    return [node for node in model.graph.node
            if (node.domain, node.op_type) in WEIGHTED_OPS and len(node.input) > 1
            and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] not in inits]


def activation_absmax(model: Any, batches: Iterable[dict[str, np.ndarray]], tensor_names: list[str],
                      threads: int = 1) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of the named tensors over all batches, every position included
    (dynamic quantization sees padding positions too)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    present = {out.name for out in probe.graph.output}
    for name in tensor_names:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # No fusions: the probed tensors must survive as outputs exactly as they are in the graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own error types
        raise CompressionError(f"cannot run the model to measure activation ranges: {exc}") from exc
    wanted = {i.name for i in session.get_inputs()}
    output_names = [out.name for out in session.get_outputs()]
    ranges: dict[str, np.ndarray] = {}
    seen = 0
    for batch in batches:
        seen += 1
        for name, value in zip(output_names, session.run(None, {k: v for k, v in batch.items() if k in wanted})):
            if name in tensor_names:
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[name] = np.maximum(ranges[name], channel_max) if name in ranges else channel_max
    if not seen:
        raise DataError("smoothing needs calibration batches; pass --data")
    return ranges


def smooth_model(model: Any, ranges: dict[str, np.ndarray], alpha: float, min_outlier_ratio: float = 0.0,
                 fold_into_layernorm: bool = True) -> list[dict[str, Any]]:
    """Smooth ``model`` in place; returns one record per smoothed activation tensor.

    Only tensors whose channel range ratio (max / median of per-channel max|x|) is at least
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
        if ratio < min_outlier_ratio:
            continue
        weights = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float64) for node in nodes]
        if any(w.shape[0] != x_max.shape[0] for w in weights):
            continue
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-5)
        scale = np.clip(np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha), 1e-4, 1e4)
        for node, weight in zip(nodes, weights):
            new_name = f"{node.input[1]}_smoothed_{len(graph.initializer)}"
            graph.initializer.append(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), new_name))
            node.input[1] = new_name
        producer = producers.get(tensor)
        foldable = (fold_into_layernorm and producer is not None and producer.op_type == "LayerNormalization"
                    and tensor not in graph_outputs and len(producer.output) >= 1 and producer.output[0] == tensor
                    and all(c in nodes for c in consumers.get(tensor, []))
                    and all(name in inits for name in producer.input[1:3]) and len(producer.input) >= 3)
        if foldable:
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
        records.append({"tensor": tensor, "consumers": [node.name for node in nodes], "outlier_ratio": round(ratio, 2),
                        "folded_into": where})
    _drop_unused_initializers(model)
    return records


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


@dataclass(frozen=True)
class SmoothStep:
    """Per-channel activation smoothing before int8 quantization (needs calibration data)."""

    name: ClassVar[str] = "smooth"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    needs_data: ClassVar[bool] = True
    alpha: float = 0.85  # measured on MiniLM: 0.5 hurt per-channel dynamic int8, 0.85 helped most
    min_outlier_ratio: float = 0.0  # smooth only tensors whose max/median channel range is at least this
    calibration_samples: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"smooth alpha must be in [0, 1], got {self.alpha}")

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx

        if state.onnx_path is None:
            raise CompressionError("smooth needs an ONNX model")
        if ctx.calibration_batches is None:
            raise DataError("smooth needs calibration data to measure activation ranges; pass --data")
        model = onnx.load(str(state.onnx_path))
        from builder.compression.quantization import limit_samples

        tensors = sorted({node.input[0] for node in smoothable_nodes(model)})
        ranges = activation_absmax(model, limit_samples(ctx.calibration_batches(), self.calibration_samples), tensors)
        records = smooth_model(model, ranges, self.alpha, self.min_outlier_ratio)
        out = Path(ctx.workdir) / "model.onnx"
        tmp = out.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(out)
        facts = {"smoothed_tensors": len(records), "smoothed": records}
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts=facts,
            warnings=() if records else ("no weighted op found to smooth",))

