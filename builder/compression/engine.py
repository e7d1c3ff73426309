"""Run a recipe: the API ``builder compress``, ``builder build --recipe`` and ``builder optimize`` call.

    result = run_recipe(model, recipe, data=data, train_data=train, out_dir=Path("out"), threads=1)

- ``model``: a ``LoadedModel`` (``torch_module`` set when the source was PyTorch).
- ``recipe``: a ``Recipe``; it is validated first (unknown step, bad parameter, PyTorch step after an
  ONNX step or on an ONNX-only model, missing --data / --train-data) and nothing runs if it is bad.
- ``data``: evaluation / calibration data (``DataSource``); None -> synthetic inputs, no accuracy.
- ``train_data``: batches for steps that train (fine-tuning, distillation, centroid tuning).
- ``teacher_module``: a PyTorch teacher for ``distill``; when given it is also the reference the
  fidelity of every step is measured against (else the input model is).
- ``eval_config``: ``EvalConfig`` (latency runs, thresholds, task); ``threads`` pins ORT's and
  overrides ``eval_config.threads``.
- ``on_report``: called with each ``StepReport`` as soon as it exists (index 0 = the input model).

PyTorch steps run first on a copy of the module (the caller's module is never modified); after each
one the module is exported to ONNX and evaluated. Then ONNX steps run on files. The final model is
written to ``out_dir/model.onnx`` and the report to ``out_dir/report.json``, each atomically and only
after every step succeeded; intermediate files live in a temporary ``out_dir/.work-*`` folder that
is always removed, and an ``out_dir`` this call created is removed again when the run fails.
Returns a frozen ``CompressionResult``.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from builder.atomic_files import atomic_write_bytes
from builder.compression._export import export_module
from builder.compression.base import CompressionStep, ModelForm, ModelState, StepContext, StepRecord
from builder.compression.data import DataSource
from builder.compression.evaluate import EvalConfig, Evaluation, baseline_evaluation, evaluate_model, synthetic_data
from builder.compression.recipe import Recipe
from builder.errors import BuilderError, CompressionError
from builder.execution.sessions import rebatch, static_batch_of
from builder.loading.types import LoadedModel

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
TRAIN_BATCH_SIZE = 64
CALIBRATION_BATCH_SIZE = 32


@dataclass(frozen=True)
class StepReport:
    """One row of the report: what a step did and the model measured right after it."""

    index: int  # 0 = the input (reference) model
    step: str
    form: str
    record: StepRecord
    evaluation: Evaluation
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "step": self.step, "form": self.form, "seconds": round(self.seconds, 3),
                "params": dict(self.record.params), "facts": dict(self.record.facts),
                "warnings": list(self.record.warnings), "evaluation": self.evaluation.to_dict()}


@dataclass(frozen=True)
class CompressionResult:
    final_state: ModelState  # onnx_path = out_dir/model.onnx, torch_module None
    steps: tuple[StepReport, ...]  # one per recipe step, in order
    baseline: Evaluation
    report_path: Path
    model_path: Path

    @property
    def final(self) -> Evaluation:
        return self.steps[-1].evaluation if self.steps else self.baseline

    @property
    def flags(self) -> tuple[str, ...]:
        return self.final.flags

    @property
    def retrained(self) -> bool:
        """Some step changed the weights by training (fine-tuning epochs, distillation), not only by rounding
        or removing them: the build then judges the result against the original by the task's score."""
        return any(r.step == "distill" or (r.record.facts.get("epochs") or 0) > 0 for r in self.steps)


def run_recipe(model: LoadedModel, recipe: Recipe, *, data: Optional[DataSource], train_data: Optional[DataSource],
               out_dir: Path, threads: int = 1, teacher_module: Any = None, eval_config: Optional[EvalConfig] = None,
               on_report: Optional[Callable[[StepReport], None]] = None, seed: int = 0) -> CompressionResult:
    """Validate, run and evaluate ``recipe`` on ``model``; see the module docstring for the contract."""
    steps = recipe.validate(torch_available=model.torch_module is not None, has_data=data is not None,
                            has_train_data=train_data is not None)
    config = dataclasses.replace(eval_config or EvalConfig(), threads=threads)
    out_dir = Path(out_dir)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # innermost first
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".work-"))
    try:
        return _run(model, recipe, steps, data, train_data, out_dir, work, config, teacher_module, on_report, seed)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        _remove_empty(created)  # a failed run leaves no out dir it made (nothing half-written)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


