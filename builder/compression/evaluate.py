"""Measure a model after every step: task metric, fidelity to the original, size, MACs, latency.

- Accuracy when the data has labels ``y``.
- Fidelity against the reference (the input model's outputs on the same data): mean cosine and
  the task's score (``builder.targets.task_metrics``: top-1 agreement for classifiers,
  nearest-neighbour agreement for embeddings, map IoU for dense maps, per-step argmax agreement
  for sequences, 1 - relative error for regression). The task is detected from the outputs
  (labels present -> classifier) unless ``EvalConfig.task`` says so.
- Parameters and non-zeros (``builder.analysis.weights.count_parameters``: every weight, as
  ``builder analyze`` counts them), MACs at batch 1 (``builder.analysis``),
  file size and zstd download size (``builder.artifacts.download``), ONNX Runtime latency at batch 1 (or the graph's fixed batch size): median and p95
  after warm-up with ``intra_op_num_threads`` pinned. A compressed model's runs are interleaved
  with the reference model's, so ``speedup_vs_input`` compares both under the same machine load
  (measured here: a 0.06 ms model read 0.06-0.12 ms a minute apart on the shared 2-core machine).
- A graph whose batch axis is a number (x: [1, 4]) is run that many samples at a time; a feed ORT
  still rejects becomes a one-line ``DataError`` naming the input, expected and got shapes.
- Flags: ``fidelity_collapse`` (agreement or cosine under the thresholds), ``slower_than_input``
  (interleaved median slower than the reference by more than ``slower_tolerance`` and
  ``min_slowdown_ms``), ``accuracy_drop``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from builder.artifacts.download import download_size, level_for
from builder.compression.data import DataSource
from builder.errors import CompressionError
from builder.execution.sessions import make_session, rebatch, run_onnx, static_batch
from builder.execution.timing import measure_interleaved
from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

TASKS = ("auto", "classify", "embed", "dense_map", "sequence", "regression")  # builder.targets.task_metrics


@dataclass(frozen=True)
class EvalConfig:
    threads: int = 1
    batch_size: int = 32
    warmup_runs: int = 10
    timed_runs: int = 50
    latency_batch: int = 1
    task: str = "auto"
    min_agreement: float = 0.9  # top-1 (classifier) or nearest-neighbour (embedding) agreement
    min_cosine: float = 0.9  # mean logit / embedding cosine
    slower_tolerance: float = 1.20  # latency noise margin (shared CPUs) before "slower_than_input"
    min_slowdown_ms: float = 0.02  # ...and at least this much slower (sub-0.1 ms models are all noise)
    max_accuracy_drop: Optional[float] = None  # absolute, e.g. 0.01; None = do not flag


@dataclass(frozen=True)
class Fidelity:
    agreement: float  # top-1 agreement (classify) or nearest-neighbour agreement (embed)
    cosine_mean: float
    cosine_min: float


@dataclass(frozen=True)
class Evaluation:
    task: str
    samples: int
    accuracy: Optional[float]
    fidelity: Fidelity
    params: int
    nonzero_params: int
    macs: Optional[int]
    file_bytes: int
    download_bytes: int
    latency_p50_ms: float
    latency_p95_ms: float
    download_zstd_level: int = 19
    speedup_vs_input: Optional[float] = None  # reference p50 / this p50, measured interleaved
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flags"] = list(self.flags)
        return out


@dataclass(frozen=True)
class Reference:
    """What later evaluations compare against: the reference model's outputs and speed."""

    outputs: np.ndarray
    task: str
    accuracy: Optional[float]
    latency_p50_ms: float
    onnx_path: Optional[Path] = None  # for interleaved latency; None = compare with latency_p50_ms


def detect_task(outputs: np.ndarray, has_labels: bool) -> str:
    """The task of the first output stacked over samples (N, ...): ``task_metrics.detect_task`` of
    its first sample (a probability map is a dense map, not an embedding)."""
    from builder.targets.task_metrics import detect_task as detect_sample_task

    return detect_sample_task(outputs[0], has_labels)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(denom, 1e-12)


def output_fidelity(reference: np.ndarray, candidate: np.ndarray, task: str) -> Fidelity:
    """Fidelity of ``candidate`` to ``reference`` (same samples, same order)."""
    if reference.shape != candidate.shape:
        raise CompressionError(f"output shape changed from {reference.shape} to {candidate.shape}; "
                               "a step must keep the model's outputs")
    from builder.targets.task_metrics import task_score

    # dense maps: one cosine over all samples pooled (a nearly empty map's own cosine is noise)
    cos = _row_cosine(reference.reshape(1, -1), candidate.reshape(1, -1)) if task == "dense_map" \
        else _row_cosine(reference, candidate)
    agreement = task_score(task, list(reference), list(candidate))  # the task's score, see task_metrics
    return Fidelity(agreement=agreement, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))


