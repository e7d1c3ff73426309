"""Plain data describing a loaded model; what every later step (analyse, compress, build) receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` is concrete (used for export, analysis and sample data);
    ``dynamic_axes`` names the axes that stay symbolic in the ONNX graph (e.g. {0: "batch"})."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # numpy dtype name
    dynamic_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})


@dataclass
class LoadedModel:
    """A model as the builder holds it.

    ``onnx_path`` always exists (PyTorch models are exported on load and the export checked against
    PyTorch outputs); ``torch_module`` is kept when the source was PyTorch, so training steps
    (fine-tuning, distillation) can run. ``source_kind`` is "onnx", "torchscript" or "factory".
    """

    name: str
    source: str
    source_kind: str
    onnx_path: Path
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    torch_module: Optional[Any] = None  # torch.nn.Module; typed Any so this module never imports torch
    opset: int = 17
    export_max_abs_diff: Optional[float] = None  # PyTorch vs ONNX Runtime on the check input
    normalisation: Optional[Any] = None  # builder.loading.normalise.Normalisation for ONNX files
