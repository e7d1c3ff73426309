"""ONNX Runtime target (Raspberry Pi, generic aarch64/x86 Linux, Android via ORT Mobile).

Writes an ONNX file optimised at a *portable* level (EXTENDED at most: ``ORT_ENABLE_ALL`` writes
x86 NCHWc ops that failed to load on arm64, see FACTS.md) and, for the ``ort`` format, the ORT
mobile flatbuffer via onnxruntime's own ``convert_onnx_models_to_ort`` tool (``Fixed`` style, arm
platform) with ``required_operators_and_types.config`` so a reduced runtime can be built.
Both files are loaded and run in ONNX Runtime during verification.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from agent.manifest import TensorSpec
from builder.errors import TargetError
from builder.execution.sessions import open_session
from builder.execution.timing import median_run_ms
from builder.targets.base import (
    CompiledPayloads,
    OutputCheck,
    PayloadFile,
    Tolerance,
    UnsupportedOp,
    VerificationReport,
    compare_outputs,
    count_ops,
    onnx_io_specs,
    predictions_of,
)

log = logging.getLogger(__name__)

# Operator domains the stock ONNX Runtime CPU build implements.
ORT_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml", "com.microsoft.nchwc", "ai.onnx.preview.training")
OPT_LEVELS = ("disabled", "basic", "extended")  # "all" deliberately absent: not portable
CONFIG_FILE = "required_operators_and_types.config"


def run_ort(path: Path, samples: Sequence[Mapping[str, np.ndarray]], threads: int = 1,
            level: str = "all") -> list[dict[str, np.ndarray]]:
    """Run an .onnx or .ort file on the CPU EP, one sample at a time; outputs in graph order."""
    try:
        sess = open_session(path, threads, level)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
        raise TargetError(f"ONNX Runtime cannot load {Path(path).name}: {str(exc).splitlines()[0]}") from exc
    names = [o.name for o in sess.get_outputs()]
    types = {i.name: i.type for i in sess.get_inputs()}
    results = []
    for sample in samples:
        feed = {k: _cast_for_ort(v, types.get(k, "")) for k, v in sample.items() if k in types}
        values = sess.run(names, feed)
        results.append(dict(zip(names, values)))
    return results


def _cast_for_ort(value: np.ndarray, ort_type: str) -> np.ndarray:
    mapping = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(double)": np.float64, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
               "tensor(bool)": np.bool_}
    dtype = mapping.get(ort_type)
    return np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)


def time_ort(path: Path, sample: Mapping[str, np.ndarray], runs: int = 20, threads: int = 1) -> float:
    """Median single-thread latency (ms) of one sample on the host CPU EP, after one warm-up run."""
    sess = open_session(path, threads, "all")
    types = {i.name: i.type for i in sess.get_inputs()}
    feed = {k: _cast_for_ort(v, types[k]) for k, v in sample.items() if k in types}
    return median_run_ms(lambda: sess.run(None, feed), runs)


def verify_with_ort(runtime: str, precision: str, files: Sequence[PayloadFile], output_names: Sequence[str],
                    samples: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]],
                    tolerance: Tolerance, checked: str, level: str = "all") -> VerificationReport:
    checks: list[OutputCheck] = []
    predictions = None
    for i, f in enumerate(files):
        outputs = run_ort(f.path, samples, level=level)
        checks.append(compare_outputs(f.name, outputs, reference, tolerance, output_names))
        if i == 0:
            predictions = predictions_of(outputs)
    latency = time_ort(files[0].path, samples[0]) if samples else None
    return VerificationReport(runtime=runtime, precision=precision, tolerance=tolerance, checks=tuple(checks),
                              checked=checked, num_samples=len(samples), host_latency_ms=latency,
                              predictions=predictions)


class OnnxRuntimeTarget:
    """Portable ONNX (+ ORT mobile format) for the ORT CPU / XNNPACK / NNAPI execution providers."""

    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8", "fp16", "mixed")
    formats: ClassVar[tuple[str, ...]] = ("onnx", "ort")

    def check_ops(self, onnx_model: Any, precision: str = "fp32") -> list[UnsupportedOp]:
        found = []
        for (domain, op), n in sorted(count_ops(onnx_model).items()):
            if domain not in ORT_DOMAINS:
                found.append(UnsupportedOp(op, domain, n, f"custom domain '{domain}' is not in the stock ONNX Runtime build",
                                           "register the custom-op library on the device, or export the op with standard ONNX ops"))
        return found

    def compile(self, model_onnx_path: Path, inputs: Sequence[TensorSpec], precision: str,
                options: Mapping[str, Any], workdir: Path) -> CompiledPayloads:
        import onnx

        fmt = str(options.get("format", "onnx"))
        level = str(options.get("optimization_level", "extended"))
        if level not in OPT_LEVELS:
            raise TargetError(f"optimization level '{level}' is not portable; use one of {', '.join(OPT_LEVELS)} (ORT_ENABLE_ALL writes x86-only NCHWc ops)")
        if fmt not in self.formats:
            raise TargetError(f"onnxruntime target writes {' or '.join(self.formats)}, not '{fmt}'")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        portable = workdir / "model.onnx"
        try:
            open_session(model_onnx_path, 1, level, optimized_path=portable)
        except Exception as exc:
            raise TargetError(f"ONNX Runtime could not optimise the model: {str(exc).splitlines()[0]}") from exc
        model = onnx.load(str(portable))
        model_inputs, model_outputs = onnx_io_specs(model)
        providers = tuple(options.get("execution_providers", ("CPUExecutionProvider",)))
        notes = [f"ONNX optimised offline at level '{level}' (portable across x86-64 and arm64)"]
        if fmt == "onnx":
            return CompiledPayloads(self.name, "onnx", precision, (PayloadFile("model.onnx", portable, "model"),),
                                    model_inputs, model_outputs, providers, {"graph_optimization_level": "all"}, (), tuple(notes))
        ort_file, config = convert_to_ort(portable, workdir / "ort")
        notes.append("ORT format via onnxruntime.tools.convert_onnx_models_to_ort (Fixed, arm)")
        files = (PayloadFile("model.ort", ort_file, "model"), PayloadFile(config.name, config, "aux"))
        return CompiledPayloads(self.name, "ort", precision, files, model_inputs, model_outputs, providers,
                                {"graph_optimization_level": "all"}, (PayloadFile("model.onnx", portable, "model"),), tuple(notes))

    def verify(self, payloads: CompiledPayloads, sample_inputs: Sequence[Mapping[str, np.ndarray]],
               reference_outputs: Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance) -> VerificationReport:
        files = [payloads.model_file] + [f for f in payloads.verify_files if f.role == "model"]
        names = list(reference_outputs[0].keys()) if reference_outputs else None
        checked = " and ".join(f.name for f in files) + " run in ONNX Runtime (CPU EP) on the host"
        return verify_with_ort(self.name, payloads.precision, files, names or [], sample_inputs, reference_outputs,
                               tolerance, checked)


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Run onnxruntime's own converter in a subprocess; return (model.ort, operators config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src_dir = out_dir / "src"
    src_dir.mkdir(exist_ok=True)
    shutil.copyfile(onnx_path, src_dir / "model.onnx")
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src_dir),
           "--output_dir", str(out_dir), "--optimization_style", "Fixed", "--target_platform", "arm", "--enable_type_reduction"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    ort_file = out_dir / "model.ort"
    config = out_dir / CONFIG_FILE
    if proc.returncode != 0 or not ort_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TargetError(f"ORT format conversion failed: {tail[0]}; the ONNX file may use ops the ORT format cannot hold")
    if not config.is_file():
        found = list(out_dir.glob("*.config"))
        if not found:
            raise TargetError("ORT format conversion wrote no required-operators config; check the onnxruntime version")
        config = found[0]
    log.debug("ORT conversion: %s", proc.stdout[-500:])
    return ort_file, config
