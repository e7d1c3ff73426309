"""Estimated latency and energy of a candidate on the search's device profile.

The estimate is the profile's roofline (``builder.analysis.estimate_latency``) over the candidate
graph's per-layer statistics, at the precision each layer is built in ("as built": int8 layers of a
quantized graph count at the int8 rate). The search multiplies it by the per-device calibration
factor (``objectives.Calibration``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ESTIMATE_SOURCE = "builder.analysis roofline (as-built precision)"


@dataclass(frozen=True)
class DeviceEstimate:
    latency_ms: float
    energy_mj: float
    fits_in_ram: bool
    source: str = ESTIMATE_SOURCE


def estimate_on_profile(onnx_path: Path, inputs: Sequence[Any], profile: Any) -> DeviceEstimate:
    """Roofline latency (ms) and energy (mJ) of the ONNX model at ``onnx_path`` on ``profile``."""
    from builder.analysis import analyze_onnx, estimate_latency

    stats = analyze_onnx(Path(onnx_path), {spec.name: tuple(spec.shape) for spec in inputs})
    estimate = estimate_latency(stats, profile, None)
    return DeviceEstimate(float(estimate.latency_ms), float(estimate.energy_mj), bool(estimate.fits_in_ram))
