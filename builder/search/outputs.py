"""What a finished search leaves behind: report.json, the chosen recipe (TOML), the Pareto plot (PNG),
ladder.json and the registry ladder, and TensorBoard event files. Files are written atomically."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from builder.atomic_files import atomic_write_bytes
from builder.errors import CompressionError, SearchError, TargetError, VerificationError
from builder.search.measure import latency_source
from builder.search.objectives import (
    OBJECTIVE_NAMES,
    ScoredCandidate,
    Targets,
    calibrated_latency_ms,
    format_bytes,
    quality_of,
)
from builder.search.optimize import SearchOutcome
from builder.search.pareto import InfeasibleExplanation
from builder.search.space import describe, recipe_from_steps

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1


def candidate_row(c: ScoredCandidate, outcome: SearchOutcome) -> dict[str, Any]:
    """One candidate as plain data (report, ladder, TensorBoard)."""
    m = c.metrics
    return {
        "trial": c.trial_number,
        "recipe": describe(c.steps),
        "steps": [dict(s) for s in c.steps],
        "key": c.key,
        "quality": quality_of(m, outcome.use_accuracy),
        "accuracy": m.accuracy,
        "fidelity": m.fidelity,
        "device_latency_ms": calibrated_latency_ms(m, outcome.calibration),
        "latency_source": latency_source(m),  # "measured on DEVICE" or "estimate"
        "estimated_latency_ms": m.device_latency_ms,  # uncalibrated roofline
        "measured_p50_ms": m.measured_on_device_ms,
        "measured_p95_ms": m.measured_p95_ms,
        "trial_artifact_id": m.trial_artifact_id,
        "download_bytes": m.download_bytes,
        "file_bytes": m.file_bytes,
        "host_latency_ms": m.host_latency_ms,
        "energy_mj": c.objectives[3],
        "params": m.params,
        "macs": m.macs,
        "precision": m.precision,
        "flags": list(m.flags),
        "feasible": c.feasible,
        "violations": dict(c.violations),
    }


def build_report(outcome: SearchOutcome, targets: Targets, front: Sequence[ScoredCandidate],
                 chosen: Optional[ScoredCandidate], explanation: Optional[InfeasibleExplanation],
                 extra: Mapping[str, Any]) -> dict[str, Any]:
    front_keys = {c.key for c in front}
    return {
        "schema": REPORT_SCHEMA,
        **dict(extra),
        "study": {"name": outcome.study_name, "storage": outcome.storage, "trials": outcome.trials_total,
                  "trials_by_state": outcome.trials_by_state},
        "this_run": {"evaluations": outcome.evaluations_this_run, "cache_hits": outcome.cache_hits_this_run,
                     "wall_s": round(outcome.wall_s, 2)},
        "targets": targets.to_dict(),
        "objectives": list(OBJECTIVE_NAMES),
        "quality": "accuracy" if outcome.use_accuracy else f"fidelity ({'top-1 agreement' if outcome.task == 'classify' else 'mean cosine'})",
        "calibration": asdict(outcome.calibration),
        "latency_estimate": outcome.estimate_source,
        "baseline": outcome.baseline.to_dict(),
        "chosen": candidate_row(chosen, outcome) if chosen is not None else None,
        "infeasible": None if explanation is None else {
            "summary": explanation.summary, "per_constraint": list(explanation.per_constraint),
            "closest": [candidate_row(c, outcome) for c in explanation.closest]},
        "front": [candidate_row(c, outcome) for c in front],
        "candidates": [dict(candidate_row(c, outcome), on_front=c.key in front_keys) for c in outcome.candidates],
        "pruned": list(outcome.pruned),
        "failed": list(outcome.failed),
    }


def write_report(path: Path, report: Mapping[str, Any]) -> Path:
    return atomic_write_bytes(Path(path), json.dumps(report, indent=2, default=str).encode(), make_parents=True)


def write_recipe(path: Path, chosen: ScoredCandidate, name: str) -> Path:
    """The chosen recipe through the engine's TOML writer (what ``builder compress/build --recipe`` read)."""
    if not chosen.steps:
        raise SearchError("the chosen point is the original model (no step); nothing to write as a recipe")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return recipe_from_steps(chosen.steps, name=name).write_toml(path)


