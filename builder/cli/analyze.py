"""`builder analyze`: per-layer table, totals, op histogram and per-profile roofline estimates."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer

from builder.cli.options import INPUT_SHAPE_HELP, HiddenAlias, InputShapeOption, ProfileOption, merged_input_shapes, resolve_alias

if TYPE_CHECKING:  # heavy or not needed for `builder --help`
    from rich.console import Console

    from builder.analysis import GraphStats, LatencyEstimate
    from builder.loading import LoadedModel
    from builder.profiles import DeviceProfile


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the builder app."""

    @app.command("analyze")
    def analyze(
        model: str = typer.Argument(..., help="An .onnx file, a TorchScript file, or package.module:factory."),
        input_shape: Optional[list[str]] = InputShapeOption(
            INPUT_SHAPE_HELP + " Needed for PyTorch models and dynamic ONNX dims."),
        profile: Optional[str] = ProfileOption("Only this device profile (default: all)."),
        device: Optional[str] = HiddenAlias("--device", "-d"),
        profiles_dir: Optional[list[Path]] = typer.Option(None, "--profiles-dir", help="Extra directory of profile TOML files (also $EDGEFLEET_PROFILES)."),
        as_json: bool = typer.Option(False, "--json", help="Print the whole analysis as JSON."),
        top: int = typer.Option(25, "--top", help="Rows of the layer table: the layers with most MACs (0 = all)."),
        opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset for exporting PyTorch models (default 17)."),
        data: Optional[Path] = typer.Option(
            None, "--data", help="An .npz of input values by name (first sample of each); values decide If "
                                 "branches, e.g. a 0-d sample rate sr=16000."),
    ) -> None:
        """Analyse a model: parameters, MACs, memory, and estimated latency/energy/fit per device."""
        from builder.analysis import analyze_loaded
        from builder.analysis.report import analysis_report
        from builder.analysis.tflite_stats import is_tflite
        from builder.loading import load_model
        from builder.profiles import get_profile, load_profiles

        profile = resolve_alias(profile, device, "--profile", "--device", required=False)
        profiles = [get_profile(profile, profiles_dir)] if profile else list(load_profiles(profiles_dir).values())
        from builder.compression.data import first_sample_values

        values = first_sample_values(str(data), {}) if data is not None else None
        if Path(model).is_file() and is_tflite(model):
            loaded, stats = _analyze_tflite(Path(model))
        else:
            with tempfile.TemporaryDirectory(prefix="edgefleet-analyze-") as workdir:
                loaded = load_model(model, merged_input_shapes(input_shape), workdir=Path(workdir), opset=opset,
                                    input_values=values)
                stats = analyze_loaded(loaded, values)
        estimates = estimates_for(stats, profiles)
        if as_json:
            print(json.dumps(analysis_report(model_facts(loaded), stats, estimates), indent=2))
            return
        render_analysis(wide_console(), loaded, stats, profiles, top)


def _analyze_tflite(path: Path) -> tuple[Any, "GraphStats"]:
    """A ``.tflite`` file: read from its flatbuffer (``builder.analysis.tflite_stats``)."""
    from dataclasses import dataclass, field

    from builder.analysis.tflite_stats import analyze_tflite, tflite_inputs
    from builder.loading import InputSpec

    @dataclass(frozen=True)
    class TfliteFacts:  # what the tables and model_facts read from a LoadedModel
        name: str
        source: str
        inputs: tuple
        output_names: tuple = ()
        source_kind: str = "tflite"
        opset: int = 0
        export_max_abs_diff: Optional[float] = None
        normalisation: Any = None
        extra: dict = field(default_factory=dict)

    inputs = tuple(InputSpec(name=n, shape=shape, dtype=dtype, dynamic_axes={}) for n, shape, dtype in tflite_inputs(path))
    return TfliteFacts(name=path.stem, source=str(path), inputs=inputs), analyze_tflite(path)


def wide_console() -> "Console":
    """The console every table of this command is fitted to (docs/cli.md: width and folding)."""
    from builder.cli.tables import table_console

    return table_console()


def model_facts(loaded: "LoadedModel") -> dict[str, Any]:
    return {
        "name": loaded.name,
        "source": loaded.source,
        "source_kind": loaded.source_kind,
        "opset": loaded.opset,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "dynamic_axes": s.dynamic_axes}
                   for s in loaded.inputs],
        "outputs": list(loaded.output_names),
        "export_max_abs_diff": loaded.export_max_abs_diff,
        "normalisation": loaded.normalisation.as_dict() if loaded.normalisation is not None else None,
    }


