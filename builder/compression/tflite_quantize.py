"""``builder compress MODEL.tflite --quantize int8|fp16``: quantize a ``.tflite`` a user brings.

A ``.tflite`` has no ONNX or PyTorch form here to run the engine's steps on, and converting it back
(tflite2onnx-style) loses what its exporter chose. So it is quantized where it lives, by the tool
of its own runtime: ``ai-edge-quantizer`` (the library ``builder build`` already uses for Android),
``dynamic_wi8_afp32`` for int8 (int8 weights, activations quantized at run time, float inputs and
outputs: no calibration to get wrong) and float casting for fp16. Then the result is judged like
any other build: its outputs against the input model's on the user's data with the task's metric,
and its 1-thread LiteRT latency against the input's. Under the fidelity floor it is still written
(flagged, with the gap), as ``--quantize int8`` does for ONNX; it is never silently slower.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from builder.errors import UsageError

TFLITE_PRECISIONS = {"int8": "int8", "int8-dynamic": "int8", "fp16": "fp16"}
EVAL_SAMPLES = 64


@dataclass
class TfliteResult:
    """What one ``.tflite`` quantization produced and measured (report.json of the output folder)."""

    source: str
    model_path: str
    precision: str
    recipe: str
    task: str
    judged_output: str
    samples: int
    size_bytes: int
    source_size_bytes: int
    agreement: float
    cosine_mean: float
    cosine_min: float
    latency_ms: float
    source_latency_ms: float
    flags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms / self.source_latency_ms if self.source_latency_ms else 1.0


def is_tflite(model: str) -> bool:
    return model.lower().endswith(".tflite")


def tflite_precision(quantize: Optional[str], other_flags: Sequence[str]) -> str:
    """The precision ``--quantize`` asks of a ``.tflite``, or a one-line refusal saying what works."""
    if other_flags:
        raise UsageError(f"a .tflite file takes --quantize int8 or fp16 only ({', '.join(other_flags)} need the ONNX "
                         "or PyTorch model the .tflite was made from)")
    if quantize not in TFLITE_PRECISIONS:
        raise UsageError(f"a .tflite file takes --quantize int8 or --quantize fp16 (ai-edge-quantizer), not "
                         f"{quantize or 'no --quantize'}; int8-static needs the ONNX or PyTorch model")
    return TFLITE_PRECISIONS[quantize]


def _samples(data: Any, count: int) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    for batch in data.batches(1):
        out.append(batch)
        if len(out) >= count:
            break
    return out


class _Runner:
    """One LiteRT interpreter fed by tensor index: many ``.tflite`` files in the wild (mediapipe's)
    carry no signature, so the signature runner cannot be used."""

    def __init__(self, path: Path) -> None:
        from builder.targets.litert_target import interpreter

        self.interpreter = interpreter(path, threads=1)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    def specs(self) -> list[Any]:
        from builder.loading.types import InputSpec

        return [InputSpec(str(d["name"]), tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]).name)
                for d in self.inputs]

    def run(self, sample: dict[str, np.ndarray]) -> np.ndarray:
        from builder.errors import TargetError

        for d in self.inputs:
            self.interpreter.set_tensor(d["index"], np.asarray(sample[str(d["name"])]).astype(d["dtype"]))
        try:
            self.interpreter.invoke()
        except Exception as exc:  # LiteRT raises RuntimeError for a bad model or input
            raise TargetError(f"LiteRT failed to run the model: {str(exc).splitlines()[0]}") from exc
        return np.asarray(self.interpreter.get_tensor(self.outputs[0]["index"])).copy()

    def outputs_of(self, samples: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
        return np.concatenate([self.run(s) for s in samples])

    def latency_ms(self, sample: dict[str, np.ndarray], runs: int) -> float:
        from builder.execution.timing import median_run_ms

        return median_run_ms(lambda: self.run(sample), runs)


def compress_tflite(source: Path, data_arg: str, out_dir: Path, precision: str, task: str = "auto",
                    min_cosine: float = 0.9, min_agreement: float = 0.9, timed_runs: int = 50) -> TfliteResult:
    """Quantize ``source`` with ai-edge-quantizer, judge it on ``data_arg``, write OUT/model.tflite
    and OUT/report.json (both or neither)."""
    from builder.atomic_files import atomic_write_bytes
    from builder.compression.data import DataSource
    from builder.compression.evaluate import output_fidelity
    from builder.targets.litert_target import quantize_tflite
    from builder.targets.task_metrics import detect_task

    original = _Runner(source)
    samples = _samples(DataSource.from_arg(data_arg, original.specs()), EVAL_SAMPLES)
    if not samples:
        raise UsageError(f"{data_arg}: no samples to judge the quantized model on")
    judged = str(original.outputs[0]["name"])
    with tempfile.TemporaryDirectory(prefix="edgefleet-tflite-") as tmp:
        candidate = Path(tmp) / "model.tflite"
        quantize_tflite(source, candidate, precision)
        quantized = _Runner(candidate)
        reference, got = original.outputs_of(samples), quantized.outputs_of(samples)
        task = task if task not in ("auto", None) else detect_task(reference[:1])
        fid = output_fidelity(reference, got, task)
        source_ms = original.latency_ms(samples[0], timed_runs)
        candidate_ms = quantized.latency_ms(samples[0], timed_runs)
        recipe = ("ai-edge-quantizer dynamic_wi8_afp32 (int8 weights, dynamic int8 activations)" if precision == "int8"
                  else "ai-edge-quantizer float casting (fp16 weights)")
        result = TfliteResult(str(source), str(out_dir / "model.tflite"), precision, recipe, task, judged, len(samples),
                              candidate.stat().st_size, source.stat().st_size, fid.agreement, fid.cosine_mean,
                              fid.cosine_min, candidate_ms, source_ms)
        gaps = []
        if fid.cosine_mean < min_cosine:
            gaps.append(f"cosine {fid.cosine_mean:.4f} < {min_cosine:g}")
        if fid.agreement < min_agreement:
            gaps.append(f"{task} score {fid.agreement:.3f} < {min_agreement:g}")
        if gaps:
            result.flags.append("fidelity_floor_missed")
            result.warnings.append(f"fidelity floor missed, result kept and flagged: {'; '.join(gaps)}")
        if precision == "int8" and result.size_bytes >= 0.95 * result.source_size_bytes:
            result.flags.append("not_quantized")
            result.warnings.append(f"ai-edge-quantizer quantized no weights ({result.source_size_bytes:,} -> "
                                   f"{result.size_bytes:,} bytes){_why_unquantized(source)}")
        if result.latency_ratio > 1.0:
            result.flags.append("slower_than_input")
            result.warnings.append(f"{precision} runs {result.latency_ratio:.2f}x the input's LiteRT latency on this CPU")
        out_dir.mkdir(parents=True, exist_ok=True)
        report = json.dumps({**asdict(result), "latency_ratio": round(result.latency_ratio, 4)}, indent=2)
        atomic_write_bytes(out_dir / "model.tflite", candidate.read_bytes())
        atomic_write_bytes(out_dir / "report.json", report.encode())
    return result


def summary_rows(result: TfliteResult) -> list[tuple[str, str]]:
    return [("recipe", result.recipe), ("task", f"{result.task} on output {result.judged_output!r}"),
            ("size", f"{result.source_size_bytes:,} -> {result.size_bytes:,} bytes "
                     f"({result.size_bytes / max(result.source_size_bytes, 1):.0%})"),
            ("fidelity", f"score {result.agreement:.3f}, cosine {result.cosine_mean:.4f} (min {result.cosine_min:.3f}) "
                         f"over {result.samples} samples"),
            ("latency (LiteRT, 1 thread)", f"{result.source_latency_ms:.3f} -> {result.latency_ms:.3f} ms "
                                           f"(x{1 / result.latency_ratio:.2f} speed-up)"),
            ("flags", ", ".join(result.flags) or "none")]


def _why_unquantized(source: Path) -> str:
    """The reason ai-edge-quantizer leaves a model's weights alone, when the graph shows it."""
    from builder.analysis.tflite_stats import read_tflite

    graph = read_tflite(source)
    fp16 = sum(1 for op in graph.ops if op.name == "DEQUANTIZE" and op.inputs
               and graph.tensors[op.inputs[0]].constant and graph.tensors[op.inputs[0]].dtype == "float16")
    if fp16:
        return (f": its {fp16} weight tensors are stored as fp16 behind DEQUANTIZE ops, which ai-edge-quantizer does "
                "not re-quantize; the fp16 file is already half the fp32 size, and int8 needs the float model it was "
                "exported from")
    return ""
