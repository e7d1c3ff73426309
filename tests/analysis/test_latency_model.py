"""The roofline estimate follows its documented formula (pure: hand-made GraphStats)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from builder.analysis import GraphStats, LayerStats, estimate_latency, peak_ops_per_s
from builder.profiles import load_profiles


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def one_layer(macs: int, params: int, activation_bytes: int, op: str = "MatMul", precision: str = "fp32") -> GraphStats:
    weight_bytes = params * {"fp32": 4, "fp16": 2, "int8": 1}[precision]
    layer = LayerStats(name="l", op_type=op, params=params, macs=macs, other_ops=0, output_shape=(1,),
                       activation_bytes=activation_bytes, input_bytes=activation_bytes, weight_bytes=weight_bytes,
                       traffic_bytes=weight_bytes + 2 * activation_bytes, precision=precision)
    return GraphStats(input_shapes={"x": (1,)}, layers=(layer,), params=params, macs=macs, other_ops=0,
                      weight_bytes=weight_bytes, fp32_weight_bytes=4 * params, peak_activation_bytes=2 * activation_bytes,
                      op_histogram={op: 1}, macs_by_precision={precision: macs}, node_count=1)


def test_compute_bound_layer(profiles):
    pi4 = profiles["raspberry-pi-4"]
    stats = one_layer(macs=10**9, params=1000, activation_bytes=1000)
    estimate = estimate_latency(stats, pi4)
    compute_ms = 2e9 / (pi4.peak_fp32_gflops * 1e9 * pi4.compute_efficiency) * 1e3
    assert estimate.latency_ms == pytest.approx(compute_ms + pi4.per_layer_overhead_us / 1e3)
    assert (estimate.compute_bound_layers, estimate.memory_bound_layers) == (1, 0)
    assert estimate.energy_mj == pytest.approx(estimate.latency_ms * pi4.typical_w)
    assert estimate.kind == "roofline estimate" and estimate.precision == "as-built"


def test_memory_bound_layer_and_fit(profiles):
    pi4 = profiles["raspberry-pi-4"]
    stats = one_layer(macs=1000, params=100_000_000, activation_bytes=1000)
    estimate = estimate_latency(stats, pi4)
    memory_ms = (4e8 + 2000) / (pi4.bandwidth_gbps * 1e9 * pi4.memory_efficiency) * 1e3
    assert estimate.latency_ms == pytest.approx(memory_ms + pi4.per_layer_overhead_us / 1e3)
    assert estimate.memory_bound_layers == 1
    assert estimate.memory_needed_bytes == 4e8 + 2000 and estimate.fits_in_ram
    huge = one_layer(macs=1000, params=2 * 1024**3, activation_bytes=1000)
    assert not estimate_latency(huge, pi4).fits_in_ram


def test_precision_selects_the_peak(profiles):
    pi4, orin, nano = profiles["raspberry-pi-4"], profiles["jetson-orin-nano"], profiles["jetson-nano"]
    assert peak_ops_per_s(pi4, "int8") == pi4.peak_int8_gops * 1e9
    assert peak_ops_per_s(pi4, "fp16") == pi4.peak_fp32_gflops * 1e9  # no GPU: fp16 runs at fp32 speed
    assert peak_ops_per_s(orin, "fp16") == orin.peak_fp16_gflops * 1e9
    assert peak_ops_per_s(orin, "int8") == 2 * orin.peak_fp16_gflops * 1e9  # tensor-core int8
    assert peak_ops_per_s(nano, "int8") == nano.peak_int8_gops * 1e9  # Maxwell GPU has no int8 path
    stats = one_layer(macs=10**9, params=1000, activation_bytes=1000)
    assert estimate_latency(stats, orin, "fp16").latency_ms < estimate_latency(stats, orin, "fp32").latency_ms / 10
    as_int8 = estimate_latency(stats, pi4, "int8")
    assert as_int8.latency_ms < estimate_latency(stats, pi4).latency_ms
    assert as_int8.weight_bytes == 1000 and as_int8.precision == "int8"


def test_faster_profile_gives_lower_latency(profiles):
    pi4 = profiles["raspberry-pi-4"]
    doubled = replace(pi4, peak_fp32_gflops=2 * pi4.peak_fp32_gflops, bandwidth_gbps=2 * pi4.bandwidth_gbps,
                      per_layer_overhead_us=0.0)
    stats = one_layer(macs=10**9, params=1000, activation_bytes=1000)
    slow = estimate_latency(stats, replace(pi4, per_layer_overhead_us=0.0))
    assert estimate_latency(stats, doubled).latency_ms == pytest.approx(slow.latency_ms / 2)
    with pytest.raises(ValueError):
        estimate_latency(stats, pi4, "int4")


def test_native_precisions_follow_the_profiles(profiles):
    assert profiles["raspberry-pi-4"].native_precisions == ("fp32", "int8")  # Cortex-A72: no fp16 arithmetic
    assert "fp16" in profiles["raspberry-pi-5"].native_precisions
    assert "fp16" in profiles["jetson-nano"].native_precisions  # on its GPU
    assert not profiles["raspberry-pi-4"].dot_product and profiles["raspberry-pi-5"].dot_product


@pytest.mark.parametrize("macs", [10**6, 10**9])  # memory-bound and compute-bound
def test_int8_ranks_over_fp16_on_raspberry_pi_4(profiles, macs):
    pi4, pi5 = profiles["raspberry-pi-4"], profiles["raspberry-pi-5"]
    stats = one_layer(macs=macs, params=500_000, activation_bytes=400_000, op="Conv")
    fp32, fp16, int8 = (estimate_latency(stats, pi4, p).latency_ms for p in ("fp32", "fp16", "int8"))
    assert int8 < fp32 < fp16  # fp16 runs fp32 kernels behind Casts on a CPU without fp16 arithmetic
    # the same holds for a graph built in fp16 (as-built estimate)
    built_fp16 = one_layer(macs=macs, params=500_000, activation_bytes=200_000, op="Conv", precision="fp16")
    assert estimate_latency(built_fp16, pi4).latency_ms > estimate_latency(stats, pi4).latency_ms
    # a Pi 5 (Armv8.2, fp16 arithmetic) gains from fp16
    assert estimate_latency(stats, pi5, "fp16").latency_ms < estimate_latency(stats, pi5, "fp32").latency_ms