def latency_quality_front(candidates: Sequence[ScoredCandidate]) -> list[ScoredCandidate]:
    """The 2-D non-dominated front of the two plotted objectives (device latency, quality loss),
    feasible candidates only when there are any, sorted by latency: latency and quality both rise
    along it, so it draws as a step line (the 4-objective front projected on two axes zig-zags)."""
    pool = [c for c in candidates if c.feasible] or list(candidates)
    front: list[ScoredCandidate] = []
    best_loss = float("inf")
    for c in sorted(pool, key=lambda c: (c.objectives[1], c.objectives[0])):
        if c.objectives[0] < best_loss:
            front.append(c)
            best_loss = c.objectives[0]
    return front


def write_plot(path: Path, outcome: SearchOutcome, front: Sequence[ScoredCandidate],
               chosen: Optional[ScoredCandidate], targets: Targets, device: str) -> Path:
    """Quality vs calibrated device latency: the 2-D front as a step line, every candidate coloured by
    download size, the 4-objective front edged, chosen circled; latency axis from zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "accuracy" if outcome.use_accuracy else "fidelity"
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    candidates = list(outcome.candidates)
    four_d = {f.key for f in front}
    if candidates:
        # every candidate: colour = download size; the 4-objective front members edged in blue
        points = ax.scatter([c.objectives[1] for c in candidates], [1 - c.objectives[0] for c in candidates],
                            c=[c.metrics.download_bytes / 1e3 for c in candidates], cmap="viridis", s=45,
                            edgecolors=["tab:red" if not c.feasible else ("tab:blue" if c.key in four_d else "none")
                                        for c in candidates], linewidths=1.2, alpha=0.85, zorder=3,
                            label="candidates (red edge: infeasible; blue: on the 4-objective front)")
        fig.colorbar(points, ax=ax, label="download (kB)")
    shown = latency_quality_front(candidates)
    if shown:
        xs = [c.objectives[1] for c in shown]
        ys = [1 - c.objectives[0] for c in shown]
        ax.plot(xs, ys, drawstyle="steps-post", color="tab:blue", lw=1.5, zorder=2,
                label=f"{label} vs latency front (non-dominated in these two)")
    if chosen is not None:
        ax.scatter([chosen.objectives[1]], [1 - chosen.objectives[0]], s=260, facecolors="none",
                   edgecolors="tab:green", linewidths=2.5, label="chosen", zorder=4)
    base_quality = outcome.baseline.accuracy if outcome.use_accuracy and outcome.baseline.accuracy is not None else 1.0
    ax.scatter([outcome.baseline.device_latency_ms * outcome.calibration.factor], [base_quality], marker="*",
               s=200, color="black", label="original model")
    if targets.max_latency_ms is not None:
        ax.axvline(targets.max_latency_ms, color="tab:orange", ls="--", lw=1, label="max latency")
    floor = None
    if targets.min_fidelity is not None and not outcome.use_accuracy:
        floor = targets.min_fidelity
    elif targets.max_accuracy_drop is not None and outcome.baseline.accuracy is not None:
        floor = outcome.baseline.accuracy - targets.max_accuracy_drop
    elif targets.min_accuracy is not None:
        floor = targets.min_accuracy
    if floor is not None:
        ax.axhline(floor, color="tab:purple", ls="--", lw=1, label=f"{label} floor")
    if outcome.measure_on is not None:
        ax.set_xlabel(f"latency on {device} (ms; measured on {outcome.measure_on} where tried, "
                      f"else estimate × {outcome.calibration.factor:.3g})")
    else:
        ax.set_xlabel(f"estimated latency on {device} (ms, calibration ×{outcome.calibration.factor:.3g})")
    ax.set_ylabel(label)
    ax.set_title(f"builder optimize: {len(outcome.candidates)} candidates, {len(front)} on the 4-objective front")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def ladder_rungs(front: Sequence[ScoredCandidate], outcome: SearchOutcome, max_rungs: int) -> list[ScoredCandidate]:
    """The front from most accurate to fastest, thinned evenly to ``max_rungs`` (both ends kept)."""
    ordered = sorted(front, key=lambda c: (c.objectives[0], c.objectives[1]))
    ordered = [c for c in ordered if c.steps]  # the original model is not a build of a recipe
    if len(ordered) <= max_rungs:
        return ordered
    if max_rungs == 1:
        return ordered[:1]
    picks = sorted({round(i * (len(ordered) - 1) / (max_rungs - 1)) for i in range(max_rungs)})
    return [ordered[i] for i in picks]


def rung_metrics(c: ScoredCandidate, outcome: SearchOutcome, index: int,
                 search_args: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What the re-compression loop reads from a registry ladder entry (``rung_from_metrics``), plus
    ``source``/``input_shape``/``data`` so the loop can start a new search of the same model."""
    m = c.metrics
    return {**dict(search_args or {}),"label": f"rung {index}: {describe(c.steps)}", "device_latency_ms": m.device_latency_ms,
            "calibrated_latency_ms": calibrated_latency_ms(m, outcome.calibration), "accuracy": m.accuracy,
            "fidelity": m.fidelity, "energy_mj": m.energy_mj, "download_bytes": m.download_bytes,
            "host_latency_ms": m.host_latency_ms, "recipe": [dict(s) for s in c.steps]}


