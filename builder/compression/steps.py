"""The registry of compression steps: recipe ``type`` name -> step class. A plain dict, nothing more.

Every step is a frozen dataclass whose fields are its recipe parameters (see ``base.CompressionStep``).
Technique modules import torch / onnxruntime lazily inside ``apply`` so importing this is cheap.
To add a technique: write the module, import its class here, add one line to ``STEPS``.
"""
from __future__ import annotations

from builder.compression.channel_pruning import ChannelPruneStep
from builder.compression.clustering import ClusterStep
from builder.compression.distillation import DistillStep
from builder.compression.equalization import EqualizeStep
from builder.compression.fusion import FoldStep, OptimizeGraphStep
from builder.compression.int8_auto import Int8Step
from builder.compression.lowrank import LowRankStep
from builder.compression.onnx_pruning import OnnxPruneStep
from builder.compression.pruning import PruneStep
from builder.compression.quantization import QuantizeStep
from builder.compression.smoothing import SmoothStep

STEPS: dict[str, type] = {
    "prune": PruneStep,
    "prune_channels": ChannelPruneStep,
    "cluster": ClusterStep,
    "distill": DistillStep,
    "lowrank": LowRankStep,
    "prune_onnx": OnnxPruneStep,
    "fold": FoldStep,
    "optimize_graph": OptimizeGraphStep,
    "smooth": SmoothStep,
    "equalize": EqualizeStep,
    "quantize": QuantizeStep,
    "int8": Int8Step,
}
