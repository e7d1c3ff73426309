"""The one interface every target runtime implements, and the plain data it speaks.

A target takes an ONNX file (the compressed model, or the original) and writes what one runtime
loads on the device (``compile``), then proves on the host, in that runtime, that the files compute
what the reference model computes (``verify``). Unsupported operators are found before conversion
(``check_ops``) and reported by name with the alternative.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from agent.compare import compare_arrays, cosine
from agent.manifest import TensorSpec


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True)
class UnsupportedOp:
    """An operator a target cannot run as asked. ``blocking`` ops stop the build; the others are
    handled by the fallback named in ``alternative`` (e.g. TensorRT hands the node to CUDA/CPU)."""

    op_type: str
    domain: str
    count: int
    reason: str
    alternative: str
    blocking: bool = True

    def describe(self) -> str:
        domain = f"{self.domain}::" if self.domain else ""
        return f"{domain}{self.op_type} x{self.count} ({self.reason}; alternative: {self.alternative})"


@dataclass(frozen=True)
class PayloadFile:
    """One file a target wrote. ``role`` as in the manifest: "model", "sample" or "aux"."""

    name: str
    path: Path
    role: str = "model"


@dataclass(frozen=True)
class CompiledPayloads:
    """What ``compile`` returns: the files to ship plus what the manifest says about them.

    ``verify_files`` are extra files loaded during verification but not shipped (e.g. the portable
    ``.onnx`` an ``.ort`` was converted from). ``inputs``/``outputs`` are as the artifact's runtime
    sees them (a ``.tflite`` has its own signature names and int32 instead of int64).
    """

    runtime: str
    format: str
    precision: str
    files: tuple[PayloadFile, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    execution_providers: tuple[str, ...] = ()
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    verify_files: tuple[PayloadFile, ...] = ()
    notes: tuple[str, ...] = ()
    # artifact input name -> the reference model's input name, where they differ (LiteRT tensor names)
    input_sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_file(self) -> PayloadFile:
        return next(f for f in self.files if f.role == "model")


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria against the reference outputs (docs/verification.md).

    ``elementwise`` (fp32): every value within ``atol + rtol*|ref|`` (``atol`` widened to k x the
    spread of ONNX Runtime's own optimisation levels by the pipeline). Always: the worst sample's
    cosine >= ``min_cosine`` and, when ``min_agreement`` is set, the task's score (top-1, NN, map
    IoU, per-step argmax agreement or 1 - relative error; ``task_metrics``) >= ``min_agreement``.
    ``task`` None = detected from the reference outputs.
    """

    atol: float
    rtol: float
    min_cosine: float
    min_agreement: float | None = None
    elementwise: bool = True  # False for lossy precisions: judged by cosine and the task score
    task: str | None = None

    @property
    def min_top1(self) -> float | None:  # the name of this floor before task kinds existed
        return self.min_agreement

    def as_manifest(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine}


# fp32: numerical noise only (atol widened to ORT's own level spread); fp16: judged by the task score
# and cosine, not elementwise (an ImageNet CNN in fp16: max |diff| 0.039, cosine 0.99998, top-1 100%);
# int8 / compressed: agreement floors, over >= MIN_INT8_SAMPLES samples.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(atol=float("inf"), rtol=float("inf"), min_cosine=0.999, min_agreement=0.95, elementwise=False),
    "int8": Tolerance(atol=float("inf"), rtol=float("inf"), min_cosine=0.95, min_agreement=0.9, elementwise=False),
    "lossy": Tolerance(atol=float("inf"), rtol=float("inf"), min_cosine=0.9, min_agreement=0.85, elementwise=False),
}
# A retrained (fine-tuned, distilled) model against the original: judged by the task's score; the cosine floor
# only rejects logits that no longer point the same way (the conversion is checked separately, pipeline.py).
TRAINED_MIN_COSINE = 0.5
FP32_SPREAD_FACTOR = 4.0  # fp32 atol = max(documented atol, this x the DISABLE_ALL vs ENABLE_ALL spread)
MIN_INT8_SAMPLES = 64  # int8 / compressed builds are verified on at least this many (all of --data if fewer)


