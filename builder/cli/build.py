"""`builder build`: cross-compile a model for a device profile, verify, sign, register."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from builder.cli.keys import KeyDirOption, RegistryDirOption


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
    if fid.get("top1_agreement") is not None:
        fidelity += f"\ntop-1 {fid['top1_agreement']:.3f}"
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
        device_profile: str = typer.Option(..., "--device-profile", "-p", help="Device profile name (`builder profiles list`)."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1x1x8x8 or input_ids=1x128:int64,attention_mask=1x128:int64"),
        runtime: Optional[str] = typer.Option(None, "--runtime", help="onnxruntime | onnxruntime-tensorrt | litert (default: the profile's)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 (default: the profile's)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="onnx | ort | tflite (default: the profile's)."),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="Compression recipe TOML."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="Shortcut: int8 | int8-static | fp16."),
        prune: Optional[float] = typer.Option(None, "--prune", help="Shortcut: unstructured sparsity, e.g. 0.5."),
        data: Optional[str] = typer.Option(None, "--data", help=".npz (input arrays by name or 'x', labels 'y') or package.module:function."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data for a recipe that fine-tunes or distils (as for `builder compress`)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also write the artifact directory here."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the manifest (default: from the source)."),
        version: str = typer.Option("1", "--version", help="Model version in the manifest."),
        samples: int = typer.Option(16, "--verify-samples", help="Samples used to verify against the reference."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild even when an identical build is registered."),
        registry_dir: Optional[Path] = RegistryDirOption,
        key_dir: Optional[Path] = KeyDirOption,
        profiles_dir: Optional[list[Path]] = typer.Option(None, "--profiles-dir", help="Extra profile directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a table."),
    ) -> None:
        """Build a verified, signed artifact for one device profile and register it."""
        import json
        import logging
        import sys

        from rich.console import Console

        from builder.compression.recipe import resolve_recipe
        from builder.targets.profile_build import build_for_profile

        console = Console(stderr=True)
        logging.getLogger("builder").setLevel(logging.WARNING)
        with console.status("building") as status:
            result = build_for_profile(model, device_profile, recipe=resolve_recipe(recipe) if recipe is not None else None, quantize=quantize, prune=prune,
                                       input_shapes=input_shape, data=data, registry_dir=registry_dir, key_dir=key_dir,
                                       runtime=runtime, precision=precision, fmt=fmt, name=name, version=version,
                                       out_dir=out, profiles_dirs=profiles_dir, verify_samples=samples,
                                       use_cache=not no_cache, on_stage=lambda text: status.update(text),
                                       train_data=train_data)
        if as_json:
            print(json.dumps(result.manifest.to_dict(), indent=2, sort_keys=True))
            return
        out = Console() if sys.stdout.isatty() else Console(width=160)
        out.print(result_table(result))
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
