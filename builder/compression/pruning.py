"""Unstructured magnitude pruning (``type = "prune"``) with torch.nn.utils.prune.

Layer-wise (``scope = "layer"``: ``l1_unstructured`` per layer) or global (``scope = "global"``:
``global_unstructured`` across layers). With training data the sparsity follows TF-MOT's
PolynomialDecay over the fine-tuning steps:
``s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power``, updated every
``frequency`` steps between ``begin_step`` and ``end_step``; without training data (``epochs = 0``
or no --train-data) it prunes to ``final_sparsity`` in one shot. Masks are made permanent
(``prune.remove``) at the end, so the exported weights hold real zeros.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

from builder.compression._torch_layers import check_fraction, weight_layers
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import UsageError

DEFAULT_EPOCHS = 4
SEARCH_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)  # the search's grid for final_sparsity


def polynomial_sparsity(step: int, *, initial: float, final: float, begin: int, end: int, power: float) -> float:
    """TF-MOT PolynomialDecay: the target sparsity at optimiser step ``step``."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / max(end - begin, 1)
    return final + (initial - final) * (1.0 - progress) ** power


@dataclass(frozen=True)
class PruneStep(CompressionStep):
    name: ClassVar[str] = "prune"
    form: ClassVar[ModelForm] = ModelForm.TORCH
    # fine-grained zeros go in once the structure is settled (and the model distilled back)
    order: ClassVar[StepOrder] = StepOrder(after=("prune_channels", "lowrank", "distill"))

    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    scope: str = "layer"  # "layer" | "global"
    begin_step: int = 0
    end_step: Optional[int] = None  # None: 2/3 of the fine-tuning steps
    power: float = 3.0
    frequency: Optional[int] = None  # None: 10 updates between begin and end
    epochs: Optional[int] = None  # None: DEFAULT_EPOCHS when --train-data is given, else one shot
    lr: float = 1e-3
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fraction("final_sparsity", self.final_sparsity, low_open=True)
        check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise UsageError("initial_sparsity must not exceed final_sparsity")
        if self.scope not in ("layer", "global"):
            raise UsageError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.epochs is not None and self.epochs < 0:
            raise UsageError("epochs must be >= 0")
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise UsageError("end_step must be greater than begin_step")
        if self.frequency is not None and self.frequency < 1:
            raise UsageError("frequency must be >= 1")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def requires_train_data(self) -> bool:
        return bool(self.epochs)

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        return (SearchParam("use_prune", (False, True)), SearchParam("sparsity", SEARCH_SPARSITIES))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        return (SearchEntry({"final_sparsity": float(values["sparsity"])}),) if values.get("use_prune") else ()

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        from torch.nn.utils import prune

        from builder.compression import training

        module = state.torch_module
        layers = weight_layers(module, self.include, self.exclude)
        if not layers:
            raise UsageError("prune: the model has no Conv/Linear layers to prune")
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if ctx.train_batches else 0)
        for _, layer in layers:
            prune.identity(layer, "weight")
        total_steps = training.steps_per_epoch(ctx) * epochs
        end = self.end_step if self.end_step is not None else max(self.begin_step + 1, (2 * total_steps) // 3)
        frequency = self.frequency or max(1, (end - self.begin_step) // 10)
        history: list[tuple[int, float]] = []

        def update(step: int) -> None:
            in_window = self.begin_step <= step <= end
            if not in_window or ((step - self.begin_step) % frequency and step != end):
                return
            target = polynomial_sparsity(step, initial=self.initial_sparsity, final=self.final_sparsity,
                                         begin=self.begin_step, end=end, power=self.power)
            self._prune_to(layers, target)
            history.append((step, round(target, 4)))

        stats = None
        if epochs and total_steps:
            stats = training.fine_tune(module, ctx, state.inputs, epochs=epochs, lr=self.lr, task=ctx.task,
                                       teacher=ctx.teacher, on_step=update)
        # Whatever the schedule reached, the step ends at final_sparsity.
        self._prune_to(layers, self.final_sparsity)
        for _, layer in layers:
            prune.remove(layer, "weight")
        per_layer = {name: round(float((layer.weight == 0).float().mean()), 4) for name, layer in layers}
        zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
        count = sum(layer.weight.numel() for _, layer in layers)
        facts: dict[str, Any] = {"sparsity": round(zeros / count, 4), "layer_sparsity": per_layer,
                                 "pruned_layers": len(layers), "epochs": epochs,
                                 "schedule": {"begin_step": self.begin_step, "end_step": end, "frequency": frequency,
                                              "updates": len(history)}}
        if stats is not None:
            facts["fine_tune"] = dataclasses.asdict(stats)
        record = StepRecord(self.name, dataclasses.asdict(self), facts)
        return dataclasses.replace(state), record

    def _prune_to(self, layers: list[tuple[str, Any]], target: float) -> None:
        """Prune more weights until ``target`` of them are zero-masked (never un-prunes)."""
        from torch.nn.utils import prune

        if self.scope == "global":
            total = sum(layer.weight_mask.numel() for _, layer in layers)
            pruned = sum(int((layer.weight_mask == 0).sum()) for _, layer in layers)
            extra = int(round(target * total)) - pruned
            if extra > 0:
                prune.global_unstructured([(layer, "weight") for _, layer in layers],
                                          pruning_method=prune.L1Unstructured, amount=extra)
            return
        for _, layer in layers:
            total = layer.weight_mask.numel()
            extra = int(round(target * total)) - int((layer.weight_mask == 0).sum())
            if extra > 0:
                prune.l1_unstructured(layer, "weight", amount=extra)
