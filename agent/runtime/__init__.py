"""Runtime backends behind one interface (``ModelRuntime``): onnxruntime and LiteRT.

``open_runtime(manifest, model_path, cache_dir)`` picks the backend from ``manifest.target.runtime``.
"""
from __future__ import annotations

from pathlib import Path

from agent.errors import RuntimeBackendError
from agent.manifest import Manifest
from agent.runtime.base import ModelRuntime


def open_runtime(manifest: Manifest, model_path: Path, cache_dir: Path | None = None, threads: int = 0) -> ModelRuntime:
    runtime = manifest.target.runtime
    if runtime.startswith("onnxruntime"):
        from agent.runtime.onnxrt import OnnxRuntime

        return OnnxRuntime(Path(model_path), target=manifest.target, cache_dir=cache_dir, threads=threads)
    if runtime in ("litert", "tflite"):
        from agent.runtime.litert import LiteRtRuntime

        return LiteRtRuntime(Path(model_path), threads=threads)
    raise RuntimeBackendError(f"runtime {runtime!r} is not supported by this agent; build for onnxruntime or litert")


def open_model_file(model_path: Path, threads: int = 0) -> ModelRuntime:
    """Open a bare model file (``agent bench --model x.onnx``) by its extension."""
    from agent.manifest import Target

    suffix = Path(model_path).suffix.lower()
    if suffix in (".onnx", ".ort"):
        from agent.runtime.onnxrt import OnnxRuntime

        target = Target(profile="", runtime="onnxruntime", execution_providers=("CPUExecutionProvider",),
                        precision="fp32", format=suffix[1:])
        return OnnxRuntime(Path(model_path), target=target, threads=threads)
    if suffix == ".tflite":
        from agent.runtime.litert import LiteRtRuntime

        return LiteRtRuntime(Path(model_path), threads=threads)
    raise RuntimeBackendError(f"{model_path}: unknown model format {suffix!r}; use .onnx, .ort or .tflite")


__all__ = ["ModelRuntime", "open_runtime", "open_model_file"]
