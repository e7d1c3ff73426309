"""The registry of compression steps: recipe ``type`` name -> step class. A plain dict, nothing more.

Every step is a frozen dataclass subclassing ``base.CompressionStep``, whose fields are its recipe
parameters and whose class declares its search parameters and order (``builder.search.space``
composes them). Technique modules import torch / onnxruntime lazily inside ``apply`` so importing
this is cheap. To add a technique: write the module, import its class here, add one line to ``STEPS``
(at the end: see ``docs/architecture.md``, "Adding a compression technique").

The order is the search's: its trial parameters come in this order (a stored study knows them by
it) and recipe steps with no order rule between them keep it.
"""
from __future__ import annotations

from builder.compression.base import CompressionStep
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

STEPS: dict[str, type[CompressionStep]] = {
    "distill": DistillStep,
    "prune_channels": ChannelPruneStep,
    "lowrank": LowRankStep,
    "prune": PruneStep,
    "cluster": ClusterStep,
    "prune_onnx": OnnxPruneStep,
    "fold": FoldStep,
    "optimize_graph": OptimizeGraphStep,
    "int8": Int8Step,  # before quantize: its mode comes first in the quant_mode parameter
    "quantize": QuantizeStep,
    "smooth": SmoothStep,
    "equalize": EqualizeStep,
}
