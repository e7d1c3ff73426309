"""Compression benchmark: every technique against baselines measured in the same run.

    .venv/bin/python bench/compress.py                # both parts, writes bench/RESULTS.md
    .venv/bin/python bench/compress.py --part digits  # or --part minilm; --no-write to only print

1. The digits CNN (builder.zoo.digits_cnn, real scikit-learn labels): fp32 vs each technique run
   through the engine (builder.compression.engine.run_recipe) and combined recipes.
   Distillation is compared on few labels (10 per class, 5 seeds, paired), where digits is not saturated.
2. all-MiniLM-L6-v2 (seq 128, batch 1) at 1 and 2 threads: fp32 ONNX, plain quantize_dynamic,
   and the best recipe (BERT fusions -> activation smoothing -> per-channel dynamic int8).
   Calibration uses 100 sentences that are NOT among the 300 the fidelity is measured on.

Latency: medians over interleaved rounds (baseline and candidates take turns), because the machine
is shared and noisy (+-30%). Ratios are what to read; absolute times move with the load.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1e6


# ---- timing ---------------------------------------------------------------------------------------
def interleaved_latency_ms(paths: list[Path], feed: dict[str, np.ndarray], threads: int, rounds: int,
                           min_round_s: float) -> tuple[list[float], list[float]]:
    """(median ms of each model, its speed-up over ``paths[0]``); every round runs each model in turn
    for ``min_round_s``. The speed-up is the median over rounds of each round's ratio, so a load burst
    that hits a few rounds (this VM is shared) moves it less than it moves the pooled medians."""
    from builder.execution.timing import interleaved_round_times, pooled_medians, round_paired_ratio

    times = interleaved_round_times(paths, feed, threads, rounds, min_round_s)
    return pooled_medians(times), [round_paired_ratio(times, 0, i) for i in range(len(times))]


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def check(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# ---- part 1: digits CNN ---------------------------------------------------------------------------
@dataclass
class DigitsRow:
    name: str
    path: Optional[Path]
    accuracy: float = float("nan")
    params: int = 0
    nonzero: int = 0
    macs: Optional[int] = None
    file_bytes: int = 0
    download_bytes: int = 0
    latency_ms: float = float("nan")
    speed: float = float("nan")  # × the fp32 baseline, paired per round
    note: str = ""
    flags: tuple[str, ...] = ()


DIGITS_RECIPES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "prune 80% unstructured (global, poly schedule)": [("prune", {"final_sparsity": 0.8, "scope": "global", "epochs": 4})],
    "prune channels 50% (Torch-Pruning)": [("prune_channels", {"ratio": 0.5, "epochs": 6})],
    "cluster k=16": [("cluster", {"clusters": 16, "epochs": 3})],
    "fold + int8 dynamic": [("fold", {}), ("quantize", {"mode": "dynamic"})],
    "fold + int8 static QDQ": [("fold", {}), ("quantize", {"mode": "static", "calibration": "minmax"})],
    "fp16": [("quantize", {"mode": "fp16"})],
    "combined: prune 80% + cluster 16 + int8": [
        ("prune", {"final_sparsity": 0.8, "scope": "global", "epochs": 6}),
        ("cluster", {"clusters": 16, "epochs": 4}),
        ("quantize", {"mode": "static", "calibration": "minmax"})],
    # int8 on the channel-pruned CNN (~30 µs): the step's latency guard decides whether QDQ overhead
    # outweighs the int8 arithmetic at this size; the fold-only row is the same model without int8.
    "combined: channels 50% + cluster 16 + fold": [
        ("prune_channels", {"ratio": 0.5, "epochs": 6}),
        ("cluster", {"clusters": 16, "epochs": 3}),
        ("fold", {})],
    "combined: channels 50% + cluster 16 + int8": [
        ("prune_channels", {"ratio": 0.5, "epochs": 6}),
        ("cluster", {"clusters": 16, "epochs": 3}),
        ("quantize", {"mode": "static", "calibration": "minmax"})],
}


# Distillation on full-data digits says nothing (a 5x smaller model trained on all 1,347 labelled images
# reaches the teacher's ~99% with or without it), so it is measured where a teacher is known to help:
# the teacher is the fp32 model above (all 1,347 training images), each student sees only
# DISTILL_PER_CLASS labelled images per class (drawn per seed). Both students of a pair share the
# architecture, the seeded initialisation, the inputs, their order, epochs and optimiser; only alpha
# differs (1.0 = labels only, the teacher ignored; 0.5 = Hinton's mix at the step's default T = 4).
DISTILL_PER_CLASS = 10
DISTILL_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class DistillSetting:
    student: str  # what the table calls it
    student_params: dict[str, Any]  # the distill step's student choice
    copies: int  # shifted noisy copies per labelled image (0 = the labelled images only)
    epochs: int

    @property
    def label(self) -> str:
        extra = f" + {self.copies} shifted noisy copies" if self.copies else ""
        return f"{self.student}, {DISTILL_PER_CLASS} labels/class{extra}"


# The first is the target's setting (its seed-0 pair also appears in the technique table). Random-init
# students get ~300-350 optimiser steps (batch 64; the copies setting sees 4x the inputs per epoch):
# fewer leave them under-trained. The last row is the honest caveat: a student cut from the teacher
# (its weights) already carries the teacher's knowledge: there the soft targets add no accuracy.
RANDOM_STUDENT = {"student": "builder.zoo.digits_cnn:student"}  # width 14: 13,114 parameters (5.0x fewer)
DISTILL_SETTINGS = (
    DistillSetting("random-init width 14", RANDOM_STUDENT, copies=0, epochs=150),
    DistillSetting("random-init width 14", RANDOM_STUDENT, copies=3, epochs=50),
    DistillSetting("width 0.45 cut from the teacher", {"width": 0.45}, copies=0, epochs=60),
)


@dataclass
class DistillRun:
    evaluation: Any  # builder.compression.evaluate.Evaluation of the student on the test images
    kl: float
    path: Path

    @property
    def accuracy(self) -> float:
        return self.evaluation.accuracy if self.evaluation.accuracy is not None else float("nan")

    @property
    def agreement(self) -> float:
        return self.evaluation.fidelity.agreement


def kl_to_teacher(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(teacher || student) of the softmax outputs (T = 1), in nats."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    t, s = log_softmax(teacher_logits.astype(np.float64)), log_softmax(student_logits.astype(np.float64))
    return float((np.exp(t) * (t - s)).sum(axis=1).mean())


def run_distillation(loaded: Any, split: Any, test: Any, work: Path,
                     log: logging.Logger) -> list[tuple[DistillSetting, list[tuple[DistillRun, DistillRun]]]]:
    """Per setting, per seed: (student without the teacher, distilled student)."""
    from builder.compression.data import DataSource
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig
    from builder.execution.sessions import run_onnx
    from builder.compression.recipe import Recipe, StepSpec
    from builder.zoo import digits_cnn

    config = EvalConfig(threads=1, warmup_runs=2, timed_runs=5)  # latency comes from the interleaved rounds
    teacher_logits = run_onnx(loaded.onnx_path, test.batches(64))
    results = []
    for index, setting in enumerate(DISTILL_SETTINGS):
        pairs = []
        for seed in DISTILL_SEEDS:
            x, y = digits_cnn.few_labels(split.x_train, split.y_train, DISTILL_PER_CLASS, seed)
            x, y = digits_cnn.shifted_copies(x, y, setting.copies, seed)
            train = DataSource.from_arrays({"input": x}, y, loaded.inputs, f"digits {setting.label}, seed {seed}")
            pair = []
            for alpha in (1.0, 0.5):
                params = {**setting.student_params, "epochs": setting.epochs, "alpha": alpha, "temperature": 4.0}
                recipe = Recipe((StepSpec("distill", params),), name=f"distill {setting.label}, alpha {alpha}")
                result = run_recipe(loaded, recipe, data=test, train_data=train, seed=seed, threads=1,
                                    out_dir=work / f"distill-{index}-{seed}-{alpha}", eval_config=config)
                kl = kl_to_teacher(teacher_logits, run_onnx(result.model_path, test.batches(64)))
                pair.append(DistillRun(result.final, kl, result.model_path))
            log.info("digits distill %s, seed %d: %.4f without the teacher, %.4f distilled", setting.label, seed,
                     pair[0].accuracy, pair[1].accuracy)
            pairs.append((pair[0], pair[1]))
        results.append((setting, pairs))
    return results


def distillation_summary(results: list[tuple[DistillSetting, list[tuple[DistillRun, DistillRun]]]],
                         base_params: int, teacher_images: int, test_images: int) -> tuple[str, str]:
    """The per-setting table (mean ± std over seeds, paired differences) and the target line."""
    def pm(values: np.ndarray, scale: float = 100.0, digits: int = 2) -> str:
        return f"{values.mean() * scale:.{digits}f} ± {values.std(ddof=1) * scale:.{digits}f}"

    headers = ["student, training data", "params", "no teacher", "distilled", "paired Δ points", "distilled higher",
               "KL to teacher: no teacher → distilled", "agreement with teacher"]
    body, target = [], ""
    for index, (setting, pairs) in enumerate(results):
        plain = np.array([p.accuracy for p, _ in pairs])
        kd = np.array([d.accuracy for _, d in pairs])
        diff = kd - plain
        wins = int((diff > 0).sum())
        kl = (np.array([p.kl for p, _ in pairs]), np.array([d.kl for _, d in pairs]))
        agree = (np.array([p.agreement for p, _ in pairs]), np.array([d.agreement for _, d in pairs]))
        params = pairs[0][1].evaluation.params
        body.append([setting.label, f"{params:,}", f"{pm(plain)}%", f"{pm(kd)}%",
                     f"{diff.mean() * 100:+.2f} ± {diff.std(ddof=1) * 100:.2f}", f"{wins}/{len(pairs)} seeds",
                     f"{pm(kl[0], 1, 3)} → {pm(kl[1], 1, 3)}",
                     f"{agree[0].mean() * 100:.1f}% → {agree[1].mean() * 100:.1f}%"])
        if index == 0:
            shrink = base_params / params
            target = (f"- distillation ({setting.label}, {len(pairs)} seeds): student {shrink:.1f}× fewer parameters "
                      f"(target ≥ 4×), accuracy {pm(kd)}% distilled vs {pm(plain)}% without the teacher, paired Δ "
                      f"{diff.mean() * 100:+.2f} points, higher on {wins}/{len(pairs)} seeds: "
                      f"{check(shrink >= 4 and kd.mean() > plain.mean() and wins * 2 > len(pairs))}")
    epochs = ", ".join(f"{s.epochs} (row {i + 1})" for i, s in enumerate(DISTILL_SETTINGS))
    note = (f"Distillation: teacher = the fp32 model (trained on all {teacher_images:,} training images); each "
            f"student trained on {DISTILL_PER_CLASS} labelled images per class drawn per seed (shifted noisy copies: "
            "±1 pixel, zero-filled, Gaussian noise σ 0.1, made once per seed and seen by both students); random-init "
            "students are `builder.zoo.digits_cnn:student` built under the run's seed. Adam lr 3e-3, batch 64, epochs "
            f"{epochs}; 'no teacher' = alpha 1.0 (labels only), 'distilled' = alpha 0.5, T = 4. Paired by seed "
            f"(same subset, init and batch order); accuracy, KL(teacher ‖ student) and top-1 agreement on the "
            f"{test_images} test images; mean ± std over seeds {', '.join(map(str, DISTILL_SEEDS))}. The two student "
            "rows in the technique table are seed 0 of the first row. The last row has no teacher-free baseline: a "
            "student cut from the teacher starts from its weights and reaches about the teacher's accuracy on labels "
            "alone; the soft targets bring it closer to the teacher (KL), not above it.")
    return "\n".join([table(headers, body), "", note]), target


def run_digits(work: Path, log: logging.Logger) -> str:
    import torch

    from builder.compression._export import export_module
    from builder.compression.data import DataSource
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig, baseline_evaluation
    from builder.compression.recipe import Recipe, StepSpec
    from builder.errors import BuilderError
    from builder.loading.types import InputSpec, LoadedModel
    from builder.zoo import digits_cnn

    torch.set_num_threads(1)
    inputs = (InputSpec("input", (1, 1, 8, 8)),)
    split = digits_cnn.load_digits_split()
    test = DataSource.from_arrays({"input": split.x_test}, split.y_test, inputs, "digits-test")
    train = DataSource.from_arrays({"input": split.x_train}, split.y_train, inputs, "digits-train")
    started = time.perf_counter()
    module = digits_cnn.trained()
    fp32_path = work / "digits-fp32.onnx"
    names = export_module(module, inputs, fp32_path)
    loaded = LoadedModel("digits", "builder.zoo.digits_cnn:trained", "factory", fp32_path, inputs, names,
                         torch_module=module)
    config = EvalConfig(threads=1, timed_runs=30)
    base_eval, _ = baseline_evaluation(fp32_path, test, inputs, config)
    rows = [DigitsRow("fp32 (baseline)", fp32_path, base_eval.accuracy or float("nan"), base_eval.params,
                      base_eval.nonzero_params, base_eval.macs, base_eval.file_bytes, base_eval.download_bytes)]
    log.info("digits fp32: accuracy %.4f (trained in %.0f s)", base_eval.accuracy, time.perf_counter() - started)
    for name, steps in DIGITS_RECIPES.items():
        recipe = Recipe(tuple(StepSpec(step, params) for step, params in steps), name=name)
        t0 = time.perf_counter()
        try:
            result = run_recipe(loaded, recipe, data=test, train_data=train, out_dir=work / f"r{len(rows)}",
                                threads=1, eval_config=config)
        except BuilderError as exc:
            rows.append(DigitsRow(name, None, note=f"refused: {str(exc)[:150]}"))
            log.info("digits %s: refused (%s)", name, exc)
            continue
        final = result.final
        kept = [s.record.facts.get("kept_float") for s in result.steps if s.record.facts.get("kept_float")]
        rows.append(DigitsRow(name, result.model_path, final.accuracy or float("nan"), final.params,
                              final.nonzero_params, final.macs, final.file_bytes, final.download_bytes,
                              flags=tuple(final.flags), note=f"kept float: {kept}" if kept else ""))
        log.info("digits %s: accuracy %.4f, %.0f s", name, final.accuracy or float("nan"), time.perf_counter() - t0)

    t0 = time.perf_counter()
    distilled = run_distillation(loaded, split, test, work, log)
    first_setting, first_pairs = distilled[0]
    for alpha_index, suffix in ((0, "no teacher"), (1, "distilled")):
        run = first_pairs[0][alpha_index]
        e = run.evaluation
        rows.append(DigitsRow(f"student {first_setting.label}, {suffix}", run.path, run.accuracy, e.params,
                              e.nonzero_params, e.macs, e.file_bytes, e.download_bytes,
                              note=f"seed {DISTILL_SEEDS[0]}; over seeds: below"))
    log.info("digits distillation: %.0f s", time.perf_counter() - t0)

    timed = [r for r in rows if r.path is not None]
    feed = {"input": split.x_test[:1]}
    # Many short rounds: the digits models run for tens of microseconds, so 0.05 s is ~1,000 runs.
    for row, ms, speed in zip(timed, *interleaved_latency_ms([r.path for r in timed], feed, threads=1, rounds=36,
                                                            min_round_s=0.05)):
        row.latency_ms, row.speed = ms, speed

    base = rows[0]
    headers = ["technique", "accuracy", "Δ points", "params", "non-zero", "MACs", "MACs ÷", "file KB",
               "download KB", "download ÷", "latency µs", "speed ×", "notes"]
    body = []
    for r in rows:
        if r.path is None:
            body.append([r.name] + ["—"] * 11 + [r.note])
            continue
        body.append([
            r.name, f"{r.accuracy * 100:.2f}%", f"{(r.accuracy - base.accuracy) * 100:+.2f}", f"{r.params:,}",
            f"{r.nonzero:,}", f"{r.macs:,}" if r.macs else "?",
            f"{base.macs / r.macs:.2f}" if r.macs and base.macs else "?",
            f"{r.file_bytes / 1e3:.1f}", f"{r.download_bytes / 1e3:.1f}", f"{base.download_bytes / r.download_bytes:.1f}",
            f"{r.latency_ms * 1e3:.0f}", f"{r.speed:.2f}",
            "; ".join(x for x in (r.note, ",".join(r.flags)) if x)])
    out = [table(headers, body), ""]
    by_name = {r.name: r for r in rows}

    def drop(row: DigitsRow) -> float:
        return (base.accuracy - row.accuracy) * 100

    combined = by_name["combined: prune 80% + cluster 16 + int8"]
    if combined.path is not None:
        ratio = base.download_bytes / combined.download_bytes
        out.append(f"- combined prune + cluster + int8: download {ratio:.1f}× smaller (target ≥ 8×), accuracy drop "
                   f"{drop(combined):.2f} points (target ≤ 1): {check(ratio >= 8 and drop(combined) <= 1)}")
    channels = by_name["prune channels 50% (Torch-Pruning)"]
    if channels.path is not None and channels.macs and base.macs:
        mac_ratio, speed = base.macs / channels.macs, channels.speed
        out.append(f"- structured pruning: {mac_ratio:.2f}× fewer MACs (target ≥ 2×), {speed:.2f}× speed "
                   f"(target > 1), drop {drop(channels):.2f} points (target ≤ 1): "
                   f"{check(mac_ratio >= 2 and speed > 1.0 and drop(channels) <= 1)}")
    distill_table, distill_target = distillation_summary(distilled, base.params, len(split.x_train), len(split.x_test))
    out.append(distill_target)
    out += ["", distill_table]
    out.append(f"\nDigits part: {time.perf_counter() - started:.0f} s.")
    return "\n".join(out)


# ---- part 2: MiniLM -----------------------------------------------------------------------------
# The graph half runs through the engine; the quantize step then runs on its output as the best
# recipe (builder/recipes/minilm-int8.toml: no float nodes — the only way under 23 MB, the word
# embeddings alone take 11.7 MB in int8 — uint8 weights, GPTQ rounding) and as two ablations that
# show what each of the last two choices brings.
GRAPH_STEPS: list[tuple[str, dict[str, Any]]] = [
    ("optimize_graph", {"level": "basic", "bert_fusions": True, "num_heads": 12, "hidden_size": 384}),
    ("smooth", {"alpha": 0.85}),
]
QUANTIZE = {"mode": "dynamic", "per_channel": True, "weight_type": "uint8", "weight_rounding": "gptq",
            "eval_samples": 100, "calibration_samples": 100}
# uint8 weights only for the fused attention; the other MatMuls keep int8 weights and with them ORT's
# U8S8 kernels, 17% faster than U8U8 on AVX2 without VNNI.
FASTER = ("faster: same, uint8 weights only for the fused attention, int8 for the other MatMuls, GPTQ",
          {"weight_type": "int8", "weight_types": {"Attention": "uint8"}})
ABLATIONS = (("ablation: same, round-to-nearest", {"weight_rounding": "nearest"}),
             ("ablation: same, int8 weights, round-to-nearest (last run's best)",
              {"weight_type": "int8", "weight_rounding": "nearest"}))


def embed_all(path: Path, feeds: dict[str, np.ndarray], threads: int = 2, batch: int = 25) -> np.ndarray:
    from builder.execution.sessions import make_session

    session = make_session(path, threads)
    names = {i.name for i in session.get_inputs()}
    count = len(next(iter(feeds.values())))
    return np.concatenate([session.run(None, {k: v[s:s + batch] for k, v in feeds.items() if k in names})[0]
                           for s in range(0, count, batch)])


def run_minilm(work: Path, log: logging.Logger) -> str:
    import onnx
    import torch
    from onnxruntime.quantization import quantize_dynamic

    from builder.compression._export import export_module
    from builder.compression.data import DataSource
    from builder.compression.base import StepContext
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig, output_fidelity
    from builder.compression.quantization import QuantizeStep
    from builder.artifacts.download import download_size
    from builder.compression.recipe import Recipe, StepSpec
    from builder.errors import BuilderError
    from builder.loading.types import InputSpec, LoadedModel
    from builder.zoo import minilm as zoo

    torch.set_num_threads(2)
    started = time.perf_counter()
    sentences = zoo.machine_sentences(400)
    eval_feeds = zoo.tokenize(sentences[:300])
    calib_feeds = zoo.tokenize(sentences[300:])
    inputs = (InputSpec("input_ids", (1, zoo.SEQ_LEN), "int64"), InputSpec("attention_mask", (1, zoo.SEQ_LEN), "int64"))
    fp32 = work / "minilm-fp32.onnx"
    names = export_module(zoo.minilm(), inputs, fp32, ("embedding",))
    log.info("MiniLM exported in %.0f s", time.perf_counter() - started)

    dyn = work / "minilm-dynamic.onnx"
    quantize_dynamic(str(fp32), str(dyn))  # the plain baseline: all defaults
    dyn_pc = work / "minilm-dynamic-per-channel.onnx"
    quantize_dynamic(str(fp32), str(dyn_pc), per_channel=True)

    loaded = LoadedModel("minilm", "builder.zoo.minilm:minilm", "factory", fp32, inputs, names)
    calib = DataSource.from_arrays(calib_feeds, None, inputs, "minilm-calibration")
    recipe = Recipe(tuple(StepSpec(s, p) for s, p in GRAPH_STEPS), name="minilm-fuse-smooth")
    models = [("fp32 ONNX (baseline)", fp32), ("plain quantize_dynamic", dyn),
              ("quantize_dynamic, per_channel=True", dyn_pc)]
    first_recipe = len(models)
    notes = []
    t0 = time.perf_counter()
    try:
        result = run_recipe(loaded, recipe, data=calib, train_data=None, out_dir=work / "minilm-smoothed", threads=1,
                            eval_config=EvalConfig(threads=1, timed_runs=10, warmup_runs=3, task="embed"))
        notes.append(f"fusions: {result.steps[0].record.facts.get('fused_ops')}; smoothed tensors: "
                     f"{result.steps[1].record.facts.get('smoothed_tensors')}")
        batches = list(calib.batches(25))
        variants = (("most faithful: BERT fusions + smooth 0.85 + per-channel dynamic int8, uint8 weights, GPTQ", {}),
                    FASTER, *ABLATIONS)
        for index, (label, extra) in enumerate(variants):
            folder = work / f"minilm-q{index}"
            folder.mkdir()
            ctx = StepContext(workdir=folder, calibration_batches=lambda: iter(batches), task="embed")
            state, record = QuantizeStep(**{**QUANTIZE, **extra}).apply(result.final_state, ctx)
            models.append((label, state.onnx_path))
            gptq = (f"; GPTQ re-rounded {record.facts['gptq_changed_fraction'] * 100:.0f}% of the weights of "
                    f"{record.facts['gptq_rounded']} layers, layer output error x{record.facts['gptq_layer_error_ratio']}"
                    if "gptq_rounded" in record.facts else "")
            notes.append(f"{label}: step measured on the calibration set {record.facts.get('cosine_mean')} cosine, "
                         f"{record.facts.get('latency_ratio')} latency ratio; kept {record.facts.get('kept_float')}{gptq}")
    except BuilderError as exc:
        notes.append(f"recipe refused: {exc}")
    recipe_note = "\n".join(f"- {n}" for n in notes)
    log.info("MiniLM recipes: %.0f s", time.perf_counter() - t0)
    reference = embed_all(fp32, eval_feeds)
    fid = {name: output_fidelity(reference, embed_all(path, eval_feeds), "embed") for name, path in models}
    feed = {k: v[:1] for k, v in eval_feeds.items()}
    timings = {threads: interleaved_latency_ms([p for _, p in models], feed, threads, rounds=7, min_round_s=0.6)
               for threads in (1, 2)}
    lat = {threads: ms for threads, (ms, _) in timings.items()}
    fast = {threads: speed for threads, (_, speed) in timings.items()}  # × fp32, paired per round

    headers = ["model", "file MB", "download MB", "cosine mean", "cosine min", "NN agreement",
               "1 thread ms", "× fp32", "2 threads ms", "× fp32"]
    body = []
    for i, (name, path) in enumerate(models):
        f = fid[name]
        body.append([name, f"{path.stat().st_size / MB:.2f}", f"{download_size(path) / MB:.2f}",
                     f"{f.cosine_mean:.4f}", f"{f.cosine_min:.4f}", f"{f.agreement * 100:.1f}%",
                     f"{lat[1][i]:.1f}", f"{fast[1][i]:.2f}", f"{lat[2][i]:.1f}", f"{fast[2][i]:.2f}"])
    out = [table(headers, body), "", recipe_note]
    recipes = range(first_recipe, first_recipe + 2)  # the best and the faster recipe; ablations after
    meets = [i for i in recipes if i < len(models) and models[i][1].stat().st_size / MB <= 23
             and fid[models[i][0]].cosine_mean >= 0.995 and fid[models[i][0]].agreement >= 0.95]
    if len(models) > first_recipe:
        # The recipe judged: the fastest of the two that meets the size and fidelity targets.
        chosen = max(meets, key=lambda i: fast[1][i]) if meets else first_recipe
        name, best = models[chosen]
        f, size = fid[name], best.stat().st_size / MB
        speed, plain_speed = fast[1][chosen], fast[1][1]
        domains = sorted({n.domain or "ai.onnx" for n in onnx.load(str(best), load_external_data=False).graph.node})
        out += ["", f"Targets, judged on the fastest recipe that meets the fidelity targets ({name}; 1 thread):",
                f"- speed {speed:.2f}× fp32 (target ≥ 2.2×): {check(speed >= 2.2)}; in the same rounds plain "
                f"quantize_dynamic, whose default int8 kernels are the ceiling for dynamic int8 here, reached "
                f"{plain_speed:.2f}× (this recipe = {speed / plain_speed:.2f}× its speed). "
                f"CPU int8 dot-product support: {int8_dot_product_support()}",
                f"- size {size:.2f} MB (target ≤ 23 MB): {check(size <= 23)}",
                f"- mean cosine {f.cosine_mean:.4f} (target ≥ 0.995): {check(f.cosine_mean >= 0.995)}",
                f"- nearest-neighbour agreement {f.agreement * 100:.1f}% (target ≥ 95%): {check(f.agreement >= 0.95)}",
                f"- op domains in the shipped graph: {domains} (com.microsoft contrib ops ship in every ORT CPU "
                "build; no NCHWc)"]
    out.append(f"\nMiniLM part: {time.perf_counter() - started:.0f} s.")
    return "\n".join(out)


def int8_dot_product_support() -> str:
    """Which int8 dot-product instructions the CPU has: ORT's int8 GEMMs are 2-4x faster with VNNI/AMX
    than with AVX2 alone, which decides how much int8 can gain over fp32 on this machine."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512f", "avx2") if f in flags]
    return ", ".join(found) if found else "none of avx2/avx512/vnni/amx"


