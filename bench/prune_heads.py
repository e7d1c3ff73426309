"""MiniLM with attention heads and FFN units removed (prune_channels + head_ratio), distilled back to
the original, with and without dynamic int8 after it: the table in bench/RESULTS.md.

    .venv/bin/python bench/prune_heads.py --levels 0.25,0.5 --epochs 3 --work /tmp/prune-heads
    # --reuse: keep the reports of an earlier run in --work, time the models again (~3 min)

Training data: the first 1,200 ``machine_sentences``; evaluation: the last 300, never trained on.
Each run is a real ``builder compress`` (a subprocess, as a user runs it) of the recipe
``prune_channels(ratio=r, head_ratio=r, epochs=E) -> optimize_graph(bert_fusions) ->
quantize(dynamic, per_channel)``; the engine evaluates after every step (ONNX Runtime, 1 thread,
seq 128, latency interleaved with the fp32 reference in the same run, so the ratios hold on a loaded
machine). The fusion step is given MiniLM's unpruned num_heads = 12 / hidden_size = 384 on purpose
(as builder/recipes/minilm-int8.toml does): it must notice the pruned head count. A run without the
pruning step gives the unpruned rows. Fidelity, parameters and MACs come from the runs' reports; the
latency column from one interleaved timing loop over all variants afterwards (``latency_ms``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SENTENCES = 1200
EVAL_SENTENCES = 300
INPUT_SHAPE = "input_ids=1x128:int64,attention_mask=1x128:int64"


def write_data(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from builder.zoo.minilm import machine_sentences, tokenize

    sentences = machine_sentences(limit=100_000)
    if len(sentences) < TRAIN_SENTENCES + EVAL_SENTENCES:
        raise SystemExit(f"only {len(sentences)} sentences on this machine; need {TRAIN_SENTENCES + EVAL_SENTENCES}")
    train, evaluation = work / "train.npz", work / "eval.npz"
    np.savez(train, **tokenize(sentences[:TRAIN_SENTENCES]))
    np.savez(evaluation, **tokenize(sentences[-EVAL_SENTENCES:]))
    return train, evaluation


def recipe_text(level: float | None, epochs: int) -> str:
    steps = []
    if level is not None:
        steps.append(f'[[step]]\ntype = "prune_channels"\nratio = {level}\nhead_ratio = {level}\nepochs = {epochs}\n')
    steps.append('[[step]]\ntype = "optimize_graph"\nlevel = "basic"\nbert_fusions = true\n'
                 'num_heads = 12\nhidden_size = 384\n')
    steps.append('[[step]]\ntype = "quantize"\nmode = "dynamic"\nper_channel = true\n')
    return "\n".join(steps)


def compress(work: Path, name: str, recipe: str, data: Path, train: Path) -> dict:
    recipe_path = work / f"{name}.toml"
    recipe_path.write_text(recipe)
    out = work / name
    command = [str(ROOT / ".venv/bin/builder"), "compress", "builder.zoo.minilm:minilm", "--input-shape", INPUT_SHAPE,
               "--recipe", str(recipe_path), "--data", str(data), "--train-data", str(train), "--out", str(out),
               "--threads", "1"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads((out / "report.json").read_text())


def latency_ms(work: Path, levels: list[float], finals: dict[str, Path], data: Path) -> dict[str, float]:
    """Median ms (1 ORT thread, seq 128) of every variant, all timed interleaved in one loop so they
    share the machine's load. Latency does not depend on weight values, so the fp32 and fused rows of a
    pruned model are timed on an untrained copy with the same heads and FFN units (the runs keep only
    their final int8 model); the int8 rows are the runs' own final models."""
    sys.path.insert(0, str(ROOT))
    import torch

    from builder.compression._export import export_module
    from builder.compression.base import ModelState, StepContext
    from builder.compression.channel_pruning import ChannelPruneStep
    from builder.execution.timing import interleaved_median_ms
    from builder.compression.fusion import OptimizeGraphStep
    from builder.loading.types import InputSpec
    from builder.zoo.minilm import minilm

    torch.set_num_threads(1)
    inputs = (InputSpec("input_ids", (1, 128), "int64"), InputSpec("attention_mask", (1, 128), "int64"))
    folder = work / "latency"
    folder.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    for level in [0.0, *levels]:
        model = minilm()
        if level:
            state = ModelState(inputs, ("embedding",), torch_module=model)
            ChannelPruneStep(ratio=level, head_ratio=level, epochs=0).apply(state, StepContext(workdir=folder))
        key = f"{int(level * 100)}"
        paths[f"{key}/fp32"] = folder / f"{key}-fp32.onnx"
        export_module(model, inputs, paths[f"{key}/fp32"], ("embedding",))
        step_dir = folder / f"{key}-fuse"
        step_dir.mkdir(exist_ok=True)
        fused, _ = OptimizeGraphStep(level="basic", bert_fusions=True).apply(
            ModelState(inputs, ("embedding",), onnx_path=paths[f"{key}/fp32"]), StepContext(workdir=step_dir))
        paths[f"{key}/fused"] = fused.onnx_path
        paths[f"{key}/int8"] = finals[key]
    feed = {name: array[:1] for name, array in np.load(data).items()}
    medians = interleaved_median_ms(list(paths.values()), feed, threads=1, rounds=7, min_round_s=2.0)
    return dict(zip(paths, medians))


