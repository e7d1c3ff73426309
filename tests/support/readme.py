"""The shell blocks of the project's READMEs, and the environment they run in: shared by
``tests/test_readme.py`` (every block, twice) and ``tests/fleet/test_deploy_walkthrough.py`` (the
root/host blocks of deploy/README.md, with listed substitutions, in a scratch folder).

A block that cannot run on one machine (it needs a Raspberry Pi, root, a second host) carries the
HTML comment ``<!-- readme-test: skip (the reason) -->`` on the line before its fence.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "deploy/README.md")
SHELL_LANGUAGES = {"sh", "bash", "shell"}
SKIP_MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")

# Defined before every block: `make` is this checkout's Makefile with the running virtualenv, taken as made.
PRELUDE = """\
make() { command make -f "$EDGEFLEET_CHECKOUT/Makefile" VENV="$EDGEFLEET_VENV" -o "$EDGEFLEET_VENV/bin/.installed" "$@"; }
"""


@dataclass(frozen=True)
class ShellBlock:
    doc: str
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def shell_blocks(doc: str) -> list[ShellBlock]:
    """The fenced blocks of ``doc`` in a shell language, with the skip reason of a marker line
    right before the fence (blank lines between them are allowed)."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    blocks: list[ShellBlock] = []
    i = 0
    pending_skip: str | None = None
    while i < len(lines):
        line = lines[i]
        marker = SKIP_MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            pending_skip = marker.group("reason").strip()
        elif fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if fence.group("lang") in SHELL_LANGUAGES:
                blocks.append(ShellBlock(doc, start + 1, "\n".join(body) + "\n", pending_skip))
            pending_skip = None
        elif line.strip():
            pending_skip = None
        i += 1
    return blocks


def all_blocks() -> list[ShellBlock]:
    return [block for doc in DOCS if (ROOT / doc).is_file() for block in shell_blocks(doc)]


def block_environment(home: Path, venv: Path, checkout: Path = ROOT) -> dict[str, str]:
    """What a block sees: ``HOME`` in the scratch folder (so the default data dir
    ``~/.local/share/edgefleet`` is fresh; no ``EDGEFLEET_*`` from outside), ``venv``'s ``bin`` first
    on ``PATH`` and this checkout first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGEFLEET_", "XDG_", "PYTEST_", "VIRTUAL_ENV")) and k != "COLUMNS"}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PYTHONPATH=str(ROOT), EDGEFLEET_CHECKOUT=str(checkout), EDGEFLEET_VENV=str(venv),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env
