"""ONNX Runtime backend: CPU, XNNPACK, CUDA, TensorRT (engine cache in the agent's data dir).

Providers: the manifest's ``target.execution_providers`` in order, kept only when this
onnxruntime build has them (``get_available_providers``), then CPU as the last resort.
``target.runtime_options`` may hold ``graph_optimization_level`` ("disable"|"basic"|"extended"|
"all"), ``intra_op_num_threads``, ``session_config`` (session config entries, e.g.
``session.enable_saved_runtime_optimizations`` for runtime-optimised .ort files) and
``provider_options`` (provider name -> options).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agent.errors import RuntimeBackendError
from agent.manifest import Target
from agent.runtime.base import TensorInfo

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def choose_providers(requested: tuple[str, ...], available: list[str], cache_dir: Path | None,
                     precision: str = "fp32", provider_options: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Requested ∩ available, in the manifest's order, CPU last; TensorRT gets an engine cache."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in requested or ("CPUExecutionProvider",):
        if name not in available or any(name == c[0] for c in chosen):
            if name not in available:
                log.info("execution provider %s not available on this device; skipping", name)
            continue
        options = dict((provider_options or {}).get(name, {}))
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            engine_dir = Path(cache_dir) / "tensorrt"
            engine_dir.mkdir(parents=True, exist_ok=True)
            options.setdefault("trt_engine_cache_enable", True)
            options.setdefault("trt_engine_cache_path", str(engine_dir))
            options.setdefault("trt_timing_cache_enable", True)
            if precision in ("fp16", "mixed"):
                options.setdefault("trt_fp16_enable", True)
            if precision == "int8":
                options.setdefault("trt_int8_enable", True)
        chosen.append((name, options))
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


class OnnxRuntime:
    def __init__(self, model_path: Path, target: Target, cache_dir: Path | None = None, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeBackendError("onnxruntime is not installed; pip install onnxruntime (the agent extra)") from exc
        options = dict(target.runtime_options or {})
        so = ort.SessionOptions()
        so.log_severity_level = 3
        intra = int(options.get("intra_op_num_threads", threads) or 0)
        if intra:
            so.intra_op_num_threads = intra
            so.inter_op_num_threads = 1
        level = str(options.get("graph_optimization_level", "extended")).lower()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS.get(level, "ORT_ENABLE_EXTENDED"))
        for key, value in dict(options.get("session_config", {})).items():
            so.add_session_config_entry(str(key), str(value))
        if Path(model_path).suffix == ".ort" and "session_config" not in options:
            so.add_session_config_entry("session.load_model_format", "ORT")
        providers = choose_providers(tuple(target.execution_providers), ort.get_available_providers(), cache_dir,
                                     target.precision, options.get("provider_options"))
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=so,
                                                 providers=[p for p, _ in providers],
                                                 provider_options=[o for _, o in providers])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeBackendError(f"onnxruntime cannot load {Path(model_path).name}: {str(exc).splitlines()[0][:300]}") from exc
        self.providers = tuple(self._session.get_providers())
        self.backend = f"onnxruntime[{self.providers[0]}]"
        self._inputs = tuple(TensorInfo(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, "float32")) for i in self._session.get_inputs())
        self._outputs = tuple(TensorInfo(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, "float32")) for o in self._session.get_outputs())

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
        except Exception as exc:
            raise RuntimeBackendError(f"inference failed: {str(exc).splitlines()[0][:300]}") from exc
        return {info.name: value for info, value in zip(self._outputs, values)}

    def close(self) -> None:
        self._session = None