def tolerance_for(precision: str, compressed: bool = False) -> Tolerance:
    """The tolerance for an artifact of this precision; a compressed model is judged by agreement."""
    if precision not in TOLERANCES or (compressed and precision != "int8"):
        return TOLERANCES["lossy"]
    return TOLERANCES[precision]


@dataclass(frozen=True)
class OutputCheck:
    """One payload's outputs compared with the reference over every sample."""

    payload: str
    output: str  # the worst output of this payload
    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float
    mean_cosine: float
    top1_agreement: float | None  # the classifier's top-1 agreement (None for other tasks)
    passed: bool
    reason: str = ""
    task: str = ""
    task_score: float | None = None  # the task's metric (task_metrics.METRIC_NAMES), NaN when undefined


@dataclass(frozen=True)
class VerificationReport:
    """Every payload the target loaded, what it was compared with, and the verdict.

    ``checked`` says honestly how (e.g. "fp16 ONNX on ORT CPU; TensorRT EP not available on host").
    """

    runtime: str
    precision: str
    tolerance: Tolerance
    checks: tuple[OutputCheck, ...]
    checked: str
    num_samples: int
    host_latency_ms: float | None = None
    predictions: tuple[int, ...] | None = None  # argmax of the model payload's first output, per sample

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def worst(self) -> OutputCheck:
        return max(self.checks, key=lambda c: (not c.passed, c.max_abs_diff))

    def summary(self) -> str:
        from builder.targets.task_metrics import METRIC_NAMES

        w = self.worst
        metric = METRIC_NAMES.get(w.task, "agreement")
        score = "" if w.task_score is None else f", {w.task} {metric} {w.task_score:.3f}"
        t = self.tolerance
        floor = f", {metric} >= {t.min_agreement:g}" if t.min_agreement is not None else ""
        rule = (f"atol {t.atol:.3g} + rtol {t.rtol:g}, min cosine {t.min_cosine:g}{floor}" if t.elementwise
                else f"judged by cosine and task: min cosine {t.min_cosine:g}{floor}")
        return (f"{w.payload} output '{w.output}': max |diff| {w.max_abs_diff:.3g}, min cosine {w.min_cosine:.6f}{score}"
                f" over {self.num_samples} samples ({rule})")


