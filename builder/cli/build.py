"""`builder build`: cross-compile a model for a device profile, verify, sign, register."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from builder.cli.keys import KeyDirOption, RegistryDirOption
from builder.cli.options import HiddenAlias, InputShapeOption, ProfileOption, merged_input_shapes, resolve_alias
from builder.cli import noise
from builder.cli.progress import stages
from builder.cli.tables import print_table


def _size(n: float | None) -> str:
    from builder.units import format_bytes

    return format_bytes(n)


def result_table(result: Any) -> Any:
    """One row per artifact: id, files, size, zstd download size, host latency, fidelity, estimate."""
    from rich.table import Table

    m = result.manifest
    metrics = dict(m.metrics)
    fid = dict(metrics.get("fidelity", {}))
    table = Table(title=f"{m.model_name} {m.model_version} → {m.target.profile} "
                        f"({m.target.runtime}/{m.target.precision}/{m.target.format})" + (" [reused]" if result.reused else ""))
    for col in ("artifact", "files", "size", "download (zstd)", "host latency", "fidelity", "est. device latency"):
        table.add_column(col)
    files = "\n".join(f"{p.name} ({p.role}, {_size(p.size_bytes)})" for p in m.payloads)
    fidelity = f"max|Δ| {fid.get('max_abs_diff', float('nan')):.3g}\ncos≥{fid.get('min_cosine', float('nan')):.5f}"
    if fid.get("task_score") is not None:
        from builder.targets.task_metrics import METRIC_NAMES

        fidelity += f"\n{METRIC_NAMES.get(fid.get('task', ''), 'score')} {fid['task_score']:.3f} ({fid.get('samples')} samples)"
    if "accuracy" in metrics:
        fidelity += f"\nacc {metrics['accuracy']:.3f} (ref {metrics.get('reference_accuracy', float('nan')):.3f})"
    host = metrics.get("host_latency_ms")
    est = metrics.get("est_device_latency_ms")
    table.add_row(m.artifact_id[:16], files, _size(metrics.get("size_bytes", m.total_size_bytes)),
                  _size(metrics.get("download_bytes")), "-" if host is None else f"{host:.3f} ms",
                  fidelity, "-" if est is None else f"{est:.3f} ms")
    return table


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build(
        model: str = typer.Argument(..., help="ONNX file, TorchScript file, or package.module:factory."),
        profile: Optional[str] = ProfileOption("Device profile name (`builder profiles list`); required."),
        device_profile: Optional[str] = HiddenAlias("--device-profile"),
        input_shape: Optional[list[str]] = InputShapeOption(),
        runtime: Optional[str] = typer.Option(None, "--runtime", help="onnxruntime | onnxruntime-tensorrt | litert (default: the profile's)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 (default: the profile's)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="onnx | ort | tflite (default: the profile's)."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Compression recipe TOML, or a packaged recipe's name."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="Shortcut: int8 (best for the model and CPU) | int8-static | int8-dynamic | fp16."),
        prune: Optional[float] = typer.Option(None, "--prune", help="Shortcut: unstructured sparsity, e.g. 0.5."),
        data: Optional[str] = typer.Option(None, "--data", help=".npz (input arrays by name or 'x', labels 'y') or package.module:function."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data for a recipe that fine-tunes or distils (as for `builder compress`)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the artifact directory here."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the manifest (default: from the source)."),
        model_version: Optional[str] = typer.Option(None, "--model-version", help="Model version in the manifest (default 1)."),
        version: Optional[str] = HiddenAlias("--version"),
        samples: Optional[int] = typer.Option(None, "--verify-samples",
                                              help="Samples used to verify (default 16; int8/compressed: 64, or all of --data if fewer)."),
        task: str = typer.Option("auto", "--task", help="auto | classify | embed | dense_map | sequence | regression."),
        min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Override the precision's cosine floor."),
        min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Override the task score's floor."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild even when an identical build is registered."),
        registry_dir: Optional[Path] = RegistryDirOption,
        key_dir: Optional[Path] = KeyDirOption,
        profiles_dir: Optional[list[Path]] = typer.Option(None, "--profiles-dir", help="Extra profile directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a table."),
        batch_axis: Optional[list[str]] = typer.Option(None, "--batch-axis",
                                                       help="NAME=AXIS: an input batched on another axis than 0 (state=1; sr=none)."),
    ) -> None:
        """Build a verified, signed artifact for one device profile and register it."""
        import json
        import logging

        from rich.console import Console

        from builder.compression.recipe import resolve_recipe
        from builder.loading.input_shapes import parse_batch_axes
        from builder.targets.profile_build import build_for_profile

        device_profile = resolve_alias(profile, device_profile, "--profile", "--device-profile")
        model_version = resolve_alias(model_version, version, "--model-version", "--version", required=False) or "1"
        recipe_path = resolve_recipe(recipe) if recipe is not None else None
        console = Console(stderr=True)
        logging.getLogger("builder").setLevel(logging.WARNING)
        with stages(console, "starting", log_first=False) as stage, noise.quiet_stderr():
            result = build_for_profile(model, device_profile, recipe=recipe_path, quantize=quantize, prune=prune,
                                       input_shapes=merged_input_shapes(input_shape), data=data, registry_dir=registry_dir, key_dir=key_dir,
                                       runtime=runtime, precision=precision, fmt=fmt, name=name, version=model_version,
                                       out_dir=out, profiles_dirs=profiles_dir, verify_samples=samples,
                                       use_cache=not no_cache, on_stage=stage,
                                       batch_axes=parse_batch_axes(batch_axis), task=task, min_cosine=min_cosine,
                                       min_agreement=min_agreement, train_data=train_data)
        if result.fallback:  # the one line saying which runtime was built instead, and why
            print(result.fallback, file=sys.stderr if as_json else sys.stdout)
        if as_json:
            print(json.dumps(result.manifest.to_dict(), indent=2, sort_keys=True))
            return
        print_table(result_table(result), keep=("artifact",), drop_order=("est. device latency", "files"))
        if result.reused:
            print("[reused] identical build found in the registry (same model, recipe, profile, data, builder version)")
        if result.report is not None:
            print(f"verified: {result.report.checked}")
            print(f"worst: {result.report.summary()}")
        for note in result.warnings:
            print(f"note: {note}")
        if result.exported_to:
            print(f"artifact directory: {result.exported_to}")
        print(f"artifact id: {result.artifact_id}")