def machine_line() -> str:
    import onnxruntime

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()} · {cpu} · "
            f"{os.cpu_count()} cores · load avg {load:.1f} at the start · onnxruntime {onnxruntime.__version__} · "
            f"Python {platform.python_version()}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "digits", "minilm"], default="all")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("root", "onnxruntime", "builder.compression.quantization"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # ORT's "consider pre-processing" chatter
    logging.getLogger("bench").setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    log = logging.getLogger("bench")
    header = machine_line()
    print(header, flush=True)
    sections = [f"Machine: {header}"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "digits"):
            text = run_digits(work, log)
            print("\n## Digits CNN\n\n" + text, flush=True)
            sections.append("### Digits CNN (scikit-learn digits, 450 test images, batch 1, 1 thread)\n\n" + text)
        if args.part in ("all", "minilm"):
            text = run_minilm(work, log)
            print("\n## MiniLM\n\n" + text, flush=True)
            sections.append("### all-MiniLM-L6-v2 (seq 128, batch 1, 300 sentences)\n\n" + text)
    total = f"Total run time: {time.perf_counter() - started:.0f} s."
    print(total)
    if not args.no_write and args.part == "all":  # a partial run must not replace the full table
        write_results(args.results, "\n\n".join(sections + [total]))
    return 0


RESULTS_HEADING = "## Compression (bench/compress.py)"
START, END = "<!-- compress:start -->", "<!-- compress:end -->"


def write_results(path: Path, measured: str, heading: str = RESULTS_HEADING, start: str = START,
                  end: str = END) -> None:
    """Replace a benchmark's measured block (between ``start`` and ``end``) in RESULTS.md (other
    benchmarks' sections and the hand-written notes after the block stay); the first run appends
    the section at the end. bench/zoo.py passes its own heading and markers."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{head}{start}\n{measured}\n{end}{tail}")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
