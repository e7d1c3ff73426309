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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from builder.compression.data import DataSource
from builder.artifacts.download import download_size, level_for
from builder.errors import CompressionError, DataError
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


# ---- running ---------------------------------------------------------------------------------
def make_session(onnx_path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise CompressionError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


Axes = Optional[Mapping[str, Optional[int]]]  # input name -> batch axis (None: not batched); missing -> 0


def _fixed_batch(dims_by_name: Iterable[tuple[str, Sequence[Any]]], axes: Axes) -> Optional[int]:
    sizes = set()
    for name, dims in dims_by_name:
        axis = (axes or {}).get(name, 0)
        if axis is not None and len(dims) > axis and isinstance(dims[axis], int) and dims[axis] > 0:
            sizes.add(int(dims[axis]))
    return sizes.pop() if len(sizes) == 1 else None


def static_batch(session: Any, axes: Axes = None) -> Optional[int]:
    """The batch size the graph fixes (the batch axis of its inputs is a number, e.g. x: [1, 4]), or
    None when it is symbolic. Feeding such a graph 32 samples at once is an ORT error."""
    return _fixed_batch(((i.name, i.shape or ()) for i in session.get_inputs()), axes)


def static_batch_of(onnx_path: Path, axes: Axes = None) -> Optional[int]:
    """``static_batch`` read from the file's graph inputs (no session, weights not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return _fixed_batch(((i.name, [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim])
                         for i in model.graph.input if i.name not in initializers), axes)


def _batch_size(batch: dict[str, np.ndarray], axes: Axes) -> int:
    for name, value in batch.items():
        axis = (axes or {}).get(name, 0)
        if axis is not None:
            return int(value.shape[axis])
    return 1 if batch else 0


def rebatch(batches: Iterable[dict[str, np.ndarray]], size: Optional[int],
            axes: Axes = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``(feed, real_samples)`` pairs of exactly ``size`` samples (the last one padded by repeating
    its final sample, ``real_samples`` says how many are real); unchanged batches when ``size`` is None.
    Samples are joined on each input's batch axis (``axes``); unbatched inputs pass through."""
    if size is None:
        for batch in batches:
            yield batch, _batch_size(batch, axes)
        return
    from builder.compression.data import take_along_batch

    def axis_of(name: str) -> Optional[int]:
        return (axes or {}).get(name, 0)

    def join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: parts[0][k] if axis_of(k) is None else np.concatenate([b[k] for b in parts], axis=axis_of(k))
                for k in parts[0]}

    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += _batch_size(batch, axes) if batch else 0
        if count < size:
            continue
        joined = join(pending)
        start = 0
        while count - start >= size:
            yield {k: take_along_batch(v, axis_of(k), slice(start, start + size)) for k, v in joined.items()}, size
            start += size
        pending = [{k: take_along_batch(v, axis_of(k), slice(start, None)) for k, v in joined.items()}] if count > start else []
        count -= start
    if count:
        joined = join(pending)
        pad = size - count
        yield {k: v if axis_of(k) is None else np.concatenate(
            [v, np.repeat(take_along_batch(v, axis_of(k), slice(-1, None)), pad, axis=axis_of(k))], axis=axis_of(k))
            for k, v in joined.items()}, count


