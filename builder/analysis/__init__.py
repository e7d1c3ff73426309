"""Model analysis: per-layer parameters, MACs, activation bytes, peak memory (``graph_stats``), and
the roofline latency / energy / fit estimate per device profile (``latency_model``).

Pure functions over an ONNX graph and a profile; ``analyze_onnx``/``analyze_loaded`` add file I/O.
"""
from __future__ import annotations

from typing import Any, Mapping

from builder.analysis.graph_stats import GraphStats, LayerStats, analyze_graph, analyze_model, analyze_onnx
from builder.analysis.latency_model import LatencyEstimate, estimate_latency, peak_ops_per_s


def analyze_loaded(loaded: Any, input_values: Mapping[str, Any] | None = None) -> GraphStats:
    """Analyse a ``LoadedModel`` at the concrete shapes of its ``inputs`` (``input_values``: arrays by
    input name that decide ``If`` branches, e.g. a sample rate)."""
    return analyze_onnx(loaded.onnx_path, {spec.name: spec.shape for spec in loaded.inputs}, input_values)


__all__ = ["GraphStats", "LatencyEstimate", "LayerStats", "analyze_graph", "analyze_loaded", "analyze_model",
           "analyze_onnx", "estimate_latency", "peak_ops_per_s"]