def _run(model: LoadedModel, recipe: Recipe, steps: list[CompressionStep], data: Optional[DataSource],
         train_data: Optional[DataSource], out_dir: Path, work: Path, config: EvalConfig, teacher_module: Any,
         on_report: Optional[Callable[[StepReport], None]], seed: int) -> CompressionResult:
    eval_data = data if data is not None else synthetic_data(model.inputs, seed=seed)
    for step in steps:  # a recipe may name its teacher (--distill-from): load it before anything runs
        source = step.teacher_source()
        if isinstance(source, str) and teacher_module is None:
            from builder.compression.distillation import load_torch_source

            teacher_module = load_torch_source(source, model.inputs)
    reference_path = model.onnx_path
    if teacher_module is not None:
        reference_path = work / "teacher.onnx"
        export_module(teacher_module, model.inputs, reference_path, model.output_names)
    started = time.perf_counter()
    baseline, reference = baseline_evaluation(reference_path, eval_data, model.inputs, config)
    baseline_report = StepReport(0, "input" if teacher_module is None else "teacher", ModelForm.ONNX.value,
                                 StepRecord("input", {"path": str(model.onnx_path)}), baseline,
                                 time.perf_counter() - started)
    if on_report:
        on_report(baseline_report)

    teacher = _frozen_copy(teacher_module if teacher_module is not None else model.torch_module)
    state = ModelState(inputs=model.inputs, output_names=model.output_names, onnx_path=model.onnx_path,
                       torch_module=copy.deepcopy(model.torch_module) if model.torch_module is not None else None)
    epochs = itertools.count()
    train_batches = None
    if train_data is not None:
        train_batches = lambda: train_data.labelled_batches(TRAIN_BATCH_SIZE, shuffle=True, seed=seed + next(epochs))  # noqa: E731
    axes = {spec.name: spec.batch_axis for spec in model.inputs}
    fixed = static_batch_of(model.onnx_path, axes)  # a graph fixed at batch 1 must be calibrated 1 at a time
    calibration = None
    if data is not None:
        calibration = lambda: (feed for feed, _ in rebatch(data.batches(fixed or CALIBRATION_BATCH_SIZE), fixed,  # noqa: E731
                                                           data.batch_axes))

    reports: list[StepReport] = []
    for index, step in enumerate(steps, start=1):
        step_dir = work / f"{index:02d}-{step.name}"
        step_dir.mkdir()
        ctx = StepContext(workdir=step_dir, calibration_batches=calibration, train_batches=train_batches,
                          labels_available=bool(train_data is not None and train_data.has_labels),
                          teacher=teacher, seed=seed, task=reference.task)
        if step.form is ModelForm.ONNX and state.torch_module is not None:
            state = dataclasses.replace(state, torch_module=None)
        started = time.perf_counter()
        log.info("step %d: %s", index, step.name)
        try:
            state, record = step.apply(state, ctx)
            if step.form is ModelForm.TORCH:
                exported = step_dir / "exported.onnx"
                names = export_module(state.torch_module, state.inputs, exported, state.output_names)
                state = dataclasses.replace(state, onnx_path=exported, output_names=names)
        except BuilderError:
            raise
        except Exception as exc:  # a library failure inside a step: name the step, keep the cause
            raise CompressionError(f"step {index} ({step.name}) failed: {exc}") from exc
        if state.onnx_path is None or not Path(state.onnx_path).is_file():
            raise CompressionError(f"step {index} ({step.name}) returned no ONNX model")
        seconds = time.perf_counter() - started
        evaluation = evaluate_model(state.onnx_path, eval_data, state.inputs, reference, config)
        if record.facts.get("floor_missed"):  # kept below its own floor (int8's keep_best): say so on the model
            evaluation = dataclasses.replace(evaluation, flags=(*evaluation.flags, "fidelity_floor_missed"))
        report = StepReport(index, step.name, step.form.value, record, evaluation, seconds)
        reports.append(report)
        if on_report:
            on_report(report)

    model_path = out_dir / "model.onnx"
    assert state.onnx_path is not None  # the loaded model's, or a step's (checked after each step)
    _atomic_copy(Path(state.onnx_path), model_path)
    final_state = dataclasses.replace(state, onnx_path=model_path, torch_module=None)
    report_path = out_dir / "report.json"
    document = {
        "schema": REPORT_SCHEMA,
        "model": {"name": model.name, "source": model.source, "source_kind": model.source_kind,
                  "inputs": [dataclasses.asdict(spec) for spec in model.inputs]},
        "recipe": recipe.to_dict(),
        "data": eval_data.origin, "train_data": train_data.origin if train_data is not None else None,
        "threads": config.threads,
        "baseline": baseline_report.to_dict(),
        "steps": [r.to_dict() for r in reports],
        "final": {"path": model_path.name, "precision": final_state.precision,
                  "evaluation": (reports[-1].evaluation if reports else baseline).to_dict()},
    }
    atomic_write_bytes(report_path, json.dumps(document, indent=2, default=_json_default).encode("utf-8"))
    return CompressionResult(final_state=final_state, steps=tuple(reports), baseline=baseline,
                             report_path=report_path, model_path=model_path)


def _frozen_copy(module: Any) -> Any:
    if module is None:
        return None
    teacher = copy.deepcopy(module).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