def row(label: str, step: dict, heads: str, ms: float, fp32_ms: float) -> str:
    e = step["evaluation"]
    fidelity = e["fidelity"]
    return (f"| {label} | {heads} | {e['params'] / 1e6:.2f} | {e['macs'] / 1e9:.3f} | {ms:.1f} | "
            f"{fp32_ms / ms:.2f} | {fidelity['cosine_mean']:.4f} | {fidelity['cosine_min']:.4f} | "
            f"{fidelity['agreement']:.3f} | {e['download_bytes'] / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0.25,0.5", help="head and FFN fractions removed, comma-separated")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (0 = no fine-tuning)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-heads"))
    parser.add_argument("--reuse", action="store_true", help="reuse the reports of an earlier run in --work")
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    train, data = write_data(args.work)
    reports: dict[str, dict] = {}
    for level in [0.0, *levels]:
        name = f"prune{int(level * 100)}-e{args.epochs}" if level else "unpruned"
        report_path = args.work / name / "report.json"
        if args.reuse and report_path.is_file():
            reports[f"{int(level * 100)}"] = json.loads(report_path.read_text())
        else:
            reports[f"{int(level * 100)}"] = compress(args.work, name, recipe_text(level or None, args.epochs),
                                                      data, train)
    finals = {key: args.work / (f"prune{key}-e{args.epochs}" if key != "0" else "unpruned") / "model.onnx"
              for key in reports}
    ms = latency_ms(args.work, levels, finals, data)
    fp32_ms = ms["0/fp32"]
    lines = ["| model | heads | params M | MACs G | ms (1 thr) | speed × | cos mean | cos min | NN top-1 | download MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, report in reports.items():
        pruned_step = report["steps"][0] if key != "0" else report["baseline"]
        fused, quantized = report["steps"][-2:]
        heads = str(pruned_step["facts"]["attention_heads"]["total"][1]) if key != "0" else "72"
        label = f"heads+FFN −{key}%, {args.epochs} epochs distilled" if key != "0" else "original"
        lines.append(row(f"{label}, fp32", pruned_step, heads, ms[f"{key}/fp32"], fp32_ms))
        attention = fused["facts"]["fused_ops"].get("Attention", 0)
        lines.append(row(f"{label}, fused ({attention} Attention)", fused, heads, ms[f"{key}/fused"], fp32_ms))
        lines.append(row(f"{label}, fused + int8", quantized, heads, ms[f"{key}/int8"], fp32_ms))
    (args.work / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
