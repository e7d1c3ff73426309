"""On an agent-only install the `builder` console script exists (one package) but the builder
extra does not: it must say so in one line, while `agent` works."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
AGENT_ONLY = [sys.executable, str(ROOT / "tests" / "support" / "agent_only.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_builder_without_its_extra_says_which_extra_to_install_in_one_line(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not needed: the import fails first")
    out = subprocess.run(AGENT_ONLY + ["builder", "analyze", str(model)], capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=120)
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgefleet[builder]'" in lines[0] and "onnx" in lines[0]
    agent = subprocess.run(AGENT_ONLY + ["agent", "--help"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert agent.returncode == 0 and "run" in agent.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_make_dist_builds_carries_the_agent_its_extra_and_profiles(tmp_path: Path) -> None:
    """What `make dist` runs (pip wheel --no-deps --no-build-isolation), on a copy of the sources so
    the build writes nothing into the checkout."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("agent", "builder", "device_profiles"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("edgefleet-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(info).decode()
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {"agent/cli.py", "agent/daemon.py", "device_profiles/raspberry-pi-4.toml", "builder/cli/main.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert "agent = agent.cli:app" in entry_points and "builder = builder.cli.main:app" in entry_points
    agent_deps = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and 'extra == "agent"' in line]
    assert any("onnxruntime" in d for d in agent_deps) and any("paho-mqtt" in d for d in agent_deps)
    assert not any("torch" in d or "onnx<" in d for d in agent_deps)  # a device never installs torch
