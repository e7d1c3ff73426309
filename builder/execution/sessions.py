"""ONNX Runtime sessions on the build host, all made here.

Conventions: the CPU execution provider; ``threads`` sets ``intra_op_num_threads`` (0 = ORT's own
choice, all cores) with one inter-op thread and sequential execution; ``level`` is the graph
optimisation level by name (``LEVELS``; ORT's default is ``"all"``); ``log_severity`` is ORT's (2
warnings, 3 errors, 4 fatal only: callers that report a failure as one line of their own pass 4).
A session that must also return intermediate tensors is unoptimised (``session_with_outputs``):
fused kernels would hide them. ``model`` may be a path, an in-memory ``onnx.ModelProto`` or its
serialized bytes. Errors from ORT pass through; each caller words its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from builder.errors import CompressionError, DataError

ModelSource = Union[str, Path, bytes, Any]  # a file, serialized bytes, or an onnx.ModelProto
LEVELS = ("disabled", "basic", "extended", "all")
CPU = ("CPUExecutionProvider",)


def session_options(threads: int = 1, level: str = "all", log_severity: int = 3,
                    optimized_path: Optional[Path] = None) -> Any:
    """``ort.SessionOptions`` by the module's conventions; ``optimized_path`` writes the optimised graph."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_severity
    options.graph_optimization_level = levels[level]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def open_session(model: ModelSource, threads: int = 1, level: str = "all", log_severity: int = 3,
                 optimized_path: Optional[Path] = None, providers: Sequence[str] = CPU) -> Any:
    """An ``ort.InferenceSession`` of ``model`` (path, bytes or ModelProto)."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        source: Union[str, bytes] = str(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = model.SerializeToString()
    return ort.InferenceSession(source, session_options(threads, level, log_severity, optimized_path),
                                providers=list(providers))


def with_outputs(model: Any, names: Iterable[str]) -> bytes:
    """``model`` serialized with the tensors ``names`` added as graph outputs (``model`` itself is
    left as it was)."""
    import onnx

    outputs = model.graph.output
    before = len(outputs)
    present = {o.name for o in outputs}
    try:
        for name in names:
            if name and name not in present:
                outputs.append(onnx.helper.make_empty_tensor_value_info(name))
                present.add(name)
        return model.SerializeToString()
    finally:
        del outputs[before:]


def session_with_outputs(model: Any, names: Iterable[str], threads: int = 0, log_severity: int = 2) -> Any:
    """An unoptimised session of ``model`` (a ModelProto) that also returns the tensors ``names``,
    after the model's own outputs (``session.get_outputs()`` gives the order)."""
    return open_session(with_outputs(model, names), threads=threads, level="disabled", log_severity=log_severity)


def make_session(onnx_path: Path, threads: int = 1) -> Any:
    """The session evaluation and timing use (all optimisations, as a device would load it);
    a model ORT cannot load is a ``CompressionError``."""
    try:
        return open_session(onnx_path, threads)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise CompressionError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


# ---- feeding ---------------------------------------------------------------------------------
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


# ---- running ---------------------------------------------------------------------------------
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
