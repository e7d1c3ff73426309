"""Which kind of device is this? Detection from files, with the filesystem root as a parameter so
tests point it at fixture folders shaped like a Pi, a Jetson or an Android phone.

Order: Jetson (``/etc/nv_tegra_release``, then the device-tree model), Raspberry Pi (device-tree
model), Android (``/system/build.prop`` or ``getprop``), else a generic profile from the machine
architecture. Profile names match ``device_profiles/*.toml``; generic ones may have no file.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

GetProp = Callable[[str], "str | None"]


@dataclass(frozen=True)
class DetectedDevice:
    profile: str
    description: str
    source: str  # which file or property decided it
    facts: Mapping[str, str] = field(default_factory=dict)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\x00", b"").decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def system_getprop(name: str) -> str | None:
    """Android's ``getprop`` (Termux has it on PATH); None elsewhere."""
    tool = shutil.which("getprop")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _build_prop(root: Path) -> dict[str, str]:
    text = _read_text(root / "system" / "build.prop") or ""
    props = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def detect_jetson(root: Path) -> DetectedDevice | None:
    release = _read_text(root / "etc" / "nv_tegra_release")
    model = _read_text(root / "proc" / "device-tree" / "model") or ""
    if release is None and "jetson" not in model.lower():
        return None
    major = None
    if release:
        match = re.search(r"R(\d+)", release)
        major = int(match.group(1)) if match else None
    lowered = model.lower()
    if "orin nano" in lowered or (major is not None and major >= 35 and "nano" in lowered):
        profile = "jetson-orin-nano"
    elif "nano" in lowered or major == 32:
        profile = "jetson-nano"
    else:
        profile = "jetson-generic"
    facts = {"l4t_release": f"R{major}" if major is not None else "unknown", "model": model}
    return DetectedDevice(profile, model or f"NVIDIA Jetson (L4T R{major})",
                          "/etc/nv_tegra_release" if release else "/proc/device-tree/model", facts)


def detect_raspberry_pi(root: Path) -> DetectedDevice | None:
    model = _read_text(root / "proc" / "device-tree" / "model")
    if not model or "raspberry pi" not in model.lower():
        return None
    match = re.search(r"Raspberry Pi (\d+)", model)
    generation = match.group(1) if match else None
    profile = f"raspberry-pi-{generation}" if generation in ("4", "5") else "raspberry-pi-generic"
    return DetectedDevice(profile, model, "/proc/device-tree/model", {"model": model})


def detect_android(root: Path, getprop: GetProp | None = None) -> DetectedDevice | None:
    props = _build_prop(root)
    abi = props.get("ro.product.cpu.abi")
    if abi is None and getprop is not None:
        abi = getprop("ro.product.cpu.abi")
    if not abi:
        return None
    device_model = props.get("ro.product.model") or (getprop("ro.product.model") if getprop else None) or "Android device"
    profile = "android-arm64" if abi.startswith("arm64") else f"android-{abi}"
    return DetectedDevice(profile, device_model, "ro.product.cpu.abi", {"abi": abi, "model": device_model})


def detect_device(root: Path = Path("/"), getprop: GetProp | None = system_getprop,
                  machine: str | None = None) -> DetectedDevice:
    """Best guess of this device's profile; never raises."""
    root = Path(root)
    for probe in (detect_jetson, detect_raspberry_pi):
        found = probe(root)
        if found is not None:
            return found
    found = detect_android(root, getprop)
    if found is not None:
        return found
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return DetectedDevice("x86-64-host", f"generic {machine} Linux host", "platform.machine", {"machine": machine})
    if machine in ("aarch64", "arm64"):
        return DetectedDevice("linux-aarch64", "generic aarch64 Linux device", "platform.machine", {"machine": machine})
    return DetectedDevice(f"linux-{machine}", f"generic {machine} device", "platform.machine", {"machine": machine})
