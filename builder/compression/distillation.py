"""Knowledge distillation (``type = "distill"``): train a student to match a teacher.

Teacher: the reference model the engine hands over (``ctx.teacher``): the original model, or the
model named by ``teacher = "package.module:factory"`` / a TorchScript file (``--distill-from``),
which the engine loads before running anything.
Student, first match wins:
- ``student = "package.module:factory"``: built by the factory under the run's seed (same seed, same
  random initialisation; torch's global RNG is left as it was), then initialised from the teacher's
  weights wherever names and shapes match;
- ``width = 0.5``: the current model made narrower by removing ``1 - width`` of the channels of every
  layer but the classifier (Torch-Pruning, keeping the largest-magnitude channels: the student
  starts from the teacher's weights);
- ``keep_layers = 3``: the current model with its repeated block list (e.g. a transformer's
  encoder layers) cut to ``keep_layers`` evenly spaced blocks;
- none of these: the current model itself (recovers accuracy after earlier steps).
Loss: ``alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))`` (Hinton et al. 2015) for
classifiers (pure KL without labels); ``1 - cosine`` or MSE to the teacher's embeddings for
embedding models.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

from builder.compression._torch_layers import check_fraction, last_linear_name
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import CompressionError, ModelLoadError, UsageError
from builder.loading.types import InputSpec

# The search's modes: "recover": distil the compressed model from the original after structural steps;
# "student": start from a half-width student derived from the teacher's weights.
DISTILL_MODES = ("off", "recover", "student")
DISTILL_EPOCHS = 8
# distill's default lr (3e-3) suits small CNNs; Adam at that rate wrecks a pretrained transformer
# (prune_channels' DEFAULT_TRANSFORMER_LR, measured on MiniLM).
TRANSFORMER_DISTILL_LR = 3e-4


def load_torch_source(source: str, inputs: Sequence[InputSpec]) -> Any:
    """A PyTorch module from ``package.module:factory`` or a TorchScript file (a teacher or student)."""
    import torch

    path = Path(source)
    if path.suffix in (".pt", ".pth", ".ts", ".torchscript") or path.is_file():
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # torch raises RuntimeError/ValueError for bad archives
            raise ModelLoadError(f"cannot load TorchScript model {source}: {exc}") from exc
    module_name, sep, func_name = source.partition(":")
    if not sep:
        raise UsageError(f"'{source}' is neither a TorchScript file nor 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import factory '{source}' ({exc}); check the name") from exc
    try:
        module = factory()
    except Exception as exc:  # user code
        raise ModelLoadError(f"factory '{source}' failed: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"factory '{source}' returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def load_matching_weights(student: Any, teacher: Any) -> list[str]:
    """Copy teacher tensors into the student where names and shapes match; returns the copied names."""
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = [k for k, v in student_state.items() if k in teacher_state and teacher_state[k].shape == v.shape]
    student.load_state_dict({**student_state, **{k: teacher_state[k] for k in copied}})
    return copied


def narrower(module: Any, width: float, inputs: Sequence[InputSpec]) -> Any:
    """Remove ``1 - width`` of the channels of every layer except the last Linear (DepGraph); in a
    transformer with HF-style attention, ``1 - width`` of the heads and FFN units, the hidden width kept
    (see ``channel_pruning``)."""
    from builder.compression._export import example_inputs
    from builder.compression.channel_pruning import StructuredPruner, hf_self_attention_modules

    head = last_linear_name(module)
    ignored = [module.get_submodule(head)] if head else []
    heads = 1.0 - width if hf_self_attention_modules(module) else 0.0
    StructuredPruner.build(module, example_inputs(inputs), ratio=1.0 - width, head_fraction=heads,
                           ignored=ignored).step()
    return module


def fewer_blocks(module: Any, keep: int) -> tuple[str, int]:
    """Keep ``keep`` evenly spaced blocks of the first ModuleList of identical blocks; returns its name
    and original length."""
    from torch import nn

    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(c) for c in child}) == 1:
            total = len(child)
            if keep >= total:
                raise UsageError(f"keep_layers = {keep} but '{name}' has only {total} blocks")
            chosen = sorted({round(i * (total - 1) / max(keep - 1, 1)) for i in range(keep)}) if keep > 1 else [total - 1]
            kept = nn.ModuleList([child[i] for i in chosen])
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, kept)
            if hasattr(parent, "num_layers"):
                parent.num_layers = len(kept)  # nn.TransformerEncoder keeps a count
            config = getattr(parent, "config", None) or getattr(module, "config", None)
            if config is not None and hasattr(config, "num_hidden_layers"):
                config.num_hidden_layers = len(kept)
            return name, total
    raise UsageError("keep_layers: the model has no list of repeated blocks to drop from; use width or student")


@dataclass(frozen=True)
class DistillStep(CompressionStep):
    name: ClassVar[str] = "distill"
    form: ClassVar[ModelForm] = ModelForm.TORCH

    teacher: Optional[str] = None  # resolved by the engine into ctx.teacher
    student: Optional[str] = None
    width: Optional[float] = None
    keep_layers: Optional[int] = None
    epochs: int = 15
    lr: float = 3e-3
    alpha: float = 0.5  # weight of the task loss when labels exist
    temperature: float = 4.0
    embed_loss: str = "cosine"  # "cosine" | "mse"

    def __post_init__(self) -> None:
        chosen = [n for n in ("student", "width", "keep_layers") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise UsageError(f"give one of student, width, keep_layers, not {chosen}")
        if self.width is not None:
            check_fraction("width", self.width, low_open=True)
        if self.keep_layers is not None and self.keep_layers < 1:
            raise UsageError("keep_layers must be >= 1")
        if self.epochs < 1:
            raise UsageError("epochs must be >= 1 (distillation trains the student)")
        check_fraction("alpha", self.alpha, high_open=False)
        if self.temperature <= 0:
            raise UsageError("temperature must be > 0")
        if self.embed_loss not in ("cosine", "mse"):
            raise UsageError("embed_loss must be 'cosine' or 'mse'")

    def requires_train_data(self) -> bool:
        return True

    def teacher_source(self) -> Optional[str]:
        return self.teacher

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        return (SearchParam("distill", DISTILL_MODES),)

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        mode = values.get("distill", "off")
        lr = {"lr": TRANSFORMER_DISTILL_LR} if options.attention else {}
        if mode == "student":  # the half-width student is the starting point of everything else
            return (SearchEntry({"width": 0.5, "epochs": DISTILL_EPOCHS, **lr}, StepOrder(first=True)),)
        if mode == "recover" and (values.get("use_prune_channels") or values.get("use_lowrank")):
            # recovers what the structural steps lost, before fine-grained pruning and clustering
            return (SearchEntry({"epochs": DISTILL_EPOCHS, **lr},
                                StepOrder(after=("prune_channels", "lowrank"), before=("prune", "cluster"))),)
        return ()

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        from builder.compression import training

        teacher = ctx.teacher
        if teacher is None:
            raise CompressionError("distill needs a teacher: a PyTorch model, or teacher = \"package.module:factory\"")
        facts: dict[str, Any] = {}
        student = state.torch_module
        params_before = _count(student)
        if self.student is not None:
            student = _seeded_student(self.student, state.inputs, ctx.seed)
            facts["initialised_from_teacher"] = len(load_matching_weights(student, teacher))
        elif self.width is not None:
            student = narrower(student, self.width, state.inputs)
        elif self.keep_layers is not None:
            block_list, total = fewer_blocks(student, self.keep_layers)
            facts["blocks"] = {"list": block_list, "before": total, "after": self.keep_layers}
        stats = training.fine_tune(student, ctx, state.inputs, epochs=self.epochs, lr=self.lr, task=ctx.task,
                                   teacher=teacher, alpha=self.alpha if ctx.labels_available else 0.0,
                                   temperature=self.temperature, embed_loss=self.embed_loss)
        facts.update({"params_before": params_before, "params_after": _count(student),
                      "fine_tune": dataclasses.asdict(stats)})
        return dataclasses.replace(state, torch_module=student), StepRecord(self.name, dataclasses.asdict(self), facts)


def _seeded_student(source: str, inputs: Sequence[InputSpec], seed: int) -> Any:
    """The factory's student built under ``seed``: without it a randomly initialised student depends
    on whatever ran before, and a distilled and a label-only run could not start from the same weights."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_torch_source(source, inputs)


def _count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))
