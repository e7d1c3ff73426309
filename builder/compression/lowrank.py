"""Low-rank factorisation (``type = "lowrank"``) of Linear and 1x1 Conv layers by truncated SVD.

``W (out x in) ~= U_r S_r V_r^T`` becomes two layers, ``in -> r`` (V_r^T scaled by sqrt(S)) and
``r -> out`` (U_r scaled by sqrt(S), with the bias), where ``r`` is the smallest rank keeping
``energy`` of the squared singular values. A layer is replaced only where ``r * (in + out) < in * out``
(otherwise factorising would add parameters). Fine-tuning afterwards when training data is given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from builder.compression._torch_layers import check_fraction, weight_layers
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import UsageError

DEFAULT_EPOCHS = 3
# the search's order of prune_channels and lowrank (the parameter exists when both are searched)
TORCH_ORDERS = ("channels_then_lowrank", "lowrank_then_channels")


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    squared = np.asarray(singular_values, dtype=np.float64) ** 2
    cumulative = np.cumsum(squared) / max(squared.sum(), 1e-30)
    return min(int(np.searchsorted(cumulative, energy - 1e-12)) + 1, len(squared))


@dataclass(frozen=True)
class LowRankStep(CompressionStep):
    name: ClassVar[str] = "lowrank"
    form: ClassVar[ModelForm] = ModelForm.TORCH
    # prune_channels refuses factorised q/k/v, so attention models always prune first; other models
    # search the order (``torch_order``)
    order: ClassVar[StepOrder] = StepOrder(after=("prune_channels",))

    energy: float = 0.9
    epochs: Optional[int] = None  # None: DEFAULT_EPOCHS with --train-data
    lr: float = 1e-3
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fraction("energy", self.energy, low_open=True, high_open=False)
        if self.epochs is not None and self.epochs < 0:
            raise UsageError("epochs must be >= 0")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def requires_train_data(self) -> bool:
        return bool(self.epochs)

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        params: tuple[SearchParam, ...] = (SearchParam("use_lowrank", (False, True)),
                                           SearchParam("lowrank_energy", (0.8, 0.9, 0.95)))
        if options.usable("prune_channels"):
            params += (SearchParam("torch_order", TORCH_ORDERS),)
        return params

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if not values.get("use_lowrank"):
            return ()
        first = values.get("torch_order") == "lowrank_then_channels" and not options.attention
        return (SearchEntry({"energy": float(values["lowrank_energy"])},
                            StepOrder(before=("prune_channels",)) if first else None),)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import torch
        from torch import nn

        from builder.compression import training

        module = state.torch_module
        assert module is not None  # a TORCH-form step: Recipe.validate refuses it without a module
        factored: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        # These torch modules read their Linear children's .weight directly (fused fast paths), so
        # those children must stay nn.Linear.
        reads_weights = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        fixed = [n for n, m in module.named_modules() if isinstance(m, reads_weights)]
        for name, layer in weight_layers(module, self.include, self.exclude):
            if any(name.startswith(a + ".") for a in fixed):
                skipped[name] = "inside a torch attention/transformer layer that reads .weight directly"
                continue
            is_pointwise = isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1 \
                and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid") and layer.dilation == (1, 1)
            if not (isinstance(layer, nn.Linear) or is_pointwise):
                continue
            weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            out_dim, in_dim = weight.shape
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            rank = rank_for_energy(s.numpy(), self.energy)
            if rank * (in_dim + out_dim) >= in_dim * out_dim:
                skipped[name] = f"rank {rank} saves nothing"
                continue
            root = s[:rank].sqrt()
            first_w = (root[:, None] * vh[:rank]).float()
            second_w = (u[:, :rank] * root[None, :]).float()
            bias = layer.bias.detach() if layer.bias is not None else None
            first: nn.Linear | nn.Conv2d
            second: nn.Linear | nn.Conv2d
            if isinstance(layer, nn.Linear):
                first, second = nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=bias is not None)
                first.weight.data.copy_(first_w)
                second.weight.data.copy_(second_w)
            else:
                first = nn.Conv2d(in_dim, rank, 1, bias=False)
                second = nn.Conv2d(rank, out_dim, 1, bias=bias is not None)
                first.weight.data.copy_(first_w[:, :, None, None])
                second.weight.data.copy_(second_w[:, :, None, None])
            if bias is not None and second.bias is not None:  # second has a bias exactly when bias is set
                second.bias.data.copy_(bias)
            _replace(module, name, nn.Sequential(first, second))
            factored[name] = [int(out_dim), int(in_dim), rank]
        if not factored:
            raise UsageError(f"lowrank: no Linear/1x1 Conv layer gets smaller at energy {self.energy} "
                             f"({skipped or 'no such layers'}); lower energy")
        facts: dict[str, Any] = {"factored": {n: {"out": o, "in": i, "rank": r} for n, (o, i, r) in factored.items()},
                                 "skipped": skipped}
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if ctx.train_batches else 0)
        if epochs:
            stats = training.fine_tune(module, ctx, state.inputs, epochs=epochs, lr=self.lr, task=ctx.task,
                                       teacher=ctx.teacher)
            facts["fine_tune"] = dataclasses.asdict(stats)
        facts["epochs"] = epochs
        return dataclasses.replace(state), StepRecord(self.name, dataclasses.asdict(self), facts)


def _replace(root: Any, dotted: str, new: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
