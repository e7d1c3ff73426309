"""The agent runs with only the `agent` extra: it never imports torch or builder.

Two proofs: an import hook that makes any torch/builder import fail while every agent module is
imported and `agent --help` runs; and (slow) a fresh virtual environment with only `.[agent]`
installed, where `agent --help` works and torch is absent.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HOOKED_IMPORT = textwrap.dedent('''
    import importlib, importlib.abc, pkgutil, sys
    FORBIDDEN = ("torch", "builder")

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"agent imported forbidden module {name!r}")
            return None

    sys.meta_path.insert(0, Forbid())
    import agent
    names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
    for name in names:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    assert not leaked, leaked
    print("\\n".join(names))
    from agent.cli import app
    sys.argv = ["agent", "--help"]
    try:
        app()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
''')


def test_every_agent_module_and_help_run_with_torch_and_builder_forbidden():
    result = subprocess.run([sys.executable, "-c", HOOKED_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(result.stdout.split())
    on_disk = {("agent." + ".".join(p.relative_to(ROOT / "agent").with_suffix("").parts)).removesuffix(".__init__")
               for p in (ROOT / "agent").rglob("*.py")}
    assert on_disk - {"agent"} <= imported, on_disk - imported  # the walk really covered every module
    assert "Usage: agent" in result.stdout


@pytest.mark.slow
def test_agent_help_in_a_fresh_venv_with_only_the_agent_extra(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("agent", "builder", "device_profiles"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                              f"{source}[agent]"], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    help_run = subprocess.run([str(venv / "bin" / "agent"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert help_run.returncode == 0, help_run.stderr[-3000:]
    assert "Usage: agent" in help_run.stdout
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    agent_import = subprocess.run([str(venv / "bin" / "python"), "-c", "import agent, agent.cli, onnxruntime, paho.mqtt"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert agent_import.returncode == 0, agent_import.stderr[-3000:]
