"""Weight clustering (``type = "cluster"``): k-means per layer, optional centroid fine-tuning and
layer tying, so the weights take at most ``clusters`` distinct values and compress far better.

Each weight tensor becomes ``centroids[assignment]``. With training data the centroids are tuned:
the weight is re-parametrised (torch.nn.utils.parametrize) as a gather from a trainable centroid
vector, so each centroid receives the sum of its members' gradients while assignments stay fixed.
``tie = [["a", "b"]]`` makes same-shape layers share one tensor: k-means runs on their element-wise
mean and the group is stored once in the exported graph.
Sparsity is preserved (``preserve_sparsity``, TF-MOT's sparsity-preserving clustering): in a layer
that is at least 1% exact zeros (e.g. after ``prune``) the zeros stay zero and the non-zero weights
share ``clusters - 1`` values, so a layer still holds at most ``clusters`` distinct values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from builder.compression._torch_layers import weight_layers
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import UsageError

DEFAULT_EPOCHS = 3
SPARSE_FRACTION = 0.01  # a layer with at least this fraction of exact zeros keeps them
MIN_CLUSTERS = 2


def kmeans_1d(values: np.ndarray, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assignment) for a flat array; linear initialisation over [min, max] (the init that
    preserves large weights best, per Han et al. 2016), then scikit-learn's Lloyd iterations."""
    from sklearn.cluster import KMeans

    flat = values.reshape(-1, 1).astype(np.float64)
    k = min(clusters, len(np.unique(flat)))
    init = np.linspace(flat.min(), flat.max(), k).reshape(-1, 1)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, random_state=seed).fit(flat)
    return km.cluster_centers_.reshape(-1).astype(np.float32), km.labels_.astype(np.int64)


def _gather_module(centroids: Any, assignment: Any, mask: Any = None) -> Any:
    import torch
    from torch import nn

    class ClusteredWeight(nn.Module):
        assignment: torch.Tensor  # buffers, registered below
        mask: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.centroids = nn.Parameter(centroids)
            self.register_buffer("assignment", assignment)
            self.register_buffer("mask", mask if mask is not None else torch.ones_like(centroids[assignment]))

        def forward(self, _weight: torch.Tensor) -> torch.Tensor:
            return self.centroids[self.assignment] * self.mask  # pruned zeros stay zero

    return ClusteredWeight()


@dataclass(frozen=True)
class ClusterStep(CompressionStep):
    name: ClassVar[str] = "cluster"
    form: ClassVar[ModelForm] = ModelForm.TORCH
    # the last PyTorch step: weights shared after every change to them (preserve_sparsity keeps zeros)
    order: ClassVar[StepOrder] = StepOrder(after=("prune_channels", "lowrank", "distill", "prune"))

    clusters: int = 16
    epochs: Optional[int] = None  # centroid fine-tuning; None: DEFAULT_EPOCHS with --train-data
    lr: float = 1e-3
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    tie: tuple[tuple[str, ...], ...] = ()  # groups of same-shape layer names sharing one weight
    min_size: int = 64  # layers with fewer weights (tiny, sensitive) stay as they are
    preserve_sparsity: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.clusters, int) or isinstance(self.clusters, bool) or self.clusters < MIN_CLUSTERS \
                or self.clusters > 65536:
            raise UsageError(f"clusters must be an integer in [{MIN_CLUSTERS}, 65536], got {self.clusters!r}")
        if self.epochs is not None and self.epochs < 0:
            raise UsageError("epochs must be >= 0")
        if any(len(group) < 2 for group in self.tie):
            raise UsageError("each tie group needs at least two layer names, e.g. tie = [[\"fc1\", \"fc2\"]]")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "tie", tuple(tuple(g) for g in self.tie))

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        return (SearchParam("use_cluster", (False, True)), SearchParam("clusters", (8, 16, 32, 64)))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        return (SearchEntry({"clusters": int(values["clusters"])}),) if values.get("use_cluster") else ()

    def requires_train_data(self) -> bool:
        return bool(self.epochs)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import torch
        from torch.nn.utils import parametrize

        from builder.compression import training

        module = state.torch_module
        assert module is not None  # a TORCH-form step: Recipe.validate refuses it without a module
        layers = dict(weight_layers(module, self.include, self.exclude))
        groups = self._groups(module, layers)
        tied_names = {n for g in groups if len(g) > 1 for n in g}
        facts: dict[str, Any] = {"layers": {}, "tied": [list(g) for g in groups if len(g) > 1]}
        clustered = []
        for group in groups:
            weights = [layers[n].weight.detach() for n in group]
            if weights[0].numel() < self.min_size and not tied_names.intersection(group):
                continue
            mean = torch.stack(weights).mean(dim=0).cpu().numpy()
            nonzero = mean != 0
            if self.preserve_sparsity and (~nonzero).mean() >= SPARSE_FRACTION and nonzero.any():
                centroids, assigned = kmeans_1d(mean[nonzero], self.clusters - 1, seed=ctx.seed)
                assignment = np.zeros(mean.shape, dtype=np.int64)
                assignment[nonzero] = assigned
                mask = torch.from_numpy(nonzero.astype(np.float32))
                facts.setdefault("sparsity_preserved", []).extend(group)
            else:
                centroids, assigned = kmeans_1d(mean, self.clusters, seed=ctx.seed)
                assignment, mask = assigned.reshape(mean.shape), None
            shared = _gather_module(torch.from_numpy(centroids), torch.from_numpy(assignment), mask)
            for name in group:  # one parametrisation object per group: tied layers share centroids
                parametrize.register_parametrization(layers[name], "weight", shared, unsafe=True)
                clustered.append(name)
        if not clustered:
            raise UsageError(f"cluster: no layer has >= {self.min_size} weights; lower min_size")
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if ctx.train_batches else 0)
        if epochs:
            centroid_params = [p for n, p in module.named_parameters() if "parametrizations" in n and "centroids" in n]
            stats = training.fine_tune(module, ctx, state.inputs, epochs=epochs, lr=self.lr, task=ctx.task,
                                       teacher=ctx.teacher, parameters=centroid_params)
            facts["fine_tune"] = dataclasses.asdict(stats)
        for name in clustered:
            parametrize.remove_parametrizations(layers[name], "weight", leave_parametrized=True)
        for group in groups:  # tie for real: one Parameter object, exported once
            for name in group[1:]:
                layers[name].weight = layers[group[0]].weight
        for name in clustered:
            facts["layers"][name] = int(torch.unique(layers[name].weight.detach()).numel())
        facts["max_unique_values"] = max(facts["layers"].values())
        facts["epochs"] = epochs
        return dataclasses.replace(state), StepRecord(self.name, dataclasses.asdict(self), facts)

    def _groups(self, module: Any, layers: dict[str, Any]) -> list[tuple[str, ...]]:
        named = dict(module.named_modules())
        groups: list[tuple[str, ...]] = []
        used: set[str] = set()
        for group in self.tie:
            for name in group:
                if name not in named or not hasattr(named[name], "weight"):
                    raise UsageError(f"cluster: tie names unknown layer '{name}'")
                if name in used:
                    raise UsageError(f"cluster: layer '{name}' is in two tie groups")
                layers.setdefault(name, named[name])
            shapes = {tuple(named[n].weight.shape) for n in group}
            if len(shapes) != 1:
                raise UsageError(f"cluster: tied layers {list(group)} have different weight shapes {sorted(shapes)}")
            groups.append(tuple(group))
            used.update(group)
        groups.extend((name,) for name in layers if name not in used)
        return groups
