"""`builder compress`: run a recipe (or shortcut flags) on a model, print a table step by step,
write ``OUT/model.onnx`` and ``OUT/report.json``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from builder.cli.options import InputShapeOption, merged_input_shapes, refuse_existing
from builder.cli import noise
from builder.cli.progress import stages
from builder.cli.tables import print_table
from builder.units import format_bytes

if TYPE_CHECKING:  # heavy or not needed for `builder --help`
    from rich.table import Table

    from builder.compression.engine import CompressionResult, StepReport
    from builder.compression.recipe import Recipe


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the builder app."""

    @app.command("compress")
    def compress(
        model: str = typer.Argument(..., help="An .onnx file, a .tflite file (--quantize int8|fp16 only), a TorchScript file, or package.module:factory."),
        data: str = typer.Option(..., "--data", help="Evaluation/calibration data: .npz (inputs by name or x, "
                                 "optional labels y) or package.module:function returning batches."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder for model.onnx and report.json."),
        input_shape: Optional[list[str]] = InputShapeOption(),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe TOML ([[step]] tables) or the name of a "
                                             "packaged one (e.g. sparse-clustered; see docs/cli.md)."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 (best for the model and CPU) | int8-static | int8-dynamic | fp16"),
        prune: Optional[float] = typer.Option(None, "--prune", help="Unstructured sparsity, e.g. 0.5."),
        prune_channels: Optional[float] = typer.Option(None, "--prune-channels", help="Fraction of channels removed."),
        cluster: Optional[int] = typer.Option(None, "--cluster", help="Distinct weight values per layer, e.g. 16."),
        lowrank: Optional[float] = typer.Option(None, "--lowrank", help="SVD energy kept, e.g. 0.9."),
        distill_from: Optional[str] = typer.Option(None, "--distill-from",
                                                   help="Teacher (package.module:factory or TorchScript); MODEL is the student."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data, same formats as --data."),
        threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads (and torch threads)."),
        task: str = typer.Option("auto", "--task", help="auto | classify | embed | dense_map | sequence | regression."),
        min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Flag fidelity_collapse below this mean cosine (default 0.9)."),
        min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="...below this task score (default 0.9)."),
        timed_runs: int = typer.Option(50, "--latency-runs", min=1, help="Timed runs per latency measurement."),
        opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset for exporting PyTorch models."),
        max_accuracy_drop: str = typer.Option("5%", "--max-accuracy-drop",
                                              help="Exit non-zero (output kept, flagged) when accuracy falls more than this "
                                                   "below the input model's (needs labels), e.g. 1%."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing OUT/model.onnx."),
        as_json: bool = typer.Option(False, "--json", help="Print the step reports as JSON instead of a table."),
        batch_axis: Optional[list[str]] = typer.Option(None, "--batch-axis",
                                                       help="NAME=AXIS: an input batched on another axis than 0 (state=1; sr=none)."),
    ) -> None:
        """Compress a model with a recipe or shortcut flags; evaluate after every step."""
        from builder.compression.recipe import Recipe, resolve_recipe
        from builder.errors import UsageError
        from builder.search.objectives import parse_accuracy_drop

        shortcuts: dict[str, Any] = dict(quantize=quantize, prune=prune, prune_channels=prune_channels, cluster=cluster,
                         lowrank=lowrank, distill_from=distill_from)
        given = [f"--{k.replace('_', '-')}" for k, v in shortcuts.items() if v is not None]
        if recipe is not None and given:
            raise UsageError(f"give either --recipe or shortcut flags ({', '.join(given)}), not both")
        from builder.compression.tflite_quantize import is_tflite

        if is_tflite(model):
            _run_tflite(model, quantize, [g for g in given if g != "--quantize"] + (["--recipe"] if recipe else []),
                        data, out, task, timed_runs, force, as_json, min_cosine, min_agreement)
            return
        from builder.loading.input_shapes import parse_batch_axes
        from builder.targets.task_metrics import normalise_task

        try:
            task = normalise_task(task) or "auto"
        except ValueError as exc:
            raise UsageError(f"--task: {exc}") from exc
        plan = Recipe.from_toml(resolve_recipe(recipe)) if recipe is not None else Recipe.from_shortcuts(**shortcuts)
        plan.build_steps()  # bad step names / parameters fail before the (possibly slow) model load
        refuse_existing(out / "model.onnx", force)
        _run(model, plan, shortcuts if recipe is None else None, data, train_data, out, merged_input_shapes(input_shape),
             threads, task, timed_runs, opset, parse_accuracy_drop(max_accuracy_drop), as_json,
             parse_batch_axes(batch_axis),
             {k: v for k, v in (("min_cosine", min_cosine), ("min_agreement", min_agreement)) if v is not None})


def _run_tflite(model: str, quantize: Optional[str], other_flags: list[str], data: str, out: Path, task: str,
                timed_runs: int, force: bool, as_json: bool, min_cosine: Optional[float],
                min_agreement: Optional[float]) -> None:
    """A ``.tflite`` input: quantized by ai-edge-quantizer (builder.compression.tflite_quantize)."""
    from rich.console import Console

    from builder.compression.tflite_quantize import compress_tflite, summary_rows, tflite_precision
    from builder.errors import UsageError
    from builder.targets.task_metrics import normalise_task

    precision = tflite_precision(quantize, other_flags)
    source = Path(model)
    if not source.is_file():
        raise UsageError(f"{model}: no such file")
    refuse_existing(out / "model.tflite", force)
    try:
        task = normalise_task(task) or "auto"
    except ValueError as exc:
        raise UsageError(f"--task: {exc}") from exc
    console = Console(stderr=True)
    with stages(console, f"quantizing {source.name} to {precision} (ai-edge-quantizer)"), noise.quiet_stderr():
        result = compress_tflite(source, data, out, precision, task, min_cosine if min_cosine is not None else 0.9,
                                 min_agreement if min_agreement is not None else 0.9, timed_runs)
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        import json
        from dataclasses import asdict

        print(json.dumps({"model": result.model_path, "report": str(out / "report.json"), "flags": result.flags,
                          "tflite": asdict(result)}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{source.name} -> {result.model_path}")
    table.add_column("what")
    table.add_column("value")
    for what, value in summary_rows(result):
        table.add_row(what, value)
    print_table(table)


def _run(model: str, plan: "Recipe", shortcuts: Optional[dict[str, Any]], data: str, train_data: Optional[str], out: Path,
         input_shape: Optional[str], threads: int, task: str, timed_runs: int, opset: Optional[int],
         max_accuracy_drop: float, as_json: bool, batch_axes: Optional[dict] = None,
         floors: Optional[dict] = None) -> None:
    import tempfile

    import torch
    from rich.console import Console

    from builder.compression.data import DataSource, load_model_with_data
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig
    from builder.compression.recipe import Recipe

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as workdir, \
            stages(console, f"loading {model}") as stage, noise.quiet_stderr():
        loaded = load_model_with_data(model, input_shape, data, batch_axes=batch_axes, workdir=Path(workdir), opset=opset)
        if shortcuts is not None and loaded.torch_module is None:
            plan = Recipe.from_shortcuts(**shortcuts, torch_available=False)
        plan.validate(torch_available=loaded.torch_module is not None, has_data=True,
                      has_train_data=train_data is not None)
        eval_data = DataSource.from_arg(data, loaded.inputs)
        train = DataSource.from_arg(train_data, loaded.inputs) if train_data else None
        rows: list["StepReport"] = []
        names = [step.name for step in plan.build_steps()]

        def progress(report: "StepReport") -> None:
            rows.append(report)
            e = report.evaluation
            console.print(f"[dim]{report.index}. {report.step}: {report.seconds:.1f}s, "
                          f"p50 {e.latency_p50_ms:.3f} ms, download {format_bytes(e.download_bytes)}[/dim]")
            facts = report.record.facts
            if facts.get("choice"):  # --quantize int8: which recipe the model's class and the CPU chose
                console.print(f"chose {facts['choice']}", markup=False, highlight=False, soft_wrap=True)
            if facts.get("floor_missed"):
                console.print(f"warning: fidelity floor missed, best result kept and flagged: {facts['floor_missed']}",
                              markup=False, highlight=False, soft_wrap=True)
            if report.index < len(names):
                stage(f"step {report.index + 1}/{len(names)}: {names[report.index]} (then evaluate)")
            else:
                stage("writing model.onnx and report.json")

        stage("evaluating the input model (reference outputs, latency)")
        result = run_recipe(loaded, plan, data=eval_data, train_data=train, out_dir=out, threads=threads,
                            eval_config=EvalConfig(threads=threads, task=task, timed_runs=timed_runs,
                                                   max_accuracy_drop=max_accuracy_drop, **(floors or {})),
                            on_report=progress)
    if loaded.normalisation is not None and loaded.normalisation.notable:  # after the run: an error stays the only line on stderr
        print(loaded.normalisation.summary(), file=sys.stderr if as_json else sys.stdout)
    if as_json:
        import json

        print(json.dumps({"model": str(result.model_path), "report": str(result.report_path),
                          "flags": list(result.flags), "steps": [_report_json(r) for r in rows]}, indent=2, default=str))
    else:
        print_table(report_table(rows), keep=("step",), drop_order=COMPRESS_DROP_ORDER)
        print(f"wrote {result.model_path} and {result.report_path}")
    _refuse_collapse(result, rows, max_accuracy_drop)


def report_table(rows: "list[StepReport]") -> "Table":
    """One row per step with ratios against the first row (the input model); the speed-up is measured
    interleaved with the input model, so it holds even when the machine's load changes."""
    from rich.table import Table

    table = Table(title="builder compress")
    for column in ("#", "step", "params (non-zero)", "MACs", "size", "download", "p50 / p95 ms (speed-up)", "accuracy",
                   "fidelity", "flags"):
        table.add_column(column, justify="left" if column in ("step", "flags", "fidelity") else "right")
    base = rows[0].evaluation if rows else None
    for row in rows:
        e = row.evaluation
        fid = e.fidelity
        from builder.targets.task_metrics import METRIC_NAMES

        metric = METRIC_NAMES.get(e.task, "score")
        table.add_row(
            str(row.index), row.step,
            f"{_count(e.params)} ({_count(e.nonzero_params)})",
            f"{_count(e.macs)}{_ratio(base.macs if base else None, e.macs)}" if e.macs is not None else "?",
            f"{format_bytes(e.file_bytes)}{_ratio(base.file_bytes if base else None, e.file_bytes)}",
            f"{format_bytes(e.download_bytes)}{_ratio(base.download_bytes if base else None, e.download_bytes)}",
            f"{e.latency_p50_ms:.3f} / {e.latency_p95_ms:.3f}"
            + (f" ({e.speedup_vs_input:.2f}x)" if e.speedup_vs_input is not None else ""),
            f"{e.accuracy:.4f}" if e.accuracy is not None else "-",
            f"{metric} {fid.agreement:.3f}, cos {fid.cosine_mean:.4f}",
            ", ".join(e.flags) or "-",
        )
    return table


COMPRESS_DROP_ORDER = ("MACs", "size", "params (non-zero)", "flags", "fidelity")


def _report_json(report: "StepReport") -> dict:
    import dataclasses

    e = report.evaluation
    return {"index": report.index, "step": report.step, "seconds": report.seconds,
            "evaluation": dataclasses.asdict(e) if dataclasses.is_dataclass(e) else str(e)}


def _refuse_collapse(result: "CompressionResult", rows: "list[StepReport]", max_accuracy_drop: float) -> None:
    """The output stays written and flagged; an accuracy collapse still exits non-zero (one line)."""
    from builder.errors import CompressionError

    flags = list(result.flags)
    if not flags:
        return
    base, final = rows[0].evaluation, rows[-1].evaluation
    if "accuracy_drop" in flags and base.accuracy is not None and final.accuracy is not None:
        raise CompressionError(f"accuracy fell from {base.accuracy:.3f} to {final.accuracy:.3f}, more than "
                               f"--max-accuracy-drop {max_accuracy_drop:.1%}; the model was still written to "
                               f"{result.model_path} and flagged in its report (pass a larger "
                               f"--max-accuracy-drop to accept it)")
    print(f"warning: the final model is flagged: {', '.join(flags)} (see {result.report_path})",
          file=sys.stderr)


def _ratio(base: Optional[int], value: Optional[int]) -> str:
    if not base or not value or base == value:
        return ""
    return f" ({base / value:.1f}x)"


def _count(value: Optional[int]) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)
