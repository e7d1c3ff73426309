"""Target runtimes: one module per runtime behind ``base.TargetRuntime``; ``TARGETS`` lists them.

The registry maps a runtime name (as in device profiles and manifests) to a factory that imports
its module only when used, so a missing optional converter breaks only its own runtime.
"""
from __future__ import annotations

import importlib
from typing import Callable

from builder.errors import UsageError
from builder.targets.base import TargetRuntime

# runtime name -> "module:Class"
TARGETS: dict[str, str] = {
    "onnxruntime": "builder.targets.onnxruntime_target:OnnxRuntimeTarget",
    "onnxruntime-tensorrt": "builder.targets.tensorrt_target:TensorRtTarget",
    "litert": "builder.targets.litert_target:LiteRtTarget",
}


def get_target(name: str) -> TargetRuntime:
    """The target for a runtime name; unknown names list the known ones."""
    if name not in TARGETS:
        raise UsageError(f"unknown runtime '{name}'; use one of {', '.join(TARGETS)}")
    module_name, cls_name = TARGETS[name].split(":")
    factory: Callable[[], TargetRuntime] = getattr(importlib.import_module(module_name), cls_name)
    return factory()


__all__ = ["TARGETS", "get_target"]
