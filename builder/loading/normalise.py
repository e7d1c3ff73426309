"""One normalisation pass for every ONNX file a user brings, checked against the original outputs.

Third-party exports break the later steps in known ways (measured on OCR models exported from
Paddle and a voice-activity RNN, see docs/loading.md):

1. weights held in ``Constant`` nodes: ``quantize_dynamic`` fails ("Expected X to be an
   initializer") -> weight Constants (``builder.analysis.weights``) become initializers, in
   subgraphs too;
2. opset below 13: per-channel QDQ writes ``DequantizeLinear(axis=...)``, which opset < 13 does
   not have, so ONNX Runtime cannot load the result -> ``onnx.version_converter`` to opset 13;
3. no shape information: ONNX's shape inference, and ONNX Runtime's symbolic shape inference
   (``auto_merge``) where ONNX's leaves tensors unknown; the latter runs in a scratch folder of the
   work directory (on failure it writes ``sym_shape_infer_temp.onnx`` into the current directory).

The result is run against the original with ONNX Runtime on generated inputs at the given shapes
(given values first; floats N(0, 1), integers 1). A step that changes the outputs or stops the model
from loading is skipped and said so. When the original itself does not run here, the two exact
steps (1 and 3) are kept and the opset upgrade, which cannot be checked, is skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

QUANTIZATION_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) start here
# Outputs must agree within ATOL + RTOL * max|original| (the PyTorch export check's tolerance).
ATOL = 1e-4
RTOL = 1e-3
TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class Normalisation:
    """What the load-time pass did to an ONNX file (reported by analyze and compress in one line)."""

    opset_from: int
    opset_to: int
    constants_to_initializers: int  # weight Constant nodes turned into initializers
    shape_inference: str  # "onnx" | "symbolic" | "onnx, N tensors unknown" | "none"
    checked: bool  # outputs compared with the original in ONNX Runtime
    max_abs_diff: Optional[float] = None
    skipped: tuple[str, ...] = field(default_factory=tuple)  # "<step>: <why>"
    note: str = ""  # why the check could not run, when it could not

    @property
    def notable(self) -> bool:
        """Something changed, was skipped or could not be checked: worth a line where output is terse."""
        return (self.opset_to != self.opset_from or self.constants_to_initializers > 0 or bool(self.skipped)
                or not self.checked)

    def summary(self) -> str:
        parts = []
        if self.opset_to != self.opset_from:
            parts.append(f"opset {self.opset_from}->{self.opset_to}")
        if self.constants_to_initializers:
            parts.append(f"{self.constants_to_initializers} weight Constants -> initializers")
        parts.append(f"shapes: {self.shape_inference}")
        parts.append(f"outputs match (max |diff| {self.max_abs_diff:.2g})" if self.checked
                     else f"not checked ({self.note})")
        parts.extend(f"skipped {s}" for s in self.skipped)
        return "normalised: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "skipped": list(self.skipped)}


def normalise_onnx(source: Path, inputs: Sequence[InputSpec], workdir: Path,
                   input_values: Mapping[str, Any] | None = None, model: Any = None) -> tuple[Path, Normalisation]:
    """Write the normalised model to ``workdir/<name>.onnx``; return its path and what was done.
    ``model``: the file already loaded (with its external data), to save reading it again."""
    import onnx

    from builder.loading.onnx_file import default_opset

    original = model if model is not None else onnx.load(str(source))
    opset_from = default_opset(original)
    feeds = sample_feeds(inputs, input_values or {})
    reference, why_not = _run(original, feeds)
    skipped: list[str] = []
    counts = {"constants": 0}
    kinds = {"shape": "none"}

    def constants(model: Any) -> Any:
        converted, count = constants_to_initializers(model)
        counts["constants"] = count
        return converted

    def opset(model: Any) -> Any:
        return upgrade_opset(model, QUANTIZATION_OPSET)

    def shapes(model: Any) -> Any:
        inferred, kind = infer_shapes(model, workdir)
        kinds["shape"] = kind
        return inferred

    steps: list[tuple[str, Callable[[Any], Any], bool]] = [
        ("constants", constants, True), ("opset upgrade", opset, opset_from < QUANTIZATION_OPSET), ("shape inference", shapes, True)]
    wanted = [(name, step) for name, step, want in steps if want]
    if reference is None and any(name == "opset upgrade" for name, _ in wanted):
        skipped.append(f"opset upgrade: cannot be checked ({why_not})")
        wanted = [(name, step) for name, step in wanted if name != "opset upgrade"]
    # All steps at once and one check; step by step (a check each) only when that check fails.
    model, worst, failures = _apply(original, wanted, reference, feeds, check_each=False)
    if failures:
        model, worst, failures = _apply(original, wanted, reference, feeds, check_each=True)
    for failure in failures:
        skipped.append(failure)
        log.warning("normalising %s: %s; skipped", source.name, failure)
    if any(s.startswith("constants") for s in skipped):
        counts["constants"] = 0
    if any(s.startswith("shape inference") for s in skipped):
        kinds["shape"] = "none"
    target = Path(workdir) / f"{source.stem}.onnx"
    if target.resolve() == Path(source).resolve():
        target = Path(workdir) / f"{source.stem}.normalised.onnx"
    save_model(model, target)
    record = Normalisation(opset_from=opset_from, opset_to=default_opset(model),
                           constants_to_initializers=counts["constants"], shape_inference=kinds["shape"],
                           checked=reference is not None, max_abs_diff=worst if reference is not None else None,
                           skipped=tuple(skipped), note="" if reference is not None else why_not or "")
    log.info("%s: %s", source.name, record.summary())
    return target, record


def _apply(original: Any, steps: Sequence[tuple[str, Callable[[Any], Any]]], reference: Optional[list[Any]],
           feeds: Mapping[str, Any], check_each: bool) -> tuple[Any, float, list[str]]:
    """(model, max |diff|, failures): the steps applied in order; with ``check_each`` a step whose
    result fails the check is left out, else one check of the end result (any failure -> retry)."""
    model = original
    worst = 0.0
    failures: list[str] = []
    for name, step in steps:
        try:
            candidate = step(model)
        except Exception as exc:  # noqa: BLE001 - version_converter / inference raise many types
            failures.append(f"{name}: {_first_line(exc)[:200]}")
            continue
        if check_each and reference is not None:
            problem, diff = _check(candidate, reference, feeds)
            if problem:
                failures.append(f"{name}: {problem}")
                continue
            worst = max(worst, diff)
        model = candidate
    if not check_each and reference is not None and not failures:
        problem, worst = _check(model, reference, feeds)
        if problem:
            failures.append(f"all steps: {problem}")
    return model, worst, failures


def _check(candidate: Any, reference: list[Any], feeds: Mapping[str, Any]) -> tuple[Optional[str], float]:
    """(problem or None, max |diff|) of ``candidate`` against the original's outputs."""
    outputs, problem = _run(candidate, feeds)
    if outputs is None:
        return f"the result {problem}", 0.0
    diff = _max_diff(reference, outputs)
    if diff is None:
        return "the result's outputs differ in shape or dtype", 0.0
    if diff > ATOL + RTOL * _max_abs(reference):
        return f"changed the outputs (max |diff| {diff:.3g})", diff
    return None, diff


