"""The one interface every compression technique implements.

A step takes the model in the form it works on and returns the model plus a record of what it did.
Steps that train (fine-tuning, distillation, clustering with centroid tuning) work on the PyTorch
module; graph steps (quantization, fusion, ONNX-only pruning) work on the ONNX file. The engine
(``builder.compression.engine``) orders them, exports PyTorch to ONNX between the two phases, and
refuses impossible recipes (a torch step after a graph step, or on an ONNX-only model).

A step also declares what the rest of the builder asks of it: the data it needs, its teacher, and its
part of ``builder optimize``'s search (trial parameters, its recipe entry for a point, where that entry
goes), which ``builder.search.space`` only composes. ``docs/architecture.md`` ("Adding a compression
technique") walks through one.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional

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


@dataclass(frozen=True)
class SpaceOptions:
    """What the model and the user's inputs make applicable: the facts a step's search parameters
    depend on (``builder.search.space`` composes the steps' parameters from them)."""

    torch_available: bool
    has_train_data: bool
    available_steps: frozenset[str]
    has_matmul: bool = False
    # Attention modules whose heads prune_channels can remove; None: assumed when the graph has MatMuls
    # (a transformer), the evaluator does not probe the PyTorch module for it.
    has_attention: Optional[bool] = None
    # Steps whose default parameters train (so they need --train-data); probed from the engine.
    training_steps: frozenset[str] = frozenset({"distill"})
    keep_float_counts: tuple[int, ...] = (0, 1, 2, 4, 8)
    conv_heavy: bool = False  # Conv holds most weights: dynamic int8 (ConvInteger) is a known trap there
    # the device profile's CPU, for the int8 step's op formats: {"arch": "aarch64", "dot_product": False}
    target_cpu: Optional[Mapping[str, Any]] = None

    def usable(self, step: str) -> bool:
        """The step is registered and, if it trains by default, there is training data."""
        return step in self.available_steps and (self.has_train_data or step not in self.training_steps)

    @property
    def attention(self) -> bool:
        return self.has_attention if self.has_attention is not None else self.has_matmul


@dataclass(frozen=True)
class SearchParam:
    """One searched parameter: a discrete grid (``builder.search.space`` says why). ``name`` is the
    optuna trial parameter's name; steps that offer alternatives for one decision (``graph``:
    fold or transformer fusions; ``quant_mode``: int8 or a quantize mode) declare the same name and
    their choices are merged in registry order."""

    name: str
    choices: tuple[Any, ...]
    # the value in the study's designed first trials (``builder.search.space.starting_points``); None:
    # the first choice (off, for a technique's switch). Merged parameters take the last one given.
    start: Any = None


@dataclass(frozen=True)
class StepOrder:
    """Where a step goes in a recipe the search assembles. The engine's own rule (PyTorch steps before
    ONNX steps) always holds; ties keep registry order (``builder.compression.steps.STEPS``)."""

    after: tuple[str, ...] = ()  # steps it follows whenever both are in the recipe
    before: tuple[str, ...] = ()  # steps it precedes whenever both are in the recipe
    first: bool = False  # before every step that is not first
    last: bool = False  # after every step that is not last
    replaces: tuple[str, ...] = ()  # steps left out when this one is in the recipe (it does their work)


@dataclass(frozen=True)
class SearchEntry:
    """One recipe step proposed for a point of the space: its parameters (without ``type``) and, when
    it differs from the step's declared ``order``, where it goes."""

    params: Mapping[str, Any] = field(default_factory=dict)
    order: Optional[StepOrder] = None


class CompressionStep(abc.ABC):
    """One technique. ``name`` is the recipe's ``type =`` key; ``form`` the model form it needs.

    Concrete steps are frozen dataclasses whose fields are their recipe parameters. The defaults below
    are the contract for a step that needs nothing but the model and is not searched; a step overrides
    what differs. The search side: ``search_params`` (the trial parameters it adds for a model),
    ``search_entries`` (its recipe step for a point of the space, empty when switched off) and
    ``order`` (where that step goes) — ``builder.search.space`` only composes them.
    """

    name: ClassVar[str]
    form: ClassVar[ModelForm]
    order: ClassVar[StepOrder] = StepOrder()

    def requires_data(self) -> bool:
        """Needs evaluation/calibration data (``--data``) with these parameters."""
        return False

    def requires_train_data(self) -> bool:
        """Trains the model with these parameters (``--train-data``)."""
        return False

    def teacher_source(self) -> Optional[str]:
        """A model the engine loads as the teacher before any step runs (``package.module:factory`` or
        a TorchScript file); None: the original model is the teacher."""
        return None

    @abc.abstractmethod
    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]: ...

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        """The trial parameters this step adds to the search for a model; none: not searched."""
        return ()

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        """This step's recipe entries for one point of the space (every parameter's value by name)."""
        return ()

    @classmethod
    def search_fallback(cls, options: SpaceOptions) -> Optional[SearchEntry]:
        """The recipe when no technique is switched on (the first step in registry order that has one)."""
        return None

    @classmethod
    def search_starting_points(cls, base: Mapping[str, Any], choices: Mapping[str, tuple[Any, ...]],
                               options: SpaceOptions) -> list[dict[str, Any]]:
        """Points for the study's first trials, as changes of ``base`` (every parameter at its start);
        parameters not in ``choices`` are dropped. None from any step: ``base`` alone."""
        return []
