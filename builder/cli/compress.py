"""`builder compress`: run a recipe (or shortcut flags) on a model, print a table step by step,
write ``OUT/model.onnx`` and ``OUT/report.json``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:  # heavy or not needed for `builder --help`
    from rich.table import Table

    from builder.compression.engine import StepReport


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the builder app."""

    @app.command("compress")
    def compress(
        model: str = typer.Argument(..., help="An .onnx file, a TorchScript file, or package.module:factory."),
        data: str = typer.Option(..., "--data", help="Evaluation/calibration data: .npz (inputs by name or x, "
                                 "optional labels y) or package.module:function returning batches."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder for model.onnx and report.json."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", "-s",
                                                  help="Input shapes, e.g. 1x1x8x8 (needed for PyTorch models)."),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe TOML ([[step]] tables)."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 | int8-static | fp16"),
        prune: Optional[float] = typer.Option(None, "--prune", help="Unstructured sparsity, e.g. 0.5."),
        prune_channels: Optional[float] = typer.Option(None, "--prune-channels", help="Fraction of channels removed."),
        cluster: Optional[int] = typer.Option(None, "--cluster", help="Distinct weight values per layer, e.g. 16."),
        lowrank: Optional[float] = typer.Option(None, "--lowrank", help="SVD energy kept, e.g. 0.9."),
        distill_from: Optional[str] = typer.Option(None, "--distill-from",
                                                   help="Teacher (package.module:factory or TorchScript); MODEL is the student."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data, same formats as --data."),
        threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads (and torch threads)."),
        task: str = typer.Option("auto", "--task", help="auto | classify | embed (how fidelity is measured)."),
        timed_runs: int = typer.Option(50, "--latency-runs", min=1, help="Timed runs per latency measurement."),
        opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset for exporting PyTorch models."),
    ) -> None:
        """Compress a model with a recipe or shortcut flags; evaluate after every step."""
        from builder.compression.recipe import Recipe, resolve_recipe
        from builder.errors import UsageError

        shortcuts = dict(quantize=quantize, prune=prune, prune_channels=prune_channels, cluster=cluster,
                         lowrank=lowrank, distill_from=distill_from)
        given = [f"--{k.replace('_', '-')}" for k, v in shortcuts.items() if v is not None]
        if recipe is not None and given:
            raise UsageError(f"give either --recipe or shortcut flags ({', '.join(given)}), not both")
        if task not in ("auto", "classify", "embed"):
            raise UsageError(f"--task must be auto, classify or embed, got '{task}'")
        plan = Recipe.from_toml(resolve_recipe(recipe)) if recipe is not None else Recipe.from_shortcuts(**shortcuts)
        plan.build_steps()  # bad step names / parameters fail before the (possibly slow) model load
        _run(model, plan, shortcuts if recipe is None else None, data, train_data, out, input_shape, threads,
             task, timed_runs, opset)


def _run(model: str, plan: "object", shortcuts: Optional[dict], data: str, train_data: Optional[str], out: Path,
         input_shape: Optional[str], threads: int, task: str, timed_runs: int, opset: Optional[int]) -> None:
    import tempfile

    import torch
    from rich.console import Console

    from builder.compression.data import DataSource
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig
    from builder.compression.recipe import Recipe
    from builder.loading import load_model

    torch.set_num_threads(threads)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as workdir:
        loaded = load_model(model, input_shape, workdir=Path(workdir), opset=opset)
        if shortcuts is not None and loaded.torch_module is None:
            plan = Recipe.from_shortcuts(**shortcuts, torch_available=False)
        plan.validate(torch_available=loaded.torch_module is not None, has_data=True,
                      has_train_data=train_data is not None)
        eval_data = DataSource.from_arg(data, loaded.inputs)
        train = DataSource.from_arg(train_data, loaded.inputs) if train_data else None
        rows: list["StepReport"] = []

        def progress(report: "StepReport") -> None:
            rows.append(report)
            e = report.evaluation
            console.print(f"[dim]{report.index}. {report.step}: {report.seconds:.1f}s, "
                          f"p50 {e.latency_p50_ms:.3f} ms, download {_size(e.download_bytes)}[/dim]")

        result = run_recipe(loaded, plan, data=eval_data, train_data=train, out_dir=out, threads=threads,
                            eval_config=EvalConfig(threads=threads, task=task, timed_runs=timed_runs),
                            on_report=progress)
    Console(width=180).print(report_table(rows))
    print(f"wrote {result.model_path} and {result.report_path}")
    if result.flags:
        console.print(f"[bold red]warning:[/bold red] the final model is flagged: {', '.join(result.flags)} "
                      f"(see {result.report_path})")


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
        metric = "top-1" if e.task == "classify" else "NN"
        table.add_row(
            str(row.index), row.step,
            f"{_count(e.params)} ({_count(e.nonzero_params)})",
            f"{_count(e.macs)}{_ratio(base.macs if base else None, e.macs)}" if e.macs is not None else "?",
            f"{_size(e.file_bytes)}{_ratio(base.file_bytes if base else None, e.file_bytes)}",
            f"{_size(e.download_bytes)}{_ratio(base.download_bytes if base else None, e.download_bytes)}",
            f"{e.latency_p50_ms:.3f} / {e.latency_p95_ms:.3f}"
            + (f" ({e.speedup_vs_input:.2f}x)" if e.speedup_vs_input is not None else ""),
            f"{e.accuracy:.4f}" if e.accuracy is not None else "-",
            f"{metric} {fid.agreement:.3f}, cos {fid.cosine_mean:.4f}",
            ", ".join(e.flags) or "-",
        )
    return table


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


def _size(value: int) -> str:
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"