def write_ladder(out_dir: Path, rungs: Sequence[ScoredCandidate], outcome: SearchOutcome, profile: str,
                 model_name: str, artifact_ids: Sequence[Optional[str]]) -> Path:
    """``ladder.json`` in the shape ``builder.fleet.loop.service.load_ladder_json`` reads, plus each rung's recipe."""
    entries = []
    for index, (c, artifact_id) in enumerate(zip(rungs, artifact_ids)):
        metrics = rung_metrics(c, outcome, index)
        entries.append({"rung": index, "artifact_id": artifact_id, "estimated_latency_ms": metrics["device_latency_ms"],
                        **{k: v for k, v in metrics.items() if k != "device_latency_ms"}})
    document = {"model": model_name, "profile": profile, "rungs": entries}
    return atomic_write_bytes(Path(out_dir) / "ladder.json", json.dumps(document, indent=2).encode(), make_parents=True)


@dataclass(frozen=True)
class LadderBuild:
    """The rungs that built and were registered (in ladder order), and those dropped, with why."""

    model_name: str
    rungs: tuple[ScoredCandidate, ...]
    artifact_ids: tuple[str, ...]
    skipped: tuple[dict[str, str], ...] = ()


# A rung's rebuild runs the engine's own checks again (fidelity, the int8 latency guard, output
# verification); one that fails them now is left off the ladder rather than losing the search.
_RUNG_FAILURES = (CompressionError, TargetError, VerificationError)