def estimates_for(stats: "GraphStats", profiles: Sequence["DeviceProfile"]) -> list["LatencyEstimate"]:
    """As built, plus the profile's preferred precision when it differs."""
    from builder.analysis import estimate_latency

    estimates = []
    for profile in profiles:
        estimates.append(estimate_latency(stats, profile))
        estimates.append(estimate_latency(stats, profile, profile.preferred_precision))
    return estimates


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:g}"


def _bytes(value: float) -> str:
    from builder.units import format_bytes

    return format_bytes(value)


def render_analysis(console: "Console", loaded: "LoadedModel", stats: "GraphStats",
                    profiles: Sequence["DeviceProfile"], top: int) -> None:
    """Rich tables: layers, totals, op histogram, estimates."""
    from rich.table import Table

    from builder.analysis.report import top_layers
    from builder.cli.tables import fit_table

    from builder.analysis import estimate_latency

    shapes = ", ".join(f"{s.name}={'x'.join(map(str, s.shape))}:{s.dtype}" for s in loaded.inputs)
    console.print(f"[bold]{loaded.name}[/bold] ({loaded.source_kind}: {loaded.source}) at {shapes}")
    if loaded.normalisation is not None:
        console.print(loaded.normalisation.summary(), markup=False)
    shown = top_layers(stats, top)
    counted = sum(1 for layer in stats.layers if not layer.fused)
    title = f"Layers ({len(shown)} of {counted} with most MACs)" if len(shown) < counted else f"Layers ({counted})"
    table = Table(title=title)
    for column in ("layer", "op", "params", "MACs", "output shape", "activation", "precision"):
        table.add_column(column, justify="left" if column in ("layer", "op", "output shape", "precision") else "right")
    for layer in shown:
        shape = "x".join(map(str, layer.output_shape)) if layer.output_shape is not None else "?"
        table.add_row(layer.name, layer.op_type, f"{layer.params:,}", f"{layer.macs:,}", shape,
                      _bytes(layer.activation_bytes), layer.precision)
    console.print(fit_table(table, console.width, keep=("op",), drop_order=("precision", "activation", "params")))

    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("parameters", f"{stats.params:,} ({_count(stats.params)})")
    totals.add_row("MACs", f"{stats.macs:,} ({_count(stats.macs)})")
    totals.add_row("weights (fp32)", _bytes(stats.fp32_weight_bytes))
    if stats.weight_bytes != stats.fp32_weight_bytes:
        totals.add_row("weights (as stored)", _bytes(stats.weight_bytes))
    totals.add_row("peak activation memory", _bytes(stats.peak_activation_bytes))
    totals.add_row("nodes / layers", f"{stats.node_count} / {counted}")
    if stats.unresolved_tensors:
        totals.add_row("tensors of unknown shape", str(len(stats.unresolved_tensors)))
    console.print(totals)
    for note in stats.notes:
        console.print(f"note: {note}", markup=False)

    histogram = Table(title="Op types")
    histogram.add_column("op")
    histogram.add_column("count", justify="right")
    for op, count in stats.op_histogram.items():
        histogram.add_row(op, str(count))
    console.print(histogram)

    estimates = Table(title="Estimates per device (roofline model, not measurements)")
    for column in ("device", "precision", "est. latency", "est. energy", "bound (compute/memory)", "memory needed", "fits RAM"):
        estimates.add_column(column, justify="left" if column in ("device", "precision") else "right")
    for profile in profiles:
        runs = [estimate_latency(stats, profile)]
        if profile.preferred_precision != "fp32" or stats.macs_by_precision.keys() - {"fp32"}:
            runs.append(estimate_latency(stats, profile, profile.preferred_precision))
        built = stats.dominant_precision
        for estimate in runs:
            if estimate.precision == "as-built":
                label = f"{built} (as built)"
            else:
                label = f"{estimate.precision} (preferred)"
            estimates.add_row(profile.name, label, f"{estimate.latency_ms:.3f} ms", f"{estimate.energy_mj:.2f} mJ",
                              f"{estimate.compute_bound_layers}/{estimate.memory_bound_layers}",
                              _bytes(estimate.memory_needed_bytes),
                              f"yes ({estimate.ram_fraction:.1%})" if estimate.fits_in_ram else f"NO ({estimate.ram_fraction:.0%})")
    console.print(fit_table(estimates, console.width, keep=("device", "precision"),
                            drop_order=("bound (compute/memory)", "est. energy", "memory needed")))
