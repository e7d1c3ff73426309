"""Load and validate device profiles (``device_profiles/*.toml`` plus user directories).

A profile is plain data that the latency model, the target runtimes and the fleet read. User
profiles live in a directory given by ``--profiles-dir`` or ``EDGEFLEET_PROFILES`` (``:``-separated);
a user file with the same name as a bundled one overrides it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from device_profiles import PROFILE_DIR
from builder.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES_ENV = "EDGEFLEET_PROFILES"
RUNTIMES = ("onnxruntime", "onnxruntime-tensorrt", "litert")
FORMATS = ("onnx", "ort", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class DeviceProfile:
    """What a compiler and a latency model need to know about one device class."""

    name: str
    description: str
    os: str
    arch: str
    cores: int
    clock_ghz: float
    simd: tuple[str, ...]
    dot_product: bool
    peak_fp32_gflops: float
    peak_int8_gops: float
    ram_mb: int
    bandwidth_gbps: float
    accelerator_kind: str
    accelerator_fp16: bool
    accelerator_int8: bool
    peak_fp16_gflops: float
    idle_w: float
    typical_w: float
    max_w: float
    storage_kind: str
    storage_gb: float
    runtimes: tuple[str, ...]
    onnxruntime_providers: tuple[str, ...]
    litert_delegates: tuple[str, ...]
    preferred_runtime: str
    preferred_format: str
    preferred_precision: str
    compute_efficiency: float
    memory_efficiency: float
    per_layer_overhead_us: float
    # built instead of preferred_runtime when the model cannot convert to it (LiteRT: an op with no
    # TFLite builtin or no ONNX->PyTorch converter); "" = no fallback, the build fails instead
    fallback_runtime: str = ""
    fallback_format: str = ""
    detect: Mapping[str, str] = field(default_factory=dict)
    source_path: str = ""
    # [cpu] fp16_arithmetic: the CPU computes in fp16 (Armv8.2 FEAT_FP16); without it an fp16 model
    # runs fp32 kernels behind Casts on the CPU
    cpu_fp16: bool = False

    @property
    def has_gpu(self) -> bool:
        return "gpu" in self.accelerator_kind

    @property
    def native_fp16(self) -> bool:
        """fp16 arithmetic somewhere the runtime uses it: a GPU with fp16, or a CPU with FEAT_FP16."""
        return self.cpu_fp16 or (self.has_gpu and self.accelerator_fp16 and self.peak_fp16_gflops > 0)

    @property
    def native_precisions(self) -> tuple[str, ...]:
        """Precisions the device executes natively ("int8" also without a dot-product instruction,
        at the lower ``peak_int8_gops`` the profile gives for that)."""
        return ("fp32",) + (("fp16",) if self.native_fp16 else ()) + ("int8",)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        data = asdict(self)
        data["detect"] = dict(self.detect)
        return data


def _section(raw: Mapping[str, Any], name: str, path: Path) -> Mapping[str, Any]:
    value = raw.get(name)
    if not isinstance(value, Mapping):
        raise ProfileError(f"{path}: missing [{name}] table; copy one from {PROFILE_DIR}/raspberry-pi-4.toml")
    return value


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path, section: str) -> Any:
    if key not in table:
        raise ProfileError(f"{path}: [{section}] lacks '{key}'; add it (see docs/architecture.md)")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProfileError(f"{path}: [{section}] '{key}' = {value!r} has the wrong type; expected {getattr(kind, '__name__', kind)}")
    return value


def parse_profile(raw: Mapping[str, Any], path: Path) -> DeviceProfile:
    """Validate one profile's TOML data; every error names the file, the key and the fix."""
    top = raw
    cpu = _section(raw, "cpu", path)
    mem = _section(raw, "memory", path)
    acc = _section(raw, "accelerator", path)
    pwr = _section(raw, "power", path)
    sto = _section(raw, "storage", path)
    rts = _section(raw, "runtimes", path)
    pref = _section(raw, "preferred", path)
    lat = _section(raw, "latency_model", path)
    profile = DeviceProfile(
        name=_get(top, "name", str, path, "top level"),
        description=str(top.get("description", "")),
        os=_get(top, "os", str, path, "top level"),
        arch=_get(cpu, "arch", str, path, "cpu"),
        cores=_get(cpu, "cores", int, path, "cpu"),
        clock_ghz=_get(cpu, "clock_ghz", float, path, "cpu"),
        simd=tuple(cpu.get("simd", [])),
        dot_product=bool(cpu.get("dot_product", False)),
        peak_fp32_gflops=_get(cpu, "peak_fp32_gflops", float, path, "cpu"),
        peak_int8_gops=_get(cpu, "peak_int8_gops", float, path, "cpu"),
        ram_mb=_get(mem, "ram_mb", int, path, "memory"),
        bandwidth_gbps=_get(mem, "bandwidth_gbps", float, path, "memory"),
        accelerator_kind=_get(acc, "kind", str, path, "accelerator"),
        accelerator_fp16=bool(acc.get("fp16", False)),
        accelerator_int8=bool(acc.get("int8", False)),
        peak_fp16_gflops=float(acc.get("peak_fp16_gflops", 0.0)),
        idle_w=_get(pwr, "idle_w", float, path, "power"),
        typical_w=_get(pwr, "typical_w", float, path, "power"),
        max_w=_get(pwr, "max_w", float, path, "power"),
        storage_kind=str(sto.get("kind", "unknown")),
        storage_gb=float(sto.get("gb", 0)),
        runtimes=tuple(_get(rts, "available", list, path, "runtimes")),
        onnxruntime_providers=tuple(rts.get("onnxruntime_providers", ["CPUExecutionProvider"])),
        litert_delegates=tuple(rts.get("litert_delegates", [])),
        preferred_runtime=_get(pref, "runtime", str, path, "preferred"),
        preferred_format=_get(pref, "format", str, path, "preferred"),
        preferred_precision=_get(pref, "precision", str, path, "preferred"),
        compute_efficiency=_get(lat, "compute_efficiency", float, path, "latency_model"),
        memory_efficiency=_get(lat, "memory_efficiency", float, path, "latency_model"),
        per_layer_overhead_us=float(lat.get("per_layer_overhead_us", 0.0)),
        fallback_runtime=str(pref.get("fallback_runtime", "")),
        fallback_format=str(pref.get("fallback_format", "")),
        detect={str(k): str(v) for k, v in dict(raw.get("detect", {})).items()},
        source_path=str(path),
        cpu_fp16=bool(cpu.get("fp16_arithmetic", False)),
    )
    if profile.preferred_runtime not in RUNTIMES:
        raise ProfileError(f"{path}: [preferred] runtime '{profile.preferred_runtime}' unknown; use one of {', '.join(RUNTIMES)}")
    if profile.preferred_format not in FORMATS:
        raise ProfileError(f"{path}: [preferred] format '{profile.preferred_format}' unknown; use one of {', '.join(FORMATS)}")
    if profile.preferred_precision not in PRECISIONS:
        raise ProfileError(f"{path}: [preferred] precision '{profile.preferred_precision}' unknown; use one of {', '.join(PRECISIONS)}")
    if profile.fallback_runtime:
        if profile.fallback_runtime not in profile.runtimes or profile.fallback_runtime == profile.preferred_runtime:
            raise ProfileError(f"{path}: [preferred] fallback_runtime '{profile.fallback_runtime}' must be another of "
                               f"[runtimes] available ({', '.join(profile.runtimes)})")
        if profile.fallback_format and profile.fallback_format not in FORMATS:
            raise ProfileError(f"{path}: [preferred] fallback_format '{profile.fallback_format}' unknown; use one of {', '.join(FORMATS)}")
    elif profile.fallback_format:
        raise ProfileError(f"{path}: [preferred] fallback_format needs a fallback_runtime")
    for key in ("cores", "clock_ghz", "peak_fp32_gflops", "ram_mb", "bandwidth_gbps"):
        if getattr(profile, key) <= 0:
            raise ProfileError(f"{path}: '{key}' must be positive")
    if not 0 < profile.compute_efficiency <= 1 or not 0 < profile.memory_efficiency <= 1:
        raise ProfileError(f"{path}: [latency_model] efficiencies must be in (0, 1]")
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name '{profile.name}' must match the file name '{path.stem}.toml'")
    return profile