def register_ladder(rungs: Sequence[ScoredCandidate], outcome: SearchOutcome, *, model: str, profile: str,
                    input_shapes: Optional[str], data: str, registry_dir: Optional[Path], model_name: Optional[str],
                    out_dir: Path, threads: int, profiles_dir: Optional[Path],
                    on_stage: Any = None, train_data: Optional[str] = None) -> LadderBuild:
    """Build, verify, sign and register each rung (``builder build --recipe``), then store the ladder.

    ``train_data`` is the search's ``--train-data``: a rung whose recipe fine-tunes or distils is
    trained again on it (without it every such rung was refused, after the whole search).

    A rung whose build fails the engine's checks is skipped and reported (a ladder never holds an
    unverified rung); other errors (no signing key, a broken registry) propagate, and so does the
    case where no rung builds at all.
    """
    from builder.artifacts.registry import Registry
    from builder.targets.profile_build import build_for_profile

    recipes_dir = Path(out_dir) / "ladder-recipes"
    built: list[tuple[ScoredCandidate, str]] = []
    skipped: list[dict[str, str]] = []
    name: Optional[str] = model_name
    for c in rungs:
        recipe_path = write_recipe(recipes_dir / f"rung-{len(built)}.toml", c, name=f"ladder-rung-{len(built)}")
        try:
            result = build_for_profile(model, profile, recipe=recipe_path, input_shapes=input_shapes, data=data,
                                       registry_dir=registry_dir, name=model_name, threads=threads,
                                       profiles_dirs=[profiles_dir] if profiles_dir else None, on_stage=on_stage,
                                       train_data=train_data)
        except _RUNG_FAILURES as exc:
            recipe_path.unlink(missing_ok=True)
            skipped.append({"recipe": describe(c.steps), "reason": str(exc)})
            log.warning("ladder: rung %s left off: %s", describe(c.steps), exc)
            continue
        built.append((c, result.artifact_id))
        name = result.manifest.model_name
    if not built:
        reasons = "; ".join(f"{s['recipe']}: {s['reason']}" for s in skipped)
        raise SearchError(f"no rung of the ladder built ({reasons}); the search's outputs are kept, "
                          "rerun with --no-ladder or build a recipe with `builder build --recipe`")
    registry = Registry(registry_dir)
    assert name is not None
    registry.clear_ladder(name, profile)
    for index, (c, artifact_id) in enumerate(built):
        search_args = {"source": model, "input_shape": input_shapes, "data": data}
        registry.add_ladder_rung(name, profile, index, artifact_id, rung_metrics(c, outcome, index, search_args))
    return LadderBuild(name, tuple(c for c, _ in built), tuple(i for _, i in built), tuple(skipped))


def log_tensorboard(log_dir: Path, outcome: SearchOutcome, front: Sequence[ScoredCandidate],
                    chosen: Optional[ScoredCandidate]) -> Path:
    """Every trial's metrics as scalars (step = trial number), the front and the chosen recipe as text."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise SearchError("--tensorboard needs the 'tensorboard' package: pip install 'tensorboard>=2.21,<2.22'") from exc
    log_dir = Path(log_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for c in sorted(outcome.candidates, key=lambda c: c.trial_number or 0):
            row = candidate_row(c, outcome)
            step = c.trial_number or 0
            for key in ("quality", "device_latency_ms", "download_bytes", "energy_mj", "host_latency_ms", "fidelity"):
                if row[key] is not None:
                    writer.add_scalar(f"trial/{key}", float(row[key]), step)
            if row["accuracy"] is not None:
                writer.add_scalar("trial/accuracy", float(row["accuracy"]), step)
            writer.add_scalar("trial/feasible", 1.0 if c.feasible else 0.0, step)
        for rank, c in enumerate(front):
            row = candidate_row(c, outcome)
            writer.add_scalar("front/quality", float(row["quality"]), rank)
            writer.add_scalar("front/device_latency_ms", float(row["device_latency_ms"]), rank)
            writer.add_scalar("front/download_bytes", float(row["download_bytes"]), rank)
        table = ["| trial | recipe | quality | est. latency (ms) | download |", "|---|---|---|---|---|"]
        for c in front:
            row = candidate_row(c, outcome)
            table.append(f"| {c.trial_number} | {row['recipe']} | {row['quality']:.4f} | "
                         f"{row['device_latency_ms']:.3f} | {format_bytes(row['download_bytes'])} |")
        writer.add_text("pareto_front", "\n".join(table), 0)
        writer.add_text("chosen", describe(chosen.steps) if chosen is not None else "none: no candidate met the targets", 0)
        writer.flush()
    finally:
        writer.close()
    return log_dir
