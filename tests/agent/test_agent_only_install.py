"""On an agent-only install the `builder` console script exists (one package) but the builder
extra does not: it must say so in one line, while `agent` works."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