def run_session(session: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ORT's shape/type complaints turned into a one-line ``DataError`` naming
    the input, the shape the graph expects and the shape it got."""
    try:
        return session.run(None, feed)
    except Exception as exc:  # ORT raises InvalidArgument / Fail from its pybind module
        if "INVALID_ARGUMENT" not in str(exc) and type(exc).__name__ != "InvalidArgument":
            raise
        raise DataError(_feed_mismatch(session, feed, exc)) from exc


def _feed_mismatch(session: Any, feed: dict[str, np.ndarray], exc: Exception) -> str:
    for spec in session.get_inputs():
        got = feed.get(spec.name)
        if got is None:
            return f"model input '{spec.name}' (shape {list(spec.shape)}) is missing from the data; add it"
        expected = list(spec.shape)
        fits = len(expected) == got.ndim and all(not isinstance(e, int) or e <= 0 or e == g
                                                  for e, g in zip(expected, got.shape))
        if not fits:
            return (f"model input '{spec.name}' expects shape {expected}, got {list(got.shape)}; "
                    "give data whose sample shape matches the model's input")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"ONNX Runtime rejected the data: {first_line}"


def run_onnx(onnx_path: Path, batches: Iterable[dict[str, np.ndarray]], threads: int = 1,
             session: Any = None, axes: Axes = None) -> np.ndarray:
    """The model's first output over all batches, concatenated along the batch axis. A graph with a
    fixed batch size is fed exactly that many samples per run (padding the last run, dropping the
    padded rows' outputs)."""
    session = session or make_session(onnx_path, threads)
    wanted = {i.name for i in session.get_inputs()}
    outs = []
    for feed, real in rebatch(({k: v for k, v in b.items() if k in wanted} for b in batches),
                              static_batch(session, axes), axes):
        outs.append(run_session(session, feed)[0][:real])
    return np.concatenate(outs, axis=0)


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


def measure_latency(session: Any, feed: dict[str, np.ndarray], warmup_runs: int, timed_runs: int) -> tuple[float, float]:
    """(median, p95) milliseconds of ``session.run`` on ``feed`` after ``warmup_runs`` untimed runs."""
    (p50, p95), = measure_interleaved([session], feed, warmup_runs, timed_runs)
    return p50, p95


def interleaved_median_ms(paths: Sequence[Path], feed: dict[str, np.ndarray], threads: int, rounds: int,
                          min_round_s: float) -> list[float]:
    """Median ms of each model at ``paths``; every round runs each model in turn for ``min_round_s``
    (time-boxed rounds, so a tiny and a large model each get enough runs), after 3 warm-up runs."""
    return pooled_medians(interleaved_round_times(paths, feed, threads, rounds, min_round_s))


def paired_ratio(baseline: Path, candidate: Path, feed: dict[str, np.ndarray], threads: int, rounds: int,
                 min_round_s: float) -> float:
    """Candidate / baseline latency, paired per round (see round_paired_ratio)."""
    return round_paired_ratio(interleaved_round_times([baseline, candidate], feed, threads, rounds, min_round_s), 1, 0)


def pooled_medians(times: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """Median ms of each model over all its runs (``times`` as ``interleaved_round_times`` gives them)."""
    return [float(np.median([t for one in model for t in one])) for model in times]


def round_paired_ratio(times: Sequence[Sequence[Sequence[float]]], numerator: int, denominator: int) -> float:
    """Median over rounds of (model ``numerator``'s median / model ``denominator``'s median) in that round.

    A load burst on a shared machine lasts longer than a short round and so lands in few rounds;
    pooling all runs first lets one burst that hit one model's turns decide the ratio (measured in
    CI: a model 0.6x its input read 1.43x slower in one pooled measurement).
    """
    return float(np.median([np.median(n) / max(float(np.median(d)), 1e-9)
                            for n, d in zip(times[numerator], times[denominator])]))


def interleaved_round_times(paths: Sequence[Path], feed: dict[str, np.ndarray], threads: int, rounds: int,
                            min_round_s: float) -> list[list[list[float]]]:
    """ms of every run, as ``[model][round][run]``; rounds alternate the models after 3 warm-up runs."""
    sessions = [make_session(p, threads) for p in paths]
    feeds = [{k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
    for session, f in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, f)
    times: list[list[list[float]]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, f, out in zip(sessions, feeds, times):
            run_times: list[float] = []
            start_round = time.perf_counter()
            while True:
                start = time.perf_counter()
                session.run(None, f)
                run_times.append((time.perf_counter() - start) * 1000.0)
                if time.perf_counter() - start_round >= min_round_s:
                    break
            out.append(run_times)
    return times


def session_with_outputs(model: Any, names: Iterable[str]) -> Any:
    """An unoptimised CPU session of ``model`` that also returns the tensors ``names`` (added as graph
    outputs; ``model`` is changed). Unoptimised: fused kernels would hide the intermediate tensors."""
    import onnx
    import onnxruntime as ort

    present = {o.name for o in model.graph.output}
    for name in names:
        if name and name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure_interleaved(sessions: Sequence[Any], feed: dict[str, np.ndarray], warmup_runs: int,
                        timed_runs: int) -> list[tuple[float, float]]:
    """(median, p95) ms per session, their runs alternating so all see the same machine load."""
    for session in sessions:
        for _ in range(warmup_runs):
            run_session(session, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(max(timed_runs, 1)):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append((time.perf_counter() - start) * 1000.0)
    return [(float(np.median(t)), float(np.percentile(t, 95))) for t in times]


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