class TargetRuntime(Protocol):
    """One runtime EdgeFleet compiles for. Members live in their own modules; ``TARGETS`` lists them."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    formats: ClassVar[tuple[str, ...]]

    def check_ops(self, onnx_model: Any, precision: str = "fp32") -> list[UnsupportedOp]: ...

    def compile(self, model_onnx_path: Path, inputs: Sequence[TensorSpec], precision: str,
                options: Mapping[str, Any], workdir: Path) -> CompiledPayloads: ...

    def verify(self, payloads: CompiledPayloads, sample_inputs: Sequence[Mapping[str, np.ndarray]],
               reference_outputs: Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance) -> VerificationReport: ...


def _drop_batch(a: np.ndarray) -> np.ndarray:
    return a[0] if a.ndim >= 1 and a.shape[0] == 1 else a


def compare_outputs(payload: str, outputs: Sequence[Mapping[str, np.ndarray]],
                    reference: Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance,
                    output_names: Sequence[str] | None = None) -> OutputCheck:
    """Compare a payload's per-sample outputs with the reference's; pure, used by every target.

    Outputs are matched by position (``output_names`` gives the reference names in artifact order)
    because a converted model may rename them. Each output is judged by its task (``tolerance.task``
    for the first output, else detected from the reference) and that task's score. Returns the
    check of the worst output.
    """
    from builder.targets.task_metrics import detect_task, task_score

    if len(outputs) != len(reference) or not reference:
        return OutputCheck(payload, "?", float("inf"), float("inf"), 0.0, 0.0, None, False,
                           f"{len(outputs)} results for {len(reference)} samples")
    ref_names = list(output_names) if output_names else list(reference[0].keys())
    checks: list[OutputCheck] = []
    for pos, ref_name in enumerate(ref_names):
        diffs, cosines, maxes, nonfinite = [], [], [], False
        refs, gots = [], []
        within = True
        for got_map, ref_map in zip(outputs, reference):
            got_vals = list(got_map.values())
            ref = np.asarray(ref_map[ref_name], dtype=np.float64)
            if pos >= len(got_vals):
                return OutputCheck(payload, ref_name, float("inf"), float("inf"), 0.0, 0.0, None, False, "output missing")
            got = np.asarray(got_vals[pos], dtype=np.float64)
            if got.size != ref.size:
                return OutputCheck(payload, ref_name, float("inf"), float("inf"), 0.0, 0.0, None, False,
                                   f"shape {got.shape} != reference {ref.shape}")
            got = got.reshape(ref.shape)
            compared = compare_arrays(got, ref, tolerance.atol, tolerance.rtol)  # the agent's health check's rule
            nonfinite = nonfinite or not compared.finite
            diffs.append(compared.max_abs_diff)
            maxes.append(compared.mean_abs_diff)
            cosines.append(compared.cosine)
            if tolerance.elementwise:
                within = within and compared.within
            refs.append(_drop_batch(ref))
            gots.append(_drop_batch(np.nan_to_num(got)))
        task = (tolerance.task if pos == 0 and tolerance.task else None) or detect_task(refs[0])
        score = task_score(task, refs, gots)
        if task == "dense_map":  # pooled: a nearly empty map's own cosine is noise (0.66 at IoU 0.998)
            cosines = [cosine(np.concatenate([g.ravel() for g in gots]), np.concatenate([r.ravel() for r in refs]))]
        top1 = score if task == "classify" else None
        max_abs = float("inf") if nonfinite else max(diffs)
        reasons = []
        if nonfinite:
            reasons.append("non-finite outputs")
        if tolerance.elementwise and not within:
            reasons.append(f"|diff| exceeds atol {tolerance.atol:.3g} + rtol {tolerance.rtol:g}*|ref|")
        if min(cosines) < tolerance.min_cosine:
            reasons.append(f"cosine {min(cosines):.6f} < {tolerance.min_cosine:g}")
        if tolerance.min_agreement is not None and score == score and score < tolerance.min_agreement:
            from builder.targets.task_metrics import METRIC_NAMES

            reasons.append(f"{task} {METRIC_NAMES[task]} {score:.3f} < {tolerance.min_agreement:g}")
        checks.append(OutputCheck(payload, ref_name, max_abs, float(np.mean(maxes)), min(cosines),
                                  float(np.mean(cosines)), top1, not reasons, "; ".join(reasons), task, score))
    return max(checks, key=lambda c: (not c.passed, c.max_abs_diff))


def output_spread(a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]]) -> float:
    """max |a - b| over every output of every sample (matched by position)."""
    spread = 0.0
    for x, y in zip(a, b):
        for u, v in zip(x.values(), y.values()):
            u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
            if u.size and u.size == v.size:
                spread = max(spread, float(np.nanmax(np.abs(u - v.reshape(u.shape)))))
    return spread


def predictions_of(outputs: Sequence[Mapping[str, np.ndarray]]) -> tuple[int, ...] | None:
    """Top-1 class per sample of the first output when it looks like (1, classes) scores."""
    preds = []
    for out in outputs:
        first = np.asarray(next(iter(out.values())))
        if first.ndim != 2 or first.shape[0] != 1 or first.shape[1] < 2:
            return None
        preds.append(int(first.argmax()))
    return tuple(preds)


def onnx_type_to_numpy(elem_type: int) -> str:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def onnx_io_specs(model: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX ModelProto as TensorSpecs (dynamic dims as their names)."""
    init_names = {i.name for i in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tt = value.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        return TensorSpec(name=value.name, shape=tuple(dims), dtype=onnx_type_to_numpy(tt.elem_type))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in init_names)
    outputs = tuple(spec(v) for v in model.graph.output)
    return inputs, outputs


def count_ops(model: Any) -> dict[tuple[str, str], int]:
    """(domain, op_type) -> count over the main graph and every subgraph."""
    counts: dict[tuple[str, str], int] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            key = (node.domain if node.domain not in ("ai.onnx",) else "", node.op_type)
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return counts
