"""Plain ONNX Runtime int8 baselines and the task metrics of the zoo benchmark (issue 13 rows).

The baselines are what a user gets from ``onnxruntime.quantization`` without the builder: the model
only made quantizable (``Constant`` weights moved to initializers, opset raised to 13 where it is
lower, because ORT refuses Constant weights and per-channel QDQ below 13 does not load), then
``quantize_dynamic`` with its defaults, or ``quantize_static`` in QDQ format, per-channel, calibrated
with MinMax on the calibration split. Fidelity is always measured on the held-out split against the
fp32 model's outputs, with the metric of the model's task kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

Inputs = Mapping[str, np.ndarray]


# --- samples ---------------------------------------------------------------------------------------

def sample_axis(name: str, array: np.ndarray, batch_axes: Mapping[str, Optional[int]]) -> Optional[int]:
    """The axis samples are stacked on: 0 unless declared; None for 0-d (shared by every sample)."""
    if array.ndim == 0:
        return None
    return batch_axes.get(name, 0)


def sample_count(inputs: Inputs, batch_axes: Mapping[str, Optional[int]]) -> int:
    counts = {arr.shape[axis] for name, arr in inputs.items()
              if (axis := sample_axis(name, arr, batch_axes)) is not None}
    if len(counts) != 1:
        raise ValueError(f"inputs disagree on the sample count: {sorted(counts)}")
    return counts.pop()


def samples(inputs: Inputs, batch_axes: Mapping[str, Optional[int]]) -> Iterator[dict[str, np.ndarray]]:
    """One batch-1 feed per sample, each array sliced on its own sample axis."""
    for i in range(sample_count(inputs, batch_axes)):
        feed = {}
        for name, arr in inputs.items():
            axis = sample_axis(name, arr, batch_axes)
            feed[name] = arr if axis is None else np.take(arr, [i], axis=axis)
        yield feed


# --- metrics -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fidelity:
    metric: str  # what ``value`` is, e.g. "top-1 agreement"
    value: float
    cosine: float  # mean per-sample cosine of the judged output, for every task

    def describe(self) -> str:
        return f"{self.metric} {self.value:.3f}, cos {self.cosine:.4f}"


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float64)


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = _rows(reference), _rows(candidate)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(_rows(reference).argmax(1) == _rows(candidate).argmax(1)))


def nn_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of samples whose nearest neighbour (cosine, among the others) is unchanged."""
    def neighbours(x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)
    return float(np.mean(neighbours(reference) == neighbours(candidate)))


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """IoU of the thresholded maps over all samples (1.0 when both are empty)."""
    a, b = reference > threshold, candidate > threshold
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sequence_agreement(reference: np.ndarray, candidate: np.ndarray, blank: int = 0) -> float:
    """Per-step argmax agreement over the steps where either side emits a non-blank symbol (CTC)."""
    ra, ca = reference.argmax(-1), candidate.argmax(-1)
    active = (ra != blank) | (ca != blank)
    return float(np.mean(ra[active] == ca[active])) if active.any() else 1.0


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = _rows(reference), _rows(candidate)
    return float(np.mean(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)))


def fidelity(task: str, reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> Fidelity:
    """The task's metric (the one issue 12 names for each kind) plus the mean cosine."""
    cos = mean_cosine(reference, candidate)
    if task == "classifier":
        return Fidelity("top-1 agreement", top1_agreement(reference, candidate), cos)
    if task == "embedding":
        return Fidelity("NN agreement", nn_agreement(reference, candidate), cos)
    if task == "dense_map":
        return Fidelity(f"map IoU@{threshold:g}", map_iou(reference, candidate, threshold), cos)
    if task == "sequence":
        return Fidelity("seq argmax agreement", sequence_agreement(reference, candidate), cos)
    if task == "stateful":  # speech / no-speech decisions of a VAD
        return Fidelity(f"decision agreement@{threshold:g}",
                        float(np.mean((_rows(reference) > threshold) == (_rows(candidate) > threshold))), cos)
    return Fidelity("1 - rel. error", 1.0 - relative_error(reference, candidate), cos)


# --- running -----------------------------------------------------------------------------------------

def run_output(path: Path, inputs: Inputs, output: str, batch_axes: Mapping[str, Optional[int]]) -> np.ndarray:
    """``output`` for every held-out sample, one batch-1 run each, concatenated on axis 0."""
    from builder.execution.sessions import make_session

    session = make_session(path, threads=1)
    names = [o.name for o in session.get_outputs()]
    index = names.index(output)
    wanted = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run([names[index]], {k: v for k, v in feed.items() if k in wanted})[0]
                           for feed in samples(inputs, batch_axes)])


def run_tflite_output(path: Path, inputs: Inputs, output: str, batch_axes: Mapping[str, Optional[int]]) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    by_name = {d["name"]: d["index"] for d in interpreter.get_input_details()}
    out_index = next(d["index"] for d in interpreter.get_output_details() if d["name"] == output)
    results = []
    for feed in samples(inputs, batch_axes):
        for name, value in feed.items():
            interpreter.set_tensor(by_name[name], value)
        interpreter.invoke()
        results.append(interpreter.get_tensor(out_index).copy())
    return np.concatenate(results)


# --- the plain baselines -------------------------------------------------------------------------

QUANTIZABLE_OPSET = 13


def make_quantizable(source: Path, target: Path) -> list[str]:
    """Copy ``source`` to ``target`` with main-graph Constant tensors as initializers and the opset
    raised to 13 when lower; returns what was changed (for the row's note)."""
    import onnx
    from onnx import numpy_helper, version_converter

    model = onnx.load(str(source))
    notes = []
    moved, kept = [], []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and node.domain in ("", "ai.onnx"):
            tensor = numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0])
            moved.append(tensor)
        else:
            kept.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(moved)
        notes.append(f"{len(moved)} Constant -> initializers")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QUANTIZABLE_OPSET)
    if opset < QUANTIZABLE_OPSET:
        if model.ir_version < 7:
            model.ir_version = 7
        model = version_converter.convert_version(model, QUANTIZABLE_OPSET)
        notes.append(f"opset {opset} -> {QUANTIZABLE_OPSET}")
    onnx.save(model, str(target))
    return notes


class _Reader:
    """``CalibrationDataReader`` over batch-1 feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._position = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._position >= len(self._feeds):
            return None
        self._position += 1
        return self._feeds[self._position - 1]

    def rewind(self) -> None:
        self._position = 0


def ort_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(target))


def ort_static_qdq_per_channel(source: Path, target: Path, calibration: Inputs,
                               batch_axes: Mapping[str, Optional[int]]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    quantize_static(str(source), str(target), _Reader(list(samples(calibration, batch_axes))),
                    quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=CalibrationMethod.MinMax)


BASELINES: dict[str, Callable[..., None]] = {"ort quantize_dynamic": ort_dynamic,
                                             "ort quantize_static QDQ per-channel": ort_static_qdq_per_channel}
