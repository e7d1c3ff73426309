"""Optimiser benchmark: `builder optimize`'s chosen recipe vs plain quantize_dynamic and vs the best
hand-written recipe of the compression benchmark (bench/compress.py), all measured in the same run.

    .venv/bin/python bench/optimize.py                       # both parts, 30-minute budget each
    .venv/bin/python bench/optimize.py --part digits --budget 10m --no-write

Parts (device profile raspberry-pi-4 for the latency estimate):
1. digits CNN (real labels, --train-data so fine-tuning/distillation are in the space), target
   accuracy drop <= 1 point; hand-written: bench/compress.py's "combined: prune … + cluster 16 + int8".
2. MiniLM (seq 128, 300 real sentences, no labels), target mean cosine >= 0.995;
   hand-written: bench/compress.py's BEST_RECIPE (BERT fusions -> smoothing -> dynamic int8, two
   FFN MatMuls kept float in older versions; now without float nodes).
Host latency: medians over interleaved rounds (each model in turn) at 1 thread, as bench/compress.py.
Estimated device latency: the profile's roofline for the built graph (uncalibrated).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEVICE = "raspberry-pi-4"
HEADING = "## Recipe search (bench/optimize.py)"


@dataclass
class Row:
    name: str
    path: Optional[Path]
    quality: float = float("nan")
    download_bytes: int = 0
    host_ms: float = float("nan")
    host_speed: float = float("nan")  # × the first row, paired per round
    device_ms: float = float("nan")
    note: str = ""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _measure(evaluator: Any, row: Row, reference: Any) -> None:
    """Quality (accuracy with labels, else fidelity), download size and the device estimate of row.path."""
    from builder.compression.evaluate import evaluate_model
    from builder.search.device import estimate_on_profile
    from builder.search.evaluate import fidelity_value

    ev = evaluate_model(row.path, evaluator.data, evaluator.model.inputs, reference, evaluator.config)
    row.quality = ev.accuracy if ev.accuracy is not None else fidelity_value(ev.task, ev.fidelity.agreement,
                                                                             ev.fidelity.cosine_mean)
    row.download_bytes = ev.download_bytes
    row.device_ms = estimate_on_profile(row.path, evaluator.model.inputs, evaluator.profile).latency_ms


def _run_recipe(evaluator: Any, steps: list[dict[str, Any]], out: Path) -> Path:
    from builder.compression.engine import run_recipe
    from builder.search.space import recipe_from_steps

    result = run_recipe(evaluator.model, recipe_from_steps(steps), data=evaluator.data, train_data=evaluator.train_data,
                        out_dir=out, threads=1, eval_config=evaluator.config)
    return result.model_path


def run_part(label: str, setup_kw: dict[str, Any], targets: Any, handwritten: list[dict[str, Any]], budget_s: float,
             trials: Optional[int], jobs: int, work: Path, log: logging.Logger, space_note: str) -> str:
    from onnxruntime.quantization import quantize_dynamic

    from compress import interleaved_latency_ms
    from builder.errors import BuilderError
    from builder.search.evaluate import EngineEvaluator, EvaluationSetup
    from builder.search.optimize import SearchConfig, run_search
    from builder.search.pareto import explain_infeasible, front_of, recommend
    from builder.search.space import describe

    setup = EvaluationSetup(device=DEVICE, threads=1, latency_runs=20, workdir=str(work / "eval"), **setup_kw)
    config = SearchConfig(setup=setup, targets=targets, out_dir=str(work / "search"), cache_path=str(work / "cache.sqlite"),
                          trials=trials, time_budget_s=budget_s, jobs=jobs, population_size=8)
    started = time.perf_counter()
    outcome = run_search(config, on_progress=lambda p: log.info("%s: %d trials, %.0f s, best: %s", label, p.finished,
                                                                 p.elapsed_s, p.best))
    search_s = time.perf_counter() - started
    chosen = recommend(outcome.candidates, targets)
    log.info("%s: search %.0f s, %s, chosen: %s", label, search_s, outcome.trials_by_state,
             describe(chosen.steps) if chosen else None)

    evaluator = EngineEvaluator(setup)
    try:
        from builder.compression.evaluate import baseline_evaluation

        _, reference = baseline_evaluation(evaluator.model.onnx_path, evaluator.data, evaluator.model.inputs,
                                           evaluator.config)
        rows = [Row("fp32 (original)", Path(evaluator.model.onnx_path))]
        dyn = work / "quantize-dynamic.onnx"
        quantize_dynamic(str(evaluator.model.onnx_path), str(dyn))  # the plain baseline: all defaults
        rows.append(Row("plain quantize_dynamic", dyn))
        try:
            rows.append(Row("best hand-written (bench/compress.py)", _run_recipe(evaluator, handwritten, work / "hand")))
        except BuilderError as exc:
            rows.append(Row("best hand-written (bench/compress.py)", None, note=f"refused: {str(exc)[:120]}"))
        if chosen is not None:
            rows.append(Row("optimiser's choice", _run_recipe(evaluator, [dict(s) for s in chosen.steps], work / "chosen"),
                            note=describe(chosen.steps)))
        else:
            why = explain_infeasible(outcome.candidates, targets, outcome.baseline, outcome.calibration).summary
            rows.append(Row("optimiser's choice", None, note=why))
        for row in rows:
            if row.path is not None:
                _measure(evaluator, row, reference)
        timed = [r for r in rows if r.path is not None]
        feed = evaluator.data.sample(1)
        for row, ms, speed in zip(timed, *interleaved_latency_ms([r.path for r in timed], feed, threads=1, rounds=15,
                                                                min_round_s=0.1)):
            row.host_ms, row.host_speed = ms, speed
    finally:
        evaluator.close()

    base = rows[0]
    quality = "accuracy" if evaluator.use_accuracy else "fidelity (mean cosine)"
    headers = ["model", quality, "download MB", "download ÷", "host ms (1 thr)", "speed ×", f"est. {DEVICE} ms",
               "est. speed ×", "notes"]
    body = []
    for r in rows:
        if r.path is None:
            body.append([r.name] + ["—"] * 7 + [r.note])
            continue
        body.append([r.name, f"{r.quality:.4f}", f"{r.download_bytes / 1e6:.3f}", f"{base.download_bytes / r.download_bytes:.2f}",
                     f"{r.host_ms:.3f}", f"{r.host_speed:.2f}", f"{r.device_ms:.3f}",
                     f"{base.device_ms / r.device_ms:.2f}", r.note])
    lines = [f"### {label}", "", f"Target: {targets.describe()}. Search: {search_s:.0f} s wall "
             f"(budget {budget_s / 60:.0f} min, {jobs} worker process(es)), {outcome.trials_total} trials "
             f"{outcome.trials_by_state}, {len(front_of(outcome.candidates))} on the Pareto front; {space_note}", "",
             _table(headers, body), ""]
    by = {r.name: r for r in rows}
    hand, mine = by.get("best hand-written (bench/compress.py)"), by.get("optimiser's choice")
    if hand is not None and mine is not None and hand.path is not None and mine.path is not None:
        floor_ok = _meets(targets, mine, base)
        faster = mine.device_ms <= hand.device_ms * 1.02
        smaller = mine.download_bytes <= hand.download_bytes * 1.02
        hand_ok = _meets(targets, hand, base)
        # a win needs the optimiser's choice to hold the target AND be at least as fast or as small
        verdict = "MET" if floor_ok and (faster or smaller) else "MISSED"
        lines.append(f"- optimiser vs hand-written: {quality} {mine.quality:.4f} vs {hand.quality:.4f} "
                     f"(hand-written meets the target: {hand_ok}); est. device latency {mine.device_ms:.3f} vs "
                     f"{hand.device_ms:.3f} ms; download {mine.download_bytes / 1e6:.3f} vs {hand.download_bytes / 1e6:.3f} MB "
                     f"-> matches or beats: {verdict}")
    return "\n".join(lines)


def _meets(targets: Any, row: Row, base: Row) -> bool:
    if targets.max_accuracy_drop is not None:
        return base.quality - row.quality <= targets.max_accuracy_drop + 1e-9
    if targets.min_fidelity is not None:
        return row.quality >= targets.min_fidelity
    return True


def digits_part(work: Path, budget_s: float, trials: Optional[int], jobs: int, log: logging.Logger) -> str:
    from compress import DIGITS_RECIPES

    from builder.search.objectives import Targets
    from builder.zoo import digits_cnn

    split = digits_cnn.load_digits_split()
    test = digits_cnn.write_npz(work / "digits-test.npz", split, "test")
    train = digits_cnn.write_npz(work / "digits-train.npz", split, "train")
    # the combined prune + cluster + int8 recipe (its name carries the sparsity, which bench/compress.py tunes)
    name = next(k for k in DIGITS_RECIPES if k.startswith("combined: prune") and "cluster" in k)
    hand = [{"type": s, **p} for s, p in DIGITS_RECIPES[name]]
    return run_part("digits CNN", {"model": "builder.zoo.digits_cnn:trained", "input_shapes": "1x1x8x8",
                                   "data": str(test), "train_data": str(train)},
                    Targets(max_accuracy_drop=0.01), hand, budget_s, trials, jobs, work / "digits", log,
                    "space: PyTorch steps with fine-tuning (train data), fold, int8/fp16 quantization")


def minilm_part(work: Path, budget_s: float, trials: Optional[int], jobs: int, log: logging.Logger) -> str:
    import compress

    from builder.search.objectives import Targets
    from builder.zoo import minilm as zoo

    sentences = zoo.machine_sentences(300)
    feeds = zoo.tokenize(sentences)
    data = work / "minilm-sentences.npz"
    data.parent.mkdir(parents=True, exist_ok=True)
    np.savez(data, **feeds)
    if hasattr(compress, "BEST_RECIPE"):
        best = compress.BEST_RECIPE
    else:  # bench/compress.py now splits it: graph steps, then quantize without float nodes
        best = list(compress.GRAPH_STEPS) + [("quantize", dict(compress.QUANTIZE))]
    hand = [{"type": s, **p} for s, p in best]
    return run_part("MiniLM (all-MiniLM-L6-v2, seq 128)", {"model": "builder.zoo.minilm:minilm",
                                                            "input_shapes": zoo.INPUT_SPEC, "data": str(data)},
                    Targets(min_fidelity=0.995), hand, budget_s, trials, jobs, work / "minilm", log,
                    "space: PyTorch steps without fine-tuning (no train data), transformer fusions, smoothing, "
                    "int8/fp16 quantization with 0-8 sensitive nodes kept float")


def main(argv: Optional[list[str]] = None) -> int:
    from builder.search.objectives import parse_duration_s

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("digits", "minilm", "both"), default="both")
    parser.add_argument("--budget", default="30m", help="search time budget per part (e.g. 30m)")
    parser.add_argument("--trials", type=int, default=None, help="also stop after this many trials")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (2 cores: 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("builder.compression", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("bench.optimize")
    budget_s = parse_duration_s(args.budget)
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        work = Path(tmp)
        parts = [p for p in ("digits", "minilm") if args.part in (p, "both")]
        for part in parts:
            run = digits_part if part == "digits" else minilm_part
            sections.append(run(work, budget_s, args.trials, args.jobs, log))
            print(sections[-1] + "\n", flush=True)  # each part as soon as it is measured
    import platform

    text = "\n\n".join(sections)
    header = (f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
              f"(`bench/optimize.py --part {args.part} --budget {args.budget} --jobs {args.jobs}`); the machine was "
              "shared with other jobs, so absolute times are noisy — read the ratios.")
    print(header + "\n\n" + text)
    if not args.no_write:
        write_results(ROOT / "bench" / "RESULTS.md", header + "\n\n" + text)
    return 0


def write_results(path: Path, body: str) -> None:
    """Replace this benchmark's own section of RESULTS.md (or append it), leaving the others alone."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    section = f"{HEADING}\n\n{body}\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        new = old[:start] + section + (old[nxt + 1:] if nxt != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
