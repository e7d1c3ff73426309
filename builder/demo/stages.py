"""``python -m builder.demo`` (what ``make demo`` runs): EdgeFleet's main job as named stages.

Each stage is a ``DemoStage(name, title, run)``; ``run(ctx)`` reads earlier stages' results from
``ctx.results``, writes files under ``ctx.out_dir`` (recording them with ``ctx.wrote``) and prints
with ``ctx.console``. Later steps of the loop (compress, build, deploy...) add their stage to
``STAGES``; ``--stage NAME`` runs a subset.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_OUT_DIR = Path("demo-out")


@dataclass
class DemoContext:
    """What stages share: the output folder, the console, the device profiles, and results by name."""

    out_dir: Path
    console: Any  # rich.console.Console
    profiles: dict[str, Any]  # name -> builder.profiles.DeviceProfile
    results: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    def wrote(self, path: Path) -> Path:
        self.written.append(Path(path))
        return Path(path)

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``out_dir/name`` atomically (temporary file in the same folder, then rename)."""
        path = self.out_dir / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return self.wrote(path)


@dataclass(frozen=True)
class DemoStage:
    name: str
    title: str
    run: Callable[[DemoContext], None]


def analyse_minilm(ctx: DemoContext) -> None:
    """Export all-MiniLM-L6-v2 (seq 128, checked against PyTorch), analyse it, estimate it per profile."""
    from builder.analysis import analyze_loaded
    from builder.analysis.report import analysis_report
    from builder.cli.analyze import estimates_for, model_facts, render_analysis
    from builder.loading import load_model
    from builder.zoo.minilm import INPUT_SPEC

    with ctx.console.status("exporting all-MiniLM-L6-v2 to ONNX and checking it against PyTorch..."):
        loaded = load_model("builder.zoo.minilm:minilm", INPUT_SPEC, workdir=ctx.out_dir)
    ctx.wrote(loaded.onnx_path)
    ctx.console.print(f"exported {loaded.onnx_path} (max abs diff vs PyTorch {loaded.export_max_abs_diff:.2g})")
    stats = analyze_loaded(loaded)
    profiles = list(ctx.profiles.values())
    render_analysis(ctx.console, loaded, stats, profiles, top=15)
    ctx.write_json("minilm-analysis.json", analysis_report(model_facts(loaded), stats, estimates_for(stats, profiles)))
    ctx.results["minilm"] = loaded
    ctx.results["minilm_stats"] = stats


STAGES: tuple[DemoStage, ...] = (
    DemoStage("analyse", "Analyse all-MiniLM-L6-v2 (seq 128): layers, totals, estimates per device", analyse_minilm),
    DemoStage("fleet", "Deploy to a fleet: embedded broker, builder serve, 3 agents (Pi 4, Jetson Orin Nano, Android), push, status, plot",
              lambda ctx: __import__("builder.demo.fleet", fromlist=["demo_stage"]).demo_stage(ctx)),
    # Keep last: the re-compression loop reacting to a device slowed down on purpose (own serve + agent).
    DemoStage("loop", "Keep devices fast: throttle one device, watch the re-compression loop step down and back up",
              lambda ctx: __import__("builder.demo.loop", fromlist=["demo_stage"]).demo_stage(ctx)),
)


def run_demo(out_dir: Path, stage_names: Sequence[str] | None = None, console: Any = None) -> DemoContext:
    """Run the named stages (all when None) in order; returns the context with results and files."""
    from builder.cli.analyze import wide_console
    from builder.errors import UsageError
    from builder.profiles import load_profiles

    known = {stage.name for stage in STAGES}
    unknown = [name for name in stage_names or () if name not in known]
    if unknown:
        raise UsageError(f"unknown demo stage '{unknown[0]}'; stages: {', '.join(s.name for s in STAGES)}")
    from builder.demo.output import prepare_output_dir

    out_dir = prepare_output_dir(Path(out_dir))  # fresh on every run; the fleet stage's builds are kept
    ctx = DemoContext(out_dir=out_dir, console=console or wide_console(), profiles=load_profiles())
    for number, stage in enumerate(STAGES, 1):
        if stage_names and stage.name not in stage_names:
            continue
        ctx.console.rule(f"[bold]{number}. {stage.name}[/bold]: {stage.title}")
        started = time.monotonic()
        stage.run(ctx)
        ctx.console.print(f"[dim]{stage.name} took {time.monotonic() - started:.1f} s[/dim]")
    ctx.console.rule("outputs")
    for path in ctx.written:
        ctx.console.print(f"wrote {path}")
    ctx.console.print(f"all outputs are in {out_dir.resolve()}")
    return ctx


def main(argv: Sequence[str] | None = None) -> None:
    from builder.cli.errors import guarded
    from builder.errors import BuilderError

    parser = argparse.ArgumentParser(prog="python -m builder.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR,
                        help="output folder (default: ./demo-out; emptied on every run except its build cache)")
    parser.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    parser.add_argument("--no-wait", action="store_true",
                        help="end after the stages; by default, at a terminal, the fleet's dashboard stays up until Ctrl-C")
    args = parser.parse_args(argv)
    guarded(lambda: _run_reporting_crashes(args.out, args.stage, wait=not args.no_wait), (BuilderError,), "demo")


def _run_reporting_crashes(out_dir: Path, stage_names: Sequence[str] | None, wait: bool = False) -> None:
    """A bug (not a BuilderError) still ends in one line: the traceback goes to a file in the output
    folder, named in that line; Ctrl-C stops the children (the stages' ``finally``) and says so."""
    import sys
    import traceback

    from builder.errors import BuilderError, DemoError

    try:
        ctx = run_demo(out_dir, stage_names)
        fleet = ctx.results.get("fleet")
        if fleet is not None:
            from builder.demo.dashboard import offer_dashboard

            ctx.console.rule("[bold]dashboard[/bold]")
            offer_dashboard(fleet.home, ctx.out_dir / "fleet" / "logs" / "dashboard.log",
                            lambda text: ctx.console.print(text, markup=False, highlight=False), wait)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        sys.exit(130)
    except BuilderError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported, with its traceback in a file
        log = Path(out_dir).resolve() / "demo-crash.log"
        try:
            log.write_text(traceback.format_exc(), encoding="utf-8")
            where = f"; traceback in {log}"
        except OSError:
            where = ""
        raise DemoError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}") from exc


if __name__ == "__main__":
    main()