def constants_to_initializers(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` whose weight ``Constant`` nodes (in every graph) are initializers."""
    import copy

    from onnx import numpy_helper

    from builder.analysis.shapes import all_graphs, constant_array
    from builder.analysis.weights import is_weight_constant

    converted = copy.deepcopy(model)
    count = 0
    for graph in all_graphs(converted.graph):
        outputs = {v.name for v in graph.output}
        kept = []
        for node in graph.node:
            # Scalars stay Constants: quantizers need tensors as initializers, not a Mul's 0.5.
            if is_weight_constant(node) and constant_array(node).size > 1 and node.output[0] not in outputs:
                graph.initializer.append(numpy_helper.from_array(constant_array(node), node.output[0]))
                count += 1
            else:
                kept.append(node)
        if len(kept) != len(graph.node):
            del graph.node[:]
            graph.node.extend(kept)
    if count and converted.ir_version < 4:
        converted.ir_version = 4  # initializers need not be graph inputs from IR 4 on
    return converted, count


def upgrade_opset(model: Any, target: int) -> Any:
    """``onnx.version_converter`` to ``target`` (the default domain only)."""
    import onnx.version_converter

    return onnx.version_converter.convert_version(model, target)


def infer_shapes(model: Any, workdir: Path) -> tuple[Any, str]:
    """(model with value_info, "onnx" | "symbolic" | "onnx, N tensors unknown"): ONNX's own inference
    first (strict off, data propagation on; a fraction of a second); ORT's symbolic inference only
    when that leaves tensors without a shape, in a scratch folder (it took 66 s on an OCR detector
    that ONNX inference covers in 0.1 s, so it is not the first choice)."""
    import onnx

    from builder.loading.scratch import scratch_cwd

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    unknown = _unshaped_outputs(inferred)
    if not unknown:
        return inferred, "onnx"
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with scratch_cwd(workdir, prefix="shape-inference-"):
            symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if symbolic is not None:
            return symbolic, "symbolic"
    except Exception as exc:  # noqa: BLE001 - "Incomplete symbolic shape inference" and kin
        log.info("symbolic shape inference failed (%s); keeping ONNX shape inference", _first_line(exc))
    return inferred, f"onnx, {unknown} tensors unknown"


def _unshaped_outputs(model: Any) -> int:
    known = {v.name for v in list(model.graph.value_info) + list(model.graph.output)
             if v.type.tensor_type.HasField("shape")}
    return sum(1 for node in model.graph.node for out in node.output if out and out not in known)


def sample_feeds(inputs: Sequence[InputSpec], values: Mapping[str, Any]) -> dict[str, Any]:
    """Check inputs at the given shapes: given values first, else N(0, 1) floats and integer ones."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if spec.name in values and np.shape(values[spec.name]) == tuple(spec.shape):
            feeds[spec.name] = np.asarray(values[spec.name], dtype=dtype)
        elif dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(spec.shape, dtype=dtype)
        else:
            feeds[spec.name] = np.ones(spec.shape, dtype=dtype)
    return feeds


def save_model(model: Any, path: Path) -> None:
    """Write ``model`` atomically; external data beside it above protobuf's 2 GB."""
    import os

    import onnx

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if model.ByteSize() > TWO_GB - 64 * 1024**2:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


def _run(model: Any, feeds: Mapping[str, Any]) -> tuple[Optional[list[Any]], Optional[str]]:
    from builder.execution.sessions import open_session

    try:
        session = open_session(model, threads=1, level="basic", log_severity=4)
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names}), None
    except Exception as exc:  # onnxruntime's pybind error types; ValueError above 2 GB
        return None, f"does not run in ONNX Runtime: {_first_line(exc)[:200]}"


def _max_diff(reference: Sequence[Any], outputs: Sequence[Any]) -> Optional[float]:
    import numpy as np

    if len(reference) != len(outputs):
        return None
    worst = 0.0
    for a, b in zip(reference, outputs):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return None
        if a.size == 0:
            continue
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if np.isnan(diff).any():
                if not np.array_equal(np.isnan(a), np.isnan(b)):
                    return float("inf")
                diff = np.nan_to_num(diff)
            worst = max(worst, float(diff.max()))
        elif not np.array_equal(a, b):
            return float("inf")
    return worst


def _max_abs(arrays: Sequence[Any]) -> float:
    import numpy as np

    values = [float(np.nanmax(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays
              if np.asarray(a).size and np.asarray(a).dtype.kind in "fiu"]
    return max(values, default=0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
