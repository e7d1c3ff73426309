"""Structured channel pruning (``type = "prune_channels"``) with Torch-Pruning's DepGraph.

Channels (and, with ``prune_heads = true``, attention heads of ``nn.MultiheadAttention``) are
physically removed together with everything that depends on them (BatchNorm, the next layer's
inputs), so parameters, MACs and latency really go down. Importance is the L2 magnitude of each
dependency group; the last Linear (the classifier) keeps its outputs. Pruning runs in
``iterative_steps`` rounds with fine-tuning after each when training data is given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from builder.compression._torch_layers import check_fraction, last_linear_name, weight_layers
from builder.compression.base import ModelForm, ModelState, StepContext, StepRecord
from builder.errors import CompressionError, UsageError

DEFAULT_EPOCHS = 6


@dataclass(frozen=True)
class ChannelPruneStep:
    name: ClassVar[str] = "prune_channels"
    form: ClassVar[ModelForm] = ModelForm.TORCH
    needs_data: ClassVar[bool] = False

    ratio: float = 0.3  # fraction of channels removed from each prunable layer
    global_pruning: bool = False
    iterative_steps: int = 1
    epochs: Optional[int] = None  # fine-tuning epochs in total; None: DEFAULT_EPOCHS with --train-data
    lr: float = 1e-3
    round_to: Optional[int] = None  # keep channel counts multiples of this (SIMD-friendly)
    prune_heads: bool = False  # remove whole attention heads of nn.MultiheadAttention
    ignore: tuple[str, ...] = ()  # module names kept whole, besides the last Linear

    def __post_init__(self) -> None:
        check_fraction("ratio", self.ratio, low_open=True)
        if self.iterative_steps < 1:
            raise UsageError("iterative_steps must be >= 1")
        if self.epochs is not None and self.epochs < 0:
            raise UsageError("epochs must be >= 0")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError("round_to must be >= 1")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    def requires_train_data(self) -> bool:
        return bool(self.epochs)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import torch
        import torch_pruning as tp
        from torch import nn

        from builder.compression import training
        from builder.compression._export import example_inputs

        module = state.torch_module
        example = example_inputs(state.inputs)
        head = last_linear_name(module)
        named = dict(module.named_modules())
        ignored = [named[n] for n in ([head] if head else [])]
        for _, layer in weight_layers(module, include=self.ignore) if self.ignore else []:
            ignored.append(layer)
        attention = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
        before_channels = _out_channels(module)
        heads_before = [m.num_heads for m in attention]
        module.eval()
        with torch.no_grad():
            macs_before, params_before = tp.utils.count_ops_and_params(module, example)
        try:
            pruner = tp.pruner.BasePruner(
                module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=self.global_pruning, pruning_ratio=self.ratio, iterative_steps=self.iterative_steps,
                ignored_layers=ignored, round_to=self.round_to,
                # Torch-Pruning needs the head counts of every attention module, head pruning or not.
                num_heads={m: m.num_heads for m in attention},
                prune_num_heads=self.prune_heads and bool(attention), prune_head_dims=not self.prune_heads,
                head_pruning_ratio=self.ratio if self.prune_heads else 0.0,
            )
        except Exception as exc:  # DepGraph tracing failures
            raise CompressionError(f"prune_channels: Torch-Pruning could not trace the model: {exc}") from exc
        epochs = self.epochs if self.epochs is not None else (DEFAULT_EPOCHS if ctx.train_batches else 0)
        per_round = [epochs // self.iterative_steps + (1 if i < epochs % self.iterative_steps else 0)
                     for i in range(self.iterative_steps)]
        tune_stats = []
        for round_epochs in per_round:
            pruner.step()
            if round_epochs:
                stats = training.fine_tune(module, ctx, state.inputs, epochs=round_epochs, lr=self.lr, task=ctx.task,
                                           teacher=ctx.teacher)
                tune_stats.append(dataclasses.asdict(stats))
        module.eval()
        with torch.no_grad():
            macs_after, params_after = tp.utils.count_ops_and_params(module, example)
        after_channels = _out_channels(module)
        facts: dict[str, Any] = {
            "macs_before": int(macs_before), "macs_after": int(macs_after),
            "params_before": int(params_before), "params_after": int(params_after),
            "channels": {n: [before_channels[n], after_channels.get(n)] for n in before_channels},
            "ignored": [head] + list(self.ignore) if head else list(self.ignore), "epochs": epochs,
        }
        warnings: tuple[str, ...] = ()
        if attention:
            facts["attention_heads"] = {"before": heads_before, "after": [m.num_heads for m in attention]}
            if self.prune_heads and facts["attention_heads"]["after"] == heads_before:
                warnings = ("prune_heads: Torch-Pruning removed no attention head from this model's "
                            "nn.MultiheadAttention modules (only feed-forward channels were pruned)",)
        if tune_stats:
            facts["fine_tune"] = tune_stats
        if macs_after >= macs_before:
            raise CompressionError("prune_channels removed nothing (no prunable channel groups); "
                                   "check ignore / ratio, or the model's layers are not prunable")
        return dataclasses.replace(state), StepRecord(self.name, dataclasses.asdict(self), facts, warnings)


def _out_channels(module: Any) -> dict[str, int]:
    from torch import nn

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = int(layer.out_channels)
        elif isinstance(layer, nn.Linear):
            out[name] = int(layer.out_features)
    return out