# ---- static facts ------------------------------------------------------------------------------
def model_macs(model: Any, inputs: Sequence[InputSpec]) -> Optional[int]:
    """MACs at batch 1 as ``builder analyze`` counts them (``builder.analysis``: quantized, fused and
    attention ops included); None, with a warning, when the analysis cannot handle the graph."""
    from builder.analysis import analyze_model

    try:
        return int(analyze_model(model, {s.name: (1,) + tuple(s.shape[1:]) for s in inputs}).macs)
    except Exception as exc:  # noqa: BLE001 - analysis is best effort here; say so
        log.warning("builder.analysis failed on this model (%s); MACs unknown", exc)
        return None


# ---- evaluation --------------------------------------------------------------------------------
def synthetic_data(inputs: Sequence[InputSpec], samples: int = 64, seed: int = 0) -> DataSource:
    """Stand-in inputs when no --data is given: fidelity on noise, no accuracy."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = list(spec.shape)
        if spec.batch_axis is not None:
            shape[spec.batch_axis] = samples
        if np.dtype(spec.dtype).kind in "iu":
            arrays[spec.name] = rng.integers(1, 100, size=tuple(shape)).astype(spec.dtype)
        elif np.dtype(spec.dtype).kind == "b":
            arrays[spec.name] = np.ones(tuple(shape), dtype=bool)
        else:
            arrays[spec.name] = rng.standard_normal(tuple(shape)).astype(spec.dtype)
    return DataSource(arrays, None, "synthetic", {spec.name: spec.batch_axis for spec in inputs})


def _measure(onnx_path: Path, data: DataSource, inputs: Sequence[InputSpec], config: EvalConfig,
             reference_path: Optional[Path] = None) -> tuple[np.ndarray, dict[str, Any]]:
    import onnx

    from builder.analysis.weights import count_parameters

    session = make_session(onnx_path, config.threads)
    outputs = run_onnx(onnx_path, data.batches(config.batch_size), session=session, axes=data.batch_axes)
    sessions = [session] + ([make_session(reference_path, config.threads)] if reference_path else [])
    fixed = static_batch(session, data.batch_axes)
    feed, _ = next(rebatch([data.sample(fixed or config.latency_batch)], fixed, data.batch_axes))
    timings = measure_interleaved(sessions, feed, config.warmup_runs, config.timed_runs)
    p50, p95 = timings[0]
    model = onnx.load(str(onnx_path))
    params, nonzero = count_parameters(model)  # the one definition, as builder analyze counts them
    facts = {
        "params": params, "nonzero_params": nonzero, "macs": model_macs(model, inputs),
        "file_bytes": Path(onnx_path).stat().st_size, "download_bytes": download_size(Path(onnx_path)),
        "download_zstd_level": level_for(Path(onnx_path).stat().st_size),
        "latency_p50_ms": p50, "latency_p95_ms": p95,
        "reference_p50_ms": timings[1][0] if reference_path else None,
    }
    return outputs, facts


def _accuracy(outputs: np.ndarray, data: DataSource, task: str) -> Optional[float]:
    if data.labels is None or task != "classify":
        return None
    return float((outputs.argmax(axis=1) == data.labels).mean())


def baseline_evaluation(onnx_path: Path, data: DataSource, inputs: Sequence[InputSpec],
                        config: EvalConfig) -> tuple[Evaluation, Reference]:
    """Evaluate the reference model and keep its outputs for later comparisons."""
    outputs, facts = _measure(onnx_path, data, inputs, config)
    facts.pop("reference_p50_ms")
    task = config.task if config.task != "auto" else detect_task(outputs, data.has_labels)
    accuracy = _accuracy(outputs, data, task)
    evaluation = Evaluation(task=task, samples=len(data), accuracy=accuracy,
                            fidelity=output_fidelity(outputs, outputs, task), **facts)
    return evaluation, Reference(outputs=outputs, task=task, accuracy=accuracy, latency_p50_ms=facts["latency_p50_ms"],
                                 onnx_path=Path(onnx_path))


def evaluate_model(onnx_path: Path, data: DataSource, inputs: Sequence[InputSpec], reference: Reference,
                   config: EvalConfig) -> Evaluation:
    """Evaluate a compressed model against ``reference`` and flag broken results."""
    outputs, facts = _measure(onnx_path, data, inputs, config, reference_path=reference.onnx_path)
    reference_p50 = facts.pop("reference_p50_ms") or reference.latency_p50_ms
    facts["speedup_vs_input"] = reference_p50 / max(facts["latency_p50_ms"], 1e-9)
    fidelity = output_fidelity(reference.outputs, outputs, reference.task)
    accuracy = _accuracy(outputs, data, reference.task)
    flags = []
    if fidelity.cosine_mean < config.min_cosine or (fidelity.agreement == fidelity.agreement
                                                    and fidelity.agreement < config.min_agreement):
        flags.append("fidelity_collapse")
    slower_ms = facts["latency_p50_ms"] - reference_p50
    if facts["latency_p50_ms"] > reference_p50 * config.slower_tolerance and slower_ms > config.min_slowdown_ms:
        flags.append("slower_than_input")
    if (config.max_accuracy_drop is not None and accuracy is not None and reference.accuracy is not None
            and reference.accuracy - accuracy > config.max_accuracy_drop):
        flags.append("accuracy_drop")
    return Evaluation(task=reference.task, samples=len(data), accuracy=accuracy, fidelity=fidelity,
                      flags=tuple(flags), **facts)
