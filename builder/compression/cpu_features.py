"""Which int8 arithmetic a CPU has, read from the host (``/proc/cpuinfo``) or from a device profile.

Why it matters for quantization (docs/int8.md): ONNX Runtime's int8 GEMM/Conv kernels take u8
activations times s8 weights (U8S8). With a dot-product instruction (x86 AVX-512 VNNI / AVX-VNNI /
AMX, Arm SDOT/UDOT from Armv8.2) that product accumulates in 32 bits. Without one, x86 uses
VPMADDUBSW, whose 16-bit intermediate sum saturates for large u8 x s8 pairs; ORT's documentation
advises 7-bit weights (``reduce_range``) or U8U8 there. Arm without dot-product (Cortex-A72,
Raspberry Pi 4) widens to 16/32 bits and does not saturate, but gains less over fp32.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

X86_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ARM_DOT_FLAGS = ("asimddp",)  # /proc/cpuinfo "Features" of Armv8.2 cores with SDOT/UDOT


@dataclass(frozen=True)
class Int8Support:
    """The CPU's int8 arithmetic, as the quantizer needs it."""

    arch: str  # "x86_64" | "aarch64" | other machine names
    dot_product: bool
    description: str  # e.g. "x86_64: avx2, no VNNI" or "raspberry-pi-4 profile: aarch64, no dot-product"

    @property
    def u8s8_saturates(self) -> bool:
        """x86 without VNNI: U8S8 goes through VPMADDUBSW (16-bit saturating pair sums)."""
        return self.arch in ("x86_64", "amd64") and not self.dot_product


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def host_int8_support(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> Int8Support:
    """The int8 support of the machine this runs on (no cpuinfo: assume no dot-product)."""
    arch = platform.machine().lower() or "unknown"
    try:
        flags = _cpu_flags(cpuinfo_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        flags = set()
    return support_from_flags(arch, flags)


def support_from_flags(arch: str, flags: set[str]) -> Int8Support:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch == "x86_64":
        dots = [f for f in X86_DOT_FLAGS if f in flags]
        simd = [f for f in ("avx512f", "avx2") if f in flags]
        text = f"x86_64: {', '.join(simd + dots) or 'no avx2'}" + ("" if dots else ", no VNNI")
        return Int8Support(arch, bool(dots), text)
    dots = [f for f in ARM_DOT_FLAGS if f in flags]
    return Int8Support(arch, bool(dots), f"{arch}: {'dot-product (asimddp)' if dots else 'no dot-product'}")


def profile_int8_support(profile: Any) -> Int8Support:
    """What a device profile says (``[cpu] arch`` and ``dot_product``)."""
    return Int8Support(profile.arch, bool(profile.dot_product),
                       f"{profile.name} profile: {profile.arch}, {'dot-product' if profile.dot_product else 'no dot-product'}")


def int8_support(arch: Optional[str] = None, dot_product: Optional[bool] = None) -> Int8Support:
    """The host's support, unless a target's ``arch`` / ``dot_product`` are given (e.g. from a profile)."""
    if arch is None and dot_product is None:
        return host_int8_support()
    host = host_int8_support()
    arch = arch or host.arch
    dot = host.dot_product if dot_product is None else bool(dot_product)
    return Int8Support(arch, dot, f"target {arch}: {'dot-product' if dot else 'no dot-product'}")
