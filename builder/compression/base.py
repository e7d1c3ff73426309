"""The one interface every compression technique implements.

A step takes the model in the form it works on and returns the model plus a record of what it did.
Steps that train (fine-tuning, distillation, clustering with centroid tuning) work on the PyTorch
module; graph steps (quantization, fusion, ONNX-only pruning) work on the ONNX file. The engine
(``builder.compression.engine``) orders them, exports PyTorch to ONNX between the two phases, and
refuses impossible recipes (a torch step after a graph step, or on an ONNX-only model).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol

from builder.loading.types import InputSpec


class ModelForm(enum.Enum):
    TORCH = "torch"
    ONNX = "onnx"


@dataclass
class ModelState:
    """The model between steps. ``torch_module`` is None once the recipe has moved to ONNX."""

    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    onnx_path: Optional[Path] = None
    torch_module: Optional[Any] = None
    precision: str = "fp32"  # "fp32" | "fp16" | "int8" | "mixed"


@dataclass(frozen=True)
class StepRecord:
    """What a step did, for the report: parameters used and facts measured (sparsity, kept nodes...)."""

    step: str
    params: Mapping[str, Any]
    facts: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass
class StepContext:
    """What a step may use besides the model. Batches are dicts input-name -> numpy array."""

    workdir: Path
    calibration_batches: Callable[[], Any] | None = None  # iterable of dict[str, np.ndarray]
    train_batches: Callable[[], Any] | None = None  # iterable of (dict[str, np.ndarray], labels or None)
    labels_available: bool = False
    teacher: Optional[Any] = None  # torch module of the original model, for distillation
    seed: int = 0
    task: str = "classify"  # "classify" | "embed": what the model's output is, detected by the engine


class CompressionStep(Protocol):
    """One technique. ``name`` is the recipe's ``step =`` key; ``form`` the model form it needs."""

    name: ClassVar[str]
    form: ClassVar[ModelForm]
    needs_data: ClassVar[bool]

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]: ...
