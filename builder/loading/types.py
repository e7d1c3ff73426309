"""Plain data describing a loaded model; what every later step (analyse, compress, build) receives."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` is concrete (used for export, analysis and sample data);
    ``dynamic_axes`` names the axes that stay symbolic in the ONNX graph (e.g. {0: "batch"}).
    ``batch_axis`` is the axis samples are stacked on (0 for most inputs, 1 for an RNN state shaped
    (layers, batch, hidden)); None for an input that is not batched (a 0-d sample rate): every
    sample of a data set shares its one value."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # numpy dtype name
    dynamic_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})
    batch_axis: Optional[int] = 0

    def __post_init__(self) -> None:
        if len(self.shape) == 0 and self.batch_axis is not None:  # a 0-d input has no axis to batch on
            object.__setattr__(self, "batch_axis", None)


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
