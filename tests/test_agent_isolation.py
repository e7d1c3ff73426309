"""agent/ stays light: it never imports torch nor builder (the device installs only the agent extra)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_agent_modules_import_neither_torch_nor_builder():
    modules = sorted("agent." + ".".join(p.relative_to(ROOT / "agent").with_suffix("").parts)
                     for p in (ROOT / "agent").rglob("*.py") if p.name != "__init__.py")
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'builder')]\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    for path in (ROOT / "agent").rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from builder" not in text and "import builder" not in text, path
