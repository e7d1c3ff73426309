"""Model analysis: per-layer parameters, MACs, activation bytes, peak memory (``graph_stats``), and
the roofline latency / energy / fit estimate per device profile (``latency_model``).

Pure functions over an ONNX graph and a profile; ``analyze_onnx``/``analyze_loaded`` add file I/O.
"""
from __future__ import annotations

from typing import Any

from builder.analysis.graph_stats import GraphStats, LayerStats, analyze_graph, analyze_model, analyze_onnx
from builder.analysis.latency_model import LatencyEstimate, estimate_latency, peak_ops_per_s


def analyze_loaded(loaded: Any) -> GraphStats:
    """Analyse a ``LoadedModel`` at the concrete shapes of its ``inputs``."""
    return analyze_onnx(loaded.onnx_path, {spec.name: spec.shape for spec in loaded.inputs})


__all__ = ["GraphStats", "LatencyEstimate", "LayerStats", "analyze_graph", "analyze_loaded", "analyze_model",
           "analyze_onnx", "estimate_latency", "peak_ops_per_s"]
