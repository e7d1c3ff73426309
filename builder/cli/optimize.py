"""`builder optimize`: search compression recipes against targets; Pareto front, chosen recipe, ladder."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer

from builder.cli.options import HiddenAlias, InputShapeOption, ProfileOption, StoreOption, merged_input_shapes, resolve_alias
from builder.cli.tables import fit_table, table_console

if TYPE_CHECKING:
    from rich.console import Console

    from builder.search.objectives import ScoredCandidate
    from builder.search.optimize import SearchOutcome


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the builder app."""

    @app.command("optimize")
    def optimize(
        model: str = typer.Argument(..., help="An .onnx file, a TorchScript file, or package.module:factory."),
        input_shape: Optional[list[str]] = InputShapeOption(),
        profile: Optional[str] = ProfileOption("Device profile the latency is estimated for; required."),
        device_alias: Optional[str] = HiddenAlias("--device", "-d"),
        data: str = typer.Option(..., "--data", help="Evaluation/calibration data: .npz (inputs, optional labels y) or package.module:function."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data: enables fine-tuning and distillation in the space."),
        max_latency: Optional[str] = typer.Option(None, "--max-latency", help="Estimated device latency target, e.g. 20ms."),
        max_size: Optional[str] = typer.Option(None, "--max-size", help="Download (zstd) size target, e.g. 5MB or 5MiB."),
        max_accuracy_drop: Optional[str] = typer.Option(None, "--max-accuracy-drop", help="Allowed accuracy drop vs the original, e.g. 1% (needs labels)."),
        min_fidelity: Optional[str] = typer.Option(None, "--min-fidelity", help="Fidelity floor: top-1 agreement (classifiers) or mean cosine (embeddings), e.g. 0.99."),
        min_accuracy: Optional[str] = typer.Option(None, "--min-accuracy", help="Absolute accuracy floor, e.g. 0.95 (needs labels)."),
        trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Total trials of the study (a rerun continues up to N). Default 30 without --time-budget."),
        time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Wall-clock budget of this run, e.g. 30m (running trials finish)."),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Worker processes on this machine (each loads the model)."),
        storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite in --out); e.g. postgresql://user@host/db to share a search between machines."),
        study: Optional[str] = typer.Option(None, "--study", help="Study name (default: derived from model, data, device, targets); workers of one search use the same."),
        out: Path = typer.Option(Path("optimize-out"), "--out", "-o", help="Output folder: report.json, recipe.toml, front.png, ladder.json, study.db."),
        tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="Also log every trial and the front as TensorBoard event files here."),
        measure_on: Optional[str] = typer.Option(None, "--measure-on", help="Benchmark candidates that meet the host-side targets on this fleet device (its p50 becomes their latency)."),
        broker: Optional[str] = typer.Option(None, "--broker", help="With --measure-on: mqtt://HOST:PORT of the fleet's broker (default: the running `builder serve`'s)."),
        trial_runs: int = typer.Option(50, "--trial-runs", help="With --measure-on: timed runs per on-device trial."),
        trial_timeout: str = typer.Option("5m", "--trial-timeout", help="With --measure-on: give up on one trial (transfer, load, benchmark) after this long."),
        sampler: str = typer.Option("nsga2", "--sampler", help="nsga2 or tpe."),
        population: int = typer.Option(12, "--population", help="NSGA-II population size (random start = one population)."),
        seed: int = typer.Option(0, "--seed", help="Sampler seed (worker k uses seed + k)."),
        threads: int = typer.Option(1, "--threads", help="ONNX Runtime/torch threads per worker."),
        eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Evaluate on the first N samples of --data only (faster)."),
        latency_factor: Optional[float] = typer.Option(None, "--latency-factor", help="Device latency = estimate x this (default: learned from the fleet store's benchmarks)."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", "--registry-dir", help="EdgeFleet data dir: registry, fleet store, candidate cache (default $EDGEFLEET_HOME or the user data dir)."),
        store_url: Optional[str] = StoreOption(),
        cache: Optional[Path] = typer.Option(None, "--cache", help="Candidate cache file (default <data dir>/search-cache.sqlite)."),
        ladder: bool = typer.Option(True, "--ladder/--no-ladder", help="Build, sign and register the front as the model's ladder in the registry."),
        ladder_rungs: int = typer.Option(5, "--ladder-rungs", help="At most this many rungs (evenly over the front)."),
        profiles_dir: Optional[Path] = typer.Option(None, "--profiles-dir", help="Extra directory of profile TOML files."),
        as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout (tables and progress go to stderr)."),
    ) -> None:
        """Search compression recipes for MODEL on a device against targets (optuna, multi-objective)."""
        import logging

        from builder.artifacts.registry import default_home
        from builder.errors import BuilderError, SearchError, UsageError
        from builder.search import objectives as obj
        from builder.search.evaluate import EvaluationSetup
        from builder.search.optimize import SearchConfig
        from builder.search.pareto import explain_infeasible, front_of, recommend

        logging.basicConfig(level=logging.WARNING)
        device = resolve_alias(profile, device_alias, "--profile", "--device")
        shapes = merged_input_shapes(input_shape)
        targets = obj.Targets(
            max_latency_ms=obj.parse_latency_ms(max_latency) if max_latency else None,
            max_download_bytes=obj.parse_size_bytes(max_size) if max_size else None,
            max_accuracy_drop=obj.parse_accuracy_drop(max_accuracy_drop) if max_accuracy_drop else None,
            min_fidelity=obj.parse_fidelity(min_fidelity) if min_fidelity else None,
            min_accuracy=obj.parse_fidelity(min_accuracy, "--min-accuracy") if min_accuracy else None,
        )
        labels = _npz_has_labels(Path(data))
        if labels is not None:  # an accuracy target on unlabelled data: say so now, not after the baseline
            obj.check_targets_against_data(targets, labels)
        budget_s = obj.parse_duration_s(time_budget) if time_budget else None
        if trials is None and budget_s is None:
            trials = 30
        if trials is not None and trials < 1:
            raise UsageError("--trials must be at least 1")
        if jobs < 1 or threads < 1:
            raise UsageError("--jobs and --threads must be at least 1")
        home = Path(data_dir) if data_dir else default_home()
        if latency_factor is not None:
            if latency_factor <= 0:
                raise UsageError("--latency-factor must be positive")
            calibration = obj.Calibration(latency_factor, 0, "--latency-factor")
        else:
            calibration = obj.fleet_calibration(home, device, store_url)
        measure = None
        if measure_on is not None:
            from builder.search.measure import MeasureSetup

            if trial_runs < 1:
                raise UsageError("--trial-runs must be at least 1")
            measure = MeasureSetup(device_id=measure_on, data_dir=str(home), store_url=store_url, broker=broker, runs=trial_runs,
                                   timeout_s=obj.parse_duration_s(trial_timeout, "--trial-timeout"))
        elif broker is not None:
            raise UsageError("--broker is for --measure-on DEVICE; pass both or neither")
        if ladder or measure is not None:
            if measure is not None:
                _require_signing_key(home, "--measure-on sends candidates")
            else:
                _require_signing_key(home, "the ladder is built", alternative=" or pass --no-ladder")
        out.mkdir(parents=True, exist_ok=True)
        setup = EvaluationSetup(model=model, device=device, data=data, input_shapes=shapes, train_data=train_data,
                                profiles_dir=str(profiles_dir) if profiles_dir else None, threads=threads, seed=seed,
                                max_eval_samples=eval_samples, workdir=str(out / ".work"))
        config = SearchConfig(setup=setup, targets=targets, out_dir=str(out),
                              cache_path=str(cache or home / "search-cache.sqlite"), storage=storage, study_name=study,
                              trials=trials, time_budget_s=budget_s, jobs=jobs, sampler=sampler,
                              population_size=population, seed=seed, calibration=calibration, measure=measure)
        console = table_console(stderr=as_json)
        console.print(f"[bold]builder optimize[/bold] {model} on {device}: {targets.describe()}; "
                      f"latency calibration ×{calibration.factor:.3g} ({calibration.source})"
                      + (f"; measuring candidates on {measure_on}" if measure_on else ""))
        host_warning = calibration_host_warning(home, device, calibration, profiles_dir, store_url)
        if host_warning:
            typer.echo(f"warning: {host_warning}", err=True)
        outcome = _run_with_progress(config, console)
        candidates = list(outcome.candidates)
        front = front_of(candidates)
        chosen = recommend(candidates, targets)
        explanation = None if chosen is not None else explain_infeasible(candidates, targets, outcome.baseline, calibration)
        _print_front(console, outcome, front, chosen, targets)
        from builder.search import outputs

        extra = {"model": model, "device": device, "data": data, "train_data": train_data,
                 "measure_on": measure_on, "command": " ".join(sys.argv)}
        report = outputs.build_report(outcome, targets, front, chosen, explanation, extra)
        if host_warning:
            report["calibration_warning"] = host_warning
        written = [outputs.write_plot(out / "front.png", outcome, front, chosen, targets, device)]
        if tensorboard is not None:
            written.append(outputs.log_tensorboard(tensorboard, outcome, front, chosen))
        if explanation is not None:
            outputs.write_report(out / "report.json", report)
            _print_infeasible(console, explanation, outcome)
            console.print(f"report: {out / 'report.json'}")
            if as_json:
                print(json.dumps(report, indent=2, default=str))
            raise SearchError(explanation.summary)
        assert chosen is not None
        if chosen.steps:
            written.append(outputs.write_recipe(out / "recipe.toml", chosen, name=f"optimized-{device}"))
        rungs = outputs.ladder_rungs(front, outcome, ladder_rungs)
        artifact_ids: list[Optional[str]] = [None] * len(rungs)
        model_name = None
        if ladder and rungs:
            # The search's outputs first: a ladder build that fails (or is interrupted) loses nothing.
            report["ladder"] = {"registry": str(home), "model_name": None, "artifact_ids": artifact_ids,
                                "skipped": [], "status": "building"}
            outputs.write_ladder(out, rungs, outcome, device, model, artifact_ids)
            outputs.write_report(out / "report.json", report)
            console.print(f"building the ladder: {len(rungs)} rungs (compress, build, verify, sign, register)")
            try:
                ladder_build = outputs.register_ladder(
                    rungs, outcome, model=model, profile=device, input_shapes=shapes, data=data, registry_dir=home,
                    model_name=None, out_dir=out, threads=threads, profiles_dir=profiles_dir,
                    on_stage=lambda text: console.print(f"  {text}"), train_data=train_data)
            except BuilderError as exc:
                report["ladder"].update(status="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                outputs.write_report(out / "report.json", report)
                console.print(f"report: {out / 'report.json'} (the search's results; no ladder)")
                raise
            model_name, rungs, artifact_ids = ladder_build.model_name, list(ladder_build.rungs), list(ladder_build.artifact_ids)
            for skip in ladder_build.skipped:
                console.print(f"[yellow]ladder: left off[/yellow] {skip['recipe']}: {skip['reason']}")
            report["ladder"] = {"registry": str(home), "model_name": model_name, "artifact_ids": artifact_ids,
                                "skipped": list(ladder_build.skipped), "status": "built"}
        else:
            report["ladder"] = {"registry": None, "reason": "--no-ladder" if not ladder else "empty front"}
        written.append(outputs.write_ladder(out, rungs, outcome, device, model_name or model, artifact_ids))
        written.append(outputs.write_report(out / "report.json", report))
        console.print(f"[green]chosen[/green]: {_describe(chosen)}")
        for path in written:
            console.print(f"  wrote {path}")
        if as_json:
            print(json.dumps(report, indent=2, default=str))


def _npz_has_labels(path: Path) -> Optional[bool]:
    """Whether an ``.npz`` --data holds labels (key ``y``), read from its index without loading arrays;
    None when --data is not a readable .npz (a factory: the search checks once it has the data)."""
    import zipfile

    from builder.compression.data import LABEL_KEY

    if path.suffix != ".npz" or not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{LABEL_KEY}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def _require_signing_key(home: Path, why: str, alternative: str = "") -> None:
    from builder.artifacts.signing import key_paths
    from builder.errors import UsageError
    from builder.targets.profile_build import default_key_dir

    if not key_paths(default_key_dir(home)).private.is_file():
        raise UsageError(f"{why} as signed artifacts but there is no signing key in {default_key_dir(home)}; "
                         f"run `builder keys init` (same --data-dir){alternative}")


_SAME_ARCH = {"aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64", "amd64": "x86_64"}


def calibration_host_warning(home: Path, profile: str, calibration: Any, profiles_dir: Optional[Path],
                             store_url: Optional[str] = None) -> Optional[str]:
    """A calibration learned from agents whose machine is not the profile's architecture (agents
    posing as a Pi on a laptop) scales estimates to that host: say so on its own line."""
    if calibration.samples == 0 or not str(calibration.source).startswith("fleet store"):
        return None
    from builder.fleet.transport.store import open_store
    from builder.profiles import get_profile

    arch = get_profile(profile, [profiles_dir] if profiles_dir else None).arch.lower()
    with open_store(home, store_url) as store:
        others = sorted({(d.device_id, d.machine) for d in store.devices() if d.profile == profile and d.machine
                         and _SAME_ARCH.get(d.machine.lower(), d.machine.lower()) != _SAME_ARCH.get(arch, arch)})
    if not others:
        return None
    hosts = ", ".join(f"{device_id} ({machine})" for device_id, machine in others[:4])
    return (f"the {profile} latency calibration ×{calibration.factor:.3g} was learned from agents that run on "
            f"{hosts}, not on {arch} hardware: device latencies are scaled to that machine, not to a real {profile}; "
            "pass --latency-factor F to override")


def _describe(c: "ScoredCandidate") -> str:
    from builder.search.space import describe

    return describe(c.steps)


def _run_with_progress(config: Any, console: "Console") -> "SearchOutcome":
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from builder.search.optimize import run_search

    columns = [TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("best: {task.fields[best]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("search", total=config.trials, best="-")

        def on_progress(p: Any) -> None:
            progress.update(task, completed=p.finished, best=(p.best or "none feasible yet")[:90])

        try:
            return run_search(config, on_progress=on_progress)
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"[yellow]interrupted[/yellow]: finished trials are kept in {config.storage_url()}; "
                          "rerun the same command to continue")
            raise


def _print_front(console: "Console", outcome: "SearchOutcome", front: Sequence["ScoredCandidate"],
                 chosen: Optional["ScoredCandidate"], targets: Any) -> None:
    from rich.table import Table

    from builder.search.objectives import format_bytes, quality_of

    quality = "accuracy" if outcome.use_accuracy else "fidelity"
    table = Table(title=f"Pareto front ({len(front)} of {len(outcome.candidates)} candidates; "
                        f"{outcome.evaluations_this_run} evaluated, {outcome.cache_hits_this_run} from cache this run)")
    for header in ("", "trial", "recipe", quality, "device latency", "download", "host p50", "energy", "meets targets"):
        table.add_column(header, overflow="fold")
    base = outcome.baseline
    table.add_row("", "-", "(original model)", f"{base.accuracy:.4f}" if outcome.use_accuracy and base.accuracy is not None else "1.0000",
                  f"{base.device_latency_ms * outcome.calibration.factor:.3f} ms (est.)", format_bytes(base.download_bytes),
                  f"{base.host_latency_ms:.3f} ms", f"{base.energy_mj * outcome.calibration.factor:.3f} mJ", "")
    for c in front:
        m = c.metrics
        table.add_row("★" if chosen is not None and c.key == chosen.key else "", str(c.trial_number), _describe(c),
                      f"{quality_of(m, outcome.use_accuracy):.4f}", _latency_cell(m, outcome),
                      format_bytes(m.download_bytes), f"{m.host_latency_ms:.3f} ms", f"{c.objectives[3]:.3f} mJ",
                      "yes" if c.feasible else "no: " + ", ".join(n for n, v in c.violations.items() if v > 0))
    console.print(fit_table(table, console.width, keep=("trial",), drop_order=("energy", "host p50", "download")))
    console.print(f"latency: {outcome.estimate_source}; calibration ×{outcome.calibration.factor:.3g} "
                  f"({outcome.calibration.source}); trials: {outcome.trials_by_state}")
    if outcome.measure_on is not None:
        measured = sum(1 for c in outcome.candidates if c.metrics.measured_on_device_ms is not None)
        console.print(f"measured on {outcome.measure_on}: {measured} of {len(outcome.candidates)} candidates "
                      "(the rest missed a host-side target: estimate)")


def _latency_cell(m: Any, outcome: "SearchOutcome") -> str:
    """Device latency with its source: an on-device p50, or the calibrated estimate."""
    from builder.search.objectives import calibrated_latency_ms

    if m.measured_on_device_ms is not None:
        return f"{m.measured_on_device_ms:.3f} ms (measured)"
    return f"{calibrated_latency_ms(m, outcome.calibration):.3f} ms (est.)"


def _print_infeasible(console: "Console", explanation: Any, outcome: "SearchOutcome") -> None:
    from rich.table import Table

    from builder.search.objectives import format_bytes, quality_of

    console.print("[red]no candidate meets the targets[/red]")
    for line in explanation.per_constraint:
        console.print(f"  {line}")
    table = Table(title="closest candidates")
    for header in ("trial", "recipe", "quality", "device latency", "download", "total violation"):
        table.add_column(header)
    for c in explanation.closest:
        m = c.metrics
        table.add_row(str(c.trial_number), _describe(c), f"{quality_of(m, outcome.use_accuracy):.4f}",
                      _latency_cell(m, outcome), format_bytes(m.download_bytes),
                      f"{c.total_violation:.3f}")
    console.print(fit_table(table, console.width, keep=("trial",), drop_order=("total violation", "download")))
