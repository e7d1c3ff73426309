"""LiteRT backend: ``ai_edge_litert`` (maintained), ``tflite_runtime`` as a fallback import.

tflite-runtime 2.14 rejects newer op versions and needs numpy<2 (docs), hence the order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agent.errors import RuntimeBackendError
from agent.runtime.base import TensorInfo


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef, unused-ignore]  # needed where ai_edge_litert has types

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise RuntimeBackendError("no LiteRT runtime installed; pip install ai-edge-litert") from exc


def default_threads() -> int:
    """The thread count ONNX Runtime picks by default (one per physical core), so ``threads=0``
    means the same on both backends instead of pinning LiteRT to one core."""
    import os

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is an agent dependency; keep the runtime importable without it
        physical = None
    return int(physical or os.cpu_count() or 1)


def _shape(detail: Mapping[str, Any]) -> tuple[int | None, ...]:
    """The tensor's shape, a dynamic dimension (-1 in ``shape_signature``) as None."""
    signature = detail.get("shape_signature")
    if signature is None or len(signature) != len(detail["shape"]):
        return tuple(int(x) for x in detail["shape"])
    return tuple(None if int(s) < 0 else int(x) for x, s in zip(detail["shape"], signature))


class LiteRtRuntime:
    def __init__(self, model_path: Path, threads: int = 0) -> None:
        interpreter_cls, module = _interpreter_class()
        self.threads = threads or default_threads()
        try:
            self._interp = interpreter_cls(model_path=str(model_path), num_threads=self.threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"{module} cannot load {Path(model_path).name}: {exc}") from exc
        self.backend = module
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self._inputs = tuple(TensorInfo(d["name"], _shape(d), np.dtype(d["dtype"]).name) for d in self._in)
        self._outputs = tuple(TensorInfo(d["name"], _shape(d), np.dtype(d["dtype"]).name) for d in self._out)

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            missing = [d["name"] for d in self._in if d["name"] not in feeds]
            if missing:
                raise RuntimeBackendError(f"inference failed: missing input {', '.join(missing)}; "
                                          f"the model takes {', '.join(d['name'] for d in self._in)}")
            for detail in self._in:
                value = feeds[detail["name"]]
                if tuple(value.shape) != tuple(detail["shape"]):
                    self._interp.resize_tensor_input(detail["index"], value.shape)
                    self._interp.allocate_tensors()
                self._interp.set_tensor(detail["index"], np.asarray(value, dtype=detail["dtype"]))
            self._interp.invoke()
            return {d["name"]: self._interp.get_tensor(d["index"]).copy() for d in self._out}
        except (KeyError, ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"inference failed: {exc}") from exc

    def close(self) -> None:
        self._interp = None
