"""Roofline estimate of latency, energy and fit of a model on a device profile. An estimate, not a
measurement: later steps compare it with benchmarks on real devices.

Per layer: ``max(compute time, memory time) + per_layer_overhead_us``, summed over layers, where

* compute time = (2 x MACs + other ops) / (peak x ``compute_efficiency``). The peak follows the layer's
  precision: fp32 -> ``peak_fp32_gflops``; int8 -> ``peak_int8_gops`` (on a GPU with int8 support,
  2 x ``peak_fp16_gflops``, the tensor-core ratio, when larger); fp16 -> ``peak_fp16_gflops`` when the
  profile has a GPU with fp16, 2 x the fp32 peak on a CPU with fp16 arithmetic (``[cpu] fp16_arithmetic``:
  twice the lanes per NEON register), else the layer runs as fp32 (see below).
* Precisions the profile does not execute natively (``DeviceProfile.native_precisions``): an fp16
  layer on a CPU without fp16 arithmetic (Raspberry Pi 4's Cortex-A72) runs ONNX Runtime's fp32
  kernel behind Cast nodes: fp32 compute and traffic, plus the Casts' own time (``CAST_TRAFFIC`` x
  the layer's fp32 activation bytes, and one node's overhead), so fp16 estimates slower than fp32 there, as measured on CPUs (docs/int8.md).
  int8 without a dot-product instruction keeps the lower ``peak_int8_gops`` the profile gives.
* memory time = (weights + input + output activation bytes) / (bandwidth x ``memory_efficiency``);
  reshapes/views and Q/DQ nodes fused into int8 kernels move nothing.

``precision=None`` estimates the graph as built (each layer at its own precision and stored dtype).
Giving ``"fp32"``, ``"fp16"`` or ``"int8"`` asks "what if it ran at that precision": weights become
params x bytes of that precision; activation traffic is rescaled from each layer's own precision to
fp16 for every layer, or to int8 for the linear layers only; fp16 halves the peak activation memory
of an fp32 graph, int8 keeps it (dynamic quantization keeps float activations between layers). The linear layers use that
precision's peak (for fp16 on a GPU every layer does), the other layers fp32's.

Energy per inference = latency x ``typical_w`` (the board's typical draw under load; idle power is
not subtracted). Fit = weights + peak activation memory <= RAM (the OS and runtime share the RAM,
so a model using most of it will not fit in practice: ``ram_fraction`` shows how close it is).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from builder.analysis.graph_stats import GraphStats, LayerStats
from builder.analysis.op_costs import LINEAR_OPS
from builder.profiles import PRECISIONS, DeviceProfile

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
# fp16 -> fp32 Cast of a layer's inputs and fp32 -> fp16 of its outputs, per fp32 activation byte
# (read 2 + write 4, read 4 + write 2 bytes per element over 4 + 4 of the layer's own traffic)
CAST_TRAFFIC = 1.5


@dataclass(frozen=True)
class LatencyEstimate:
    """Roofline estimate for one model on one device profile at one precision."""

    profile: str
    precision: str  # "as-built" or one of PRECISIONS
    latency_ms: float
    compute_ms: float  # sum over layers of the compute-time side of the roofline
    memory_ms: float  # sum over layers of the memory-time side
    overhead_ms: float  # layers x per_layer_overhead_us
    energy_mj: float
    compute_bound_layers: int
    memory_bound_layers: int
    weight_bytes: int
    peak_activation_bytes: int
    memory_needed_bytes: int
    ram_bytes: int
    fits_in_ram: bool
    layer_ms: tuple[float, ...]  # per entry of GraphStats.layers
    kind: str = "roofline estimate"

    @property
    def ram_fraction(self) -> float:
        return self.memory_needed_bytes / self.ram_bytes if self.ram_bytes else float("inf")

    def to_dict(self, with_layers: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["ram_fraction"] = self.ram_fraction
        if not with_layers:
            data.pop("layer_ms")
        return data


def peak_ops_per_s(profile: DeviceProfile, precision: str) -> float:
    """Peak arithmetic rate (ops/s, before efficiency) for a precision on a profile."""
    gpu_fp16 = profile.has_gpu and profile.accelerator_fp16 and profile.peak_fp16_gflops > 0
    if precision == "int8":
        peak = profile.peak_int8_gops
        if gpu_fp16 and profile.accelerator_int8:
            peak = max(peak, 2 * profile.peak_fp16_gflops)
        return peak * 1e9
    if precision == "fp16" and gpu_fp16:
        return profile.peak_fp16_gflops * 1e9
    if precision == "fp16" and getattr(profile, "cpu_fp16", False):
        return 2 * profile.peak_fp32_gflops * 1e9
    return profile.peak_fp32_gflops * 1e9


def _native_fp16(profile: DeviceProfile) -> bool:
    return bool(getattr(profile, "native_fp16", False))


def _layer_precision(layer: LayerStats, precision: str | None, profile: DeviceProfile) -> str:
    if precision is None:
        return layer.precision
    if precision == "fp16" and profile.has_gpu and profile.accelerator_fp16:
        return "fp16"
    return precision if layer.op_type in LINEAR_OPS else "fp32"


def estimate_latency(stats: GraphStats, profile: DeviceProfile, precision: str | None = None) -> LatencyEstimate:
    """Roofline latency / energy / fit of ``stats`` on ``profile`` (see the module docstring)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    compute_rate_eff = profile.compute_efficiency
    bandwidth = profile.bandwidth_gbps * 1e9 * profile.memory_efficiency
    overhead_s = profile.per_layer_overhead_us * 1e-6
    layer_ms: list[float] = []
    compute_total = memory_total = overhead_total = 0.0
    compute_bound = memory_bound = 0
    for layer in stats.layers:
        if layer.fused:
            layer_ms.append(0.0)
            continue
        layer_prec = _layer_precision(layer, precision, profile)
        emulated = layer_prec == "fp16" and not _native_fp16(profile)
        compute_s = layer.flops / (peak_ops_per_s(profile, "fp32" if emulated else layer_prec) * compute_rate_eff)
        traffic: float
        activations: float
        if precision is None:
            traffic = layer.traffic_bytes
        elif layer.traffic_bytes == 0:
            traffic = 0
        else:
            activations = max(layer.traffic_bytes - layer.weight_bytes, 0)
            # activation bytes were counted at the layer's own precision
            relative = BYTES_PER_ELEMENT[precision] / BYTES_PER_ELEMENT[layer.precision]
            act_scale = relative if precision == "fp16" or layer.op_type in LINEAR_OPS else 1.0
            traffic = layer.params * BYTES_PER_ELEMENT[precision] + activations * act_scale
        cast_s = 0.0
        if emulated and traffic:
            # fp32 kernel behind Cast nodes: its own traffic at fp32 (weights cast once, at load), and the
            # Casts are nodes of their own: their traffic and overhead come on top of the roofline
            own = BYTES_PER_ELEMENT[layer.precision if precision is None else precision]
            activations = max(traffic - layer.params * own, 0) * BYTES_PER_ELEMENT["fp32"] / own
            traffic = layer.params * BYTES_PER_ELEMENT["fp32"] + activations
            cast_s = activations * CAST_TRAFFIC / bandwidth + overhead_s
        memory_s = traffic / bandwidth
        if compute_s >= memory_s and compute_s > 0:
            compute_bound += 1
        else:
            memory_bound += 1
        compute_total += compute_s
        memory_total += memory_s
        overhead_total += overhead_s
        memory_total += cast_s
        layer_ms.append((max(compute_s, memory_s) + overhead_s + cast_s) * 1e3)
    latency_ms = sum(layer_ms)
    weight_bytes = stats.weight_bytes if precision is None else stats.params * BYTES_PER_ELEMENT[precision]
    halve_activations = precision == "fp16" and stats.dominant_precision == "fp32"
    peak_activation = int(stats.peak_activation_bytes * (0.5 if halve_activations else 1.0))
    needed = int(weight_bytes + peak_activation)
    ram_bytes = profile.ram_mb * 1024 * 1024
    return LatencyEstimate(
        profile=profile.name,
        precision=precision or "as-built",
        latency_ms=latency_ms,
        compute_ms=compute_total * 1e3,
        memory_ms=memory_total * 1e3,
        overhead_ms=overhead_total * 1e3,
        energy_mj=latency_ms * profile.typical_w,
        compute_bound_layers=compute_bound,
        memory_bound_layers=memory_bound,
        weight_bytes=int(weight_bytes),
        peak_activation_bytes=peak_activation,
        memory_needed_bytes=needed,
        ram_bytes=ram_bytes,
        fits_in_ram=needed <= ram_bytes,
        layer_ms=tuple(layer_ms),
    )
