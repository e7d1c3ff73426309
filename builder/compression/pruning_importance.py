"""Activation-aware importance for structured pruning, with bias compensation (FLAP, An et al. 2024).

Weight magnitude alone is a poor guide in a pretrained transformer: a unit with small weights may
carry large activations. Here a channel's importance is ``std(x_j) * ||W[:, j]||`` where a Linear
consumes it (x: that Linear's inputs over calibration tokens); a channel whose input barely moves is
cheap to remove, and its average contribution ``W[:, j] * mean(x_j)`` is folded into the consumer's
bias when it goes. Measured on MiniLM (25 % / 50 % of heads and FFN units, no fine-tuning): cosine to
the original embeddings 0.76 / 0.56 with L2 magnitude, 0.88 / 0.73 with this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from builder.loading.types import InputSpec

MAX_SAMPLES = 128


@dataclass(frozen=True)
class InputStats:
    """Per input feature of every Linear: mean and standard deviation over calibration tokens."""

    mean: dict[Any, Any]  # nn.Linear -> 1-D tensor
    std: dict[Any, Any]


def sample_rows(batches: Iterable[dict[str, np.ndarray]], limit: int = MAX_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Single-sample feeds from batches, at most ``limit``."""
    rows: list[dict[str, np.ndarray]] = []
    for batch in batches:
        count = len(next(iter(batch.values())))
        for index in range(count):
            rows.append({name: array[index:index + 1] for name, array in batch.items()})
            if len(rows) >= limit:
                return rows
    return rows


def input_statistics(module: Any, rows: Sequence[dict[str, np.ndarray]], inputs: Sequence[InputSpec]) -> InputStats:
    """Run ``module`` on each row (one at a time, padding trimmed, so pad tokens do not count) and
    collect the input statistics of every Linear."""
    import torch
    from torch import nn

    from builder.compression.training import forward, trim_padding

    sums: dict[Any, Any] = {}
    squares: dict[Any, Any] = {}
    counts: dict[Any, int] = {}

    def record(layer: Any, args: tuple[Any, ...], _output: Any) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[layer] = sums.get(layer, 0) + x.sum(0)
        squares[layer] = squares.get(layer, 0) + x.pow(2).sum(0)
        counts[layer] = counts.get(layer, 0) + x.shape[0]

    hooks = [layer.register_forward_hook(record) for layer in module.modules() if isinstance(layer, nn.Linear)]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for row in rows:
                forward(module, trim_padding(row), inputs)
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    mean = {layer: sums[layer] / counts[layer] for layer in sums}
    std = {layer: (squares[layer] / counts[layer] - mean[layer] ** 2).clamp(min=0).sqrt().float() for layer in sums}
    return InputStats(mean={layer: m.float() for layer, m in mean.items()}, std=std)


class FluctuationImportance:
    """A Torch-Pruning importance: for each group, the mean over its Linear consumers of
    ``std(x_j) * ||W[:, j]||``; groups without an observed consumer fall back to L2 magnitude.
    Normalised by the group mean, as Torch-Pruning's own importances are (for global pruning)."""

    def __init__(self, stats: InputStats) -> None:
        import torch_pruning as tp

        self.stats = stats
        self.fallback = tp.importance.GroupMagnitudeImportance(p=2)

    def __call__(self, group: Any) -> Any:
        import torch
        import torch_pruning as tp

        with torch.no_grad():
            total = torch.zeros(len(group[0][1]))
            consumers = 0
            for index, (dep, idxs) in enumerate(group):
                std = self.stats.std.get(dep.layer)
                # Torch-Pruning's handlers are bound methods: compare with ==, never `is`.
                if std is None or dep.pruning_fn != tp.prune_linear_in_channels:
                    continue
                root_idxs = group[index].root_idxs
                if any(r is None for r in root_idxs):
                    continue
                score = dep.layer.weight.detach().norm(dim=0) * std
                total.scatter_add_(0, torch.tensor(root_idxs), score[idxs].float())
                consumers += 1
            if not consumers:
                return self.fallback(group)
            total /= consumers
            return total / total.mean().clamp(min=1e-12)


def compensate_bias(group: Any, stats: InputStats) -> int:
    """Before ``group.prune()``: fold the removed inputs' mean contribution into each consuming
    Linear's bias. Returns how many layers were compensated (those without a bias are not)."""
    import torch
    import torch_pruning as tp

    done = 0
    with torch.no_grad():
        for dep, idxs in group:
            layer = dep.layer
            mean = stats.mean.get(layer)
            if mean is None or dep.pruning_fn != tp.prune_linear_in_channels or layer.bias is None or not idxs:
                continue
            removed = torch.tensor(idxs)
            layer.bias += layer.weight[:, removed] @ mean[removed].to(layer.weight.dtype)
            done += 1
    return done