def load_profile_file(path: Path) -> DeviceProfile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileError(f"profile file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    return parse_profile(raw, path)


def profile_dirs(extra_dirs: list[Path] | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Bundled directory first, then $EDGEFLEET_PROFILES entries, then explicit ones (later wins)."""
    env = os.environ if env is None else env
    dirs = [PROFILE_DIR]
    dirs += [Path(p) for p in env.get(PROFILES_ENV, "").split(os.pathsep) if p]
    dirs += list(extra_dirs or [])
    for d in dirs[1:]:
        if not d.is_dir():
            raise ProfileError(f"profile directory {d} does not exist; create it or fix --profiles-dir/{PROFILES_ENV}")
    return dirs


def load_profiles(extra_dirs: list[Path] | None = None, env: Mapping[str, str] | None = None) -> dict[str, DeviceProfile]:
    profiles: dict[str, DeviceProfile] = {}
    for directory in profile_dirs(extra_dirs, env):
        for path in sorted(directory.glob("*.toml")):
            profiles[path.stem] = load_profile_file(path)
    return profiles


def get_profile(name: str, extra_dirs: list[Path] | None = None, env: Mapping[str, str] | None = None) -> DeviceProfile:
    profiles = load_profiles(extra_dirs, env)
    if name not in profiles:
        raise ProfileError(f"unknown device profile '{name}'; known: {', '.join(sorted(profiles))} (see `builder profiles list`)")
    return profiles[name]
