"""Plain-data report of an analysis (what ``builder analyze --json`` prints and the demo writes)."""
from __future__ import annotations

from typing import Any, Sequence

from builder.analysis.graph_stats import GraphStats, LayerStats
from builder.analysis.latency_model import LatencyEstimate


def top_layers(stats: GraphStats, count: int) -> list[LayerStats]:
    """The ``count`` layers with the most MACs (then activation bytes), kept in graph order; all if 0."""
    layers = [layer for layer in stats.layers if not layer.fused]
    if count <= 0 or count >= len(layers):
        return layers
    ranked = sorted(range(len(layers)), key=lambda i: (layers[i].macs, layers[i].activation_bytes), reverse=True)
    keep = set(ranked[:count])
    return [layer for i, layer in enumerate(layers) if i in keep]


def analysis_report(model: dict[str, Any], stats: GraphStats, estimates: Sequence[LatencyEstimate]) -> dict[str, Any]:
    """JSON-ready dict: model facts, totals, histogram, every layer, and the estimates (labelled)."""
    data = stats.to_dict()
    layers = data.pop("layers")
    histogram = data.pop("op_histogram")
    return {
        "model": model,
        "totals": data,
        "op_histogram": histogram,
        "layers": layers,
        "estimates": [e.to_dict() for e in estimates],
        "estimates_note": "roofline estimates from device profiles, not measurements",
    }
