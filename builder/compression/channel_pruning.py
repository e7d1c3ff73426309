"""Structured channel pruning (``type = "prune_channels"``) with Torch-Pruning's DepGraph.

Channels are physically removed together with everything that depends on them (BatchNorm, the next
layer's inputs), so parameters, MACs and latency really go down; the last Linear (the classifier)
keeps its outputs. Pruning runs in
``iterative_steps`` rounds with fine-tuning after each when training data is given (an embedding
model is distilled from the original: ``1 - cosine`` to its embeddings).

Importance: ``"magnitude"`` (L2 of each dependency group) or ``"activation"`` (``std(x) * ||W||``
where a Linear consumes the channel, the removed channels' mean folded into its bias: see
``pruning_importance``), the default for models with attention when batches are at hand.

Transformers: attention modules are recognised by shape, ``nn.MultiheadAttention`` and HF-style
self-attention (``query``/``key``/``value`` Linear children and a ``num_attention_heads`` count, as
in BERT). ``head_ratio`` removes that fraction of whole heads (their q/k/v rows and the output
projection's matching columns; heads keep their size); ``ratio`` removes feed-forward units. With
HF-style attention the residual width (embeddings, LayerNorms, attention and FFN output
projections: an embedding model's output size) is kept, and each attention module's head-count
attributes are updated after pruning, because its forward reshapes by them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional

from builder.compression._torch_layers import check_fraction, last_linear_name, weight_layers
from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepRecord)
from builder.compression.pruning_importance import (FluctuationImportance, InputStats, compensate_bias,
                                                     input_statistics, sample_rows)
from builder.errors import CompressionError, UsageError

DEFAULT_EPOCHS = 6
DEFAULT_LR = 1e-3
# Fine-tuning a pretrained transformer: MiniLM with half its heads and FFN units removed, 12 steps of
# embedding distillation: cosine to the original 0.56 -> 0.67 / 0.70 / 0.69 at lr 1e-4 / 3e-4 / 1e-3.
DEFAULT_TRANSFORMER_LR = 3e-4
IMPORTANCES = ("magnitude", "activation")
SEARCH_HEAD_RATIOS = (0.0, 0.25, 0.5)  # the search's grid for head_ratio (models with attention)


@dataclass(frozen=True)
class ChannelPruneStep(CompressionStep):
    name: ClassVar[str] = "prune_channels"
    form: ClassVar[ModelForm] = ModelForm.TORCH

    ratio: float = 0.3  # fraction of channels removed from each prunable layer (transformers: FFN units)
    head_ratio: Optional[float] = None  # fraction of attention heads removed; None: ratio with prune_heads, else 0
    global_pruning: bool = False
    iterative_steps: int = 1
    epochs: Optional[int] = None  # fine-tuning epochs in total; None: DEFAULT_EPOCHS with --train-data
    lr: Optional[float] = None  # None: DEFAULT_LR, DEFAULT_TRANSFORMER_LR for models with attention
    round_to: Optional[int] = None  # keep channel counts multiples of this (SIMD-friendly)
    prune_heads: bool = False  # remove whole attention heads (head_ratio > 0 implies it)
    keep_hidden: Optional[bool] = None  # keep the residual width; None: yes with HF-style attention
    importance: Optional[str] = None  # "magnitude" | "activation"; None: activation for attention models with data
    ignore: tuple[str, ...] = ()  # module names kept whole, besides the last Linear

    def __post_init__(self) -> None:
        check_fraction("ratio", self.ratio, low_open=True)
        if self.head_ratio is not None:
            check_fraction("head_ratio", self.head_ratio)
            if self.prune_heads and self.head_ratio == 0:
                raise UsageError("prune_heads = true but head_ratio = 0; drop one of them")
        if self.iterative_steps < 1:
            raise UsageError("iterative_steps must be >= 1")
        if self.epochs is not None and self.epochs < 0:
            raise UsageError("epochs must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise UsageError("lr must be > 0")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError("round_to must be >= 1")
        if self.importance not in (None, *IMPORTANCES):
            raise UsageError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def head_fraction(self) -> float:
        """The fraction of heads to remove, after the backward-compatible ``prune_heads`` switch."""
        if self.head_ratio is not None:
            return float(self.head_ratio)
        return self.ratio if self.prune_heads else 0.0

    def requires_train_data(self) -> bool:
        return bool(self.epochs)

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        params = (SearchParam("use_prune_channels", (False, True)),
                  SearchParam("channel_ratio", (0.1, 0.2, 0.3, 0.4, 0.5)))
        return params + ((SearchParam("head_ratio", SEARCH_HEAD_RATIOS),) if options.attention else ())

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if not values.get("use_prune_channels"):
            return ()
        params: dict[str, Any] = {"ratio": float(values["channel_ratio"])}
        if options.attention and float(values.get("head_ratio", 0.0)) > 0:
            params["head_ratio"] = float(values["head_ratio"])
        return (SearchEntry(params),)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import torch
        import torch_pruning as tp

        from builder.compression import training
        from builder.compression._export import example_inputs

        module = state.torch_module
        assert module is not None  # a TORCH-form step: Recipe.validate refuses it without a module
        example = example_inputs(state.inputs)
        head = last_linear_name(module)
        named = dict(module.named_modules())
        ignored = [named[n] for n in ([head] if head else [])]
        for _, layer in weight_layers(module, include=self.ignore) if self.ignore else []:
            ignored.append(layer)
        before_channels = _out_channels(module)
        module.eval()
        with torch.no_grad():
            macs_before, params_before = tp.utils.count_ops_and_params(module, example)
        pruner = StructuredPruner.build(module, example, ratio=self.ratio, head_fraction=self.head_fraction,
                                        ignored=ignored, keep_hidden=self.keep_hidden,
                                        global_pruning=self.global_pruning, iterative_steps=self.iterative_steps,
                                        round_to=self.round_to)
        heads_before = pruner.head_counts()
        importance = self.importance or ("activation" if heads_before and _has_batches(ctx) else "magnitude")
        if importance == "activation" and not _has_batches(ctx):
            raise UsageError("importance = \"activation\" needs data to observe activations; pass --data or --train-data")
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if ctx.train_batches else 0)
        lr = self.lr if self.lr is not None else (DEFAULT_TRANSFORMER_LR if heads_before else DEFAULT_LR)
        per_round = [epochs // self.iterative_steps + (1 if i < epochs % self.iterative_steps else 0)
                     for i in range(self.iterative_steps)]
        tune_stats = []
        compensated = 0
        for round_epochs in per_round:
            stats = input_statistics(module, sample_rows(_batches(ctx)), state.inputs) \
                if importance == "activation" else None
            compensated += pruner.step(stats)
            if round_epochs:
                tuned = training.fine_tune(module, ctx, state.inputs, epochs=round_epochs, lr=lr, task=ctx.task,
                                           teacher=ctx.teacher)
                tune_stats.append(dataclasses.asdict(tuned))
        module.eval()
        with torch.no_grad():
            macs_after, params_after = tp.utils.count_ops_and_params(module, example)
        after_channels = _out_channels(module)
        facts: dict[str, Any] = {
            "macs_before": int(macs_before), "macs_after": int(macs_after),
            "params_before": int(params_before), "params_after": int(params_after),
            "channels": {n: [before_channels[n], after_channels.get(n)] for n in before_channels},
            "ignored": [head] + list(self.ignore) if head else list(self.ignore), "epochs": epochs, "lr": lr,
            "hidden_kept": pruner.keep_hidden, "importance": importance, "bias_compensated": compensated,
        }
        warnings: tuple[str, ...] = ()
        if heads_before:
            heads_after = pruner.head_counts()
            facts["attention_heads"] = {"before": heads_before, "after": heads_after,
                                        "total": [sum(heads_before), sum(heads_after)]}
            if pruner.prune_num_heads and heads_after == heads_before:
                warnings = ("head pruning removed no attention head (ratio too small for Torch-Pruning to prune "
                            "the attention groups, or heads coupled to the kept hidden width); only "
                            "feed-forward channels were pruned",)
        if tune_stats:
            facts["fine_tune"] = tune_stats
        if macs_after >= macs_before:
            raise CompressionError("prune_channels removed nothing (no prunable channel groups); "
                                   "check ignore / ratio, or the model's layers are not prunable")
        return dataclasses.replace(state), StepRecord(self.name, dataclasses.asdict(self), facts, warnings)


@dataclass
class StructuredPruner:
    """Torch-Pruning's pruner set up for this model's attention, plus what must follow each round
    (the HF modules' head counts). Shared by ``prune_channels`` and ``distill(width=...)``."""

    pruner: Any  # torch_pruning BasePruner
    multihead: list[Any]  # nn.MultiheadAttention modules
    hf_attention: list[Any]  # HF-style self-attention modules
    keep_hidden: bool
    prune_num_heads: bool

    @staticmethod
    def build(module: Any, example: tuple[Any, ...], *, ratio: float, head_fraction: float = 0.0,
              ignored: Optional[list[Any]] = None, keep_hidden: Optional[bool] = None, global_pruning: bool = False,
              iterative_steps: int = 1, round_to: Optional[int] = None) -> "StructuredPruner":
        """``keep_hidden`` None: keep the residual width when the model has HF-style attention."""
        import torch_pruning as tp
        from torch import nn

        multihead = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
        hf_attention = hf_self_attention_modules(module)
        refuse_factorised_attention(module)
        keep = keep_hidden if keep_hidden is not None else bool(hf_attention)
        ignored = list(ignored or []) + (residual_layers(module, example) if keep else [])
        # Torch-Pruning needs the head counts of every attention module, head pruning or not.
        num_heads: dict[Any, int] = {m: m.num_heads for m in multihead}
        for attention in hf_attention:
            for projection in (attention.query, attention.key, attention.value):
                num_heads[projection] = int(attention.num_attention_heads)
        prune_num_heads = head_fraction > 0 and bool(num_heads)
        try:
            pruner = tp.pruner.BasePruner(
                module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=global_pruning, pruning_ratio=ratio, iterative_steps=iterative_steps,
                ignored_layers=ignored, round_to=round_to, num_heads=num_heads,
                # Fresh dicts: Torch-Pruning's defaults are shared mutable dicts it writes the head counts into.
                in_channel_groups={}, out_channel_groups={},
                prune_num_heads=prune_num_heads,
                # HF-style attention reshapes by a fixed head size: only whole heads may go.
                prune_head_dims=not (prune_num_heads or hf_attention),
                head_pruning_ratio=head_fraction if prune_num_heads else 0.0,
            )
        except Exception as exc:  # DepGraph tracing failures
            raise CompressionError(f"prune_channels: Torch-Pruning could not trace the model: {exc}") from exc
        if prune_num_heads and iterative_steps > 1 and not global_pruning:
            pruner.per_step_head_pruning_ratio = head_ratio_schedule(head_fraction, iterative_steps)
        return StructuredPruner(pruner, multihead, hf_attention, keep, prune_num_heads)

    def step(self, stats: Optional[InputStats] = None) -> int:
        """One pruning round, by weight magnitude or, given input statistics, by activation with the
        removed inputs' mean folded into biases; the HF attention modules' head counts follow.
        Returns the number of bias compensations."""
        import torch
        import torch_pruning as tp

        self.pruner.importance = FluctuationImportance(stats) if stats is not None \
            else tp.importance.GroupMagnitudeImportance(p=2)
        compensated = 0
        with torch.no_grad():
            for group in self.pruner.step(interactive=True):
                if stats is not None:
                    compensated += compensate_bias(group, stats)
                group.prune()
        sync_head_counts(self.hf_attention, self.pruner.num_heads)
        return compensated

    def head_counts(self) -> list[int]:
        return [int(m.num_heads) for m in self.multihead] + [int(a.num_attention_heads) for a in self.hf_attention]


def _has_batches(ctx: StepContext) -> bool:
    return ctx.train_batches is not None or ctx.calibration_batches is not None


def _batches(ctx: StepContext) -> Iterable[dict[str, Any]]:
    """Input batches to observe activations on: the training data, else the calibration data."""
    if ctx.train_batches is not None:
        return (batch for batch, _labels in ctx.train_batches())
    return ctx.calibration_batches() if ctx.calibration_batches is not None else ()


def _hf_attention_candidates(module: Any) -> Iterator[tuple[Any, list[Any]]]:
    """(module, its query/key/value children) for every module with an int ``num_attention_heads``
    and all three children present, whatever their type."""
    for candidate in module.modules():
        if isinstance(getattr(candidate, "num_attention_heads", None), int):
            projections = [getattr(candidate, name, None) for name in ("query", "key", "value")]
            if all(p is not None for p in projections):
                yield candidate, projections


def hf_self_attention_modules(module: Any) -> list[Any]:
    """HF-style self-attention: ``query``/``key``/``value`` Linear children and an int ``num_attention_heads``."""
    from torch import nn

    return [candidate for candidate, projections in _hf_attention_candidates(module)
            if all(isinstance(p, nn.Linear) for p in projections)]


def refuse_factorised_attention(module: Any) -> None:
    """HF-style attention whose query/key/value are no longer single Linears (``lowrank`` factorised
    them) reshapes by a head size that channel pruning cannot see: it would cut through heads and
    leave a model whose forward fails (measured: "shape '[1, 128, -1, 32]' is invalid")."""
    from torch import nn

    for _, projections in _hf_attention_candidates(module):
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise CompressionError("prune_channels cannot prune attention whose query/key/value projections are "
                                   "factorised (lowrank ran first); put prune_channels before lowrank")


def residual_layers(module: Any, example: tuple[Any, ...]) -> list[Any]:
    """Every layer whose outputs share a width with a LayerNorm: the residual stream of a transformer
    (embeddings, LayerNorms, attention and FFN output projections). Ignoring them keeps that width."""
    import torch_pruning as tp
    from torch import nn

    try:
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    except Exception as exc:  # DepGraph tracing failures
        raise CompressionError(f"prune_channels: Torch-Pruning could not trace the model: {exc}") from exc
    kept: dict[int, Any] = {}
    for norm in module.modules():
        if not isinstance(norm, nn.LayerNorm) or id(norm) in kept or norm not in graph.module2node:
            continue
        width = int(norm.normalized_shape[-1])
        group = graph.get_pruning_group(norm, tp.prune_layernorm_out_channels, idxs=list(range(width)))
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                kept.setdefault(id(dep.target.module), dep.target.module)
    return list(kept.values())


def sync_head_counts(hf_attention: list[Any], num_heads: dict[Any, int]) -> None:
    """Write the pruned head counts back into HF-style attention modules (their forward reshapes by
    ``attention_head_size`` and older versions by ``num_attention_heads`` / ``all_head_size``)."""
    for attention in hf_attention:
        heads = int(num_heads[attention.query])
        width = int(attention.query.out_features)
        head_size = getattr(attention, "attention_head_size", None)
        if heads < 1 or (head_size is not None and heads * int(head_size) != width):
            raise CompressionError(f"head pruning left {heads} heads for a {width}-wide query projection "
                                   f"(head size {head_size}); lower head_ratio")
        attention.num_attention_heads = heads
        attention.all_head_size = width


def head_ratio_schedule(fraction: float, steps: int) -> list[float]:
    """Per-round head ratios for Torch-Pruning's local pruning, which removes ``ceil(ratio * heads
    left)`` each round: its default linear schedule (cumulative targets applied to the heads left)
    removes too many. Index 0 is unused (Torch-Pruning counts rounds from 1)."""
    schedule = [0.0]
    for k in range(1, steps + 1):
        left_before = 1.0 - fraction * (k - 1) / steps
        left_after = 1.0 - fraction * k / steps
        schedule.append(max(0.0, 1.0 - left_after / left_before - 1e-9))  # 1e-9: no ceil(3.0000000001) = 4
    return schedule


def _out_channels(module: Any) -> dict[str, int]:
    from torch import nn

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = int(layer.out_channels)
        elif isinstance(layer, nn.Linear):
            out[name] = int(layer.out_features)
    return out
