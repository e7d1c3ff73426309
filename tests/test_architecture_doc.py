"""docs/architecture.md matches the tree: every package folder of builder/ and agent/ is named in
its "Where to find a feature" map and its ownership table, and every folder it names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _packages() -> list[str]:
    found = []
    for top in ("builder", "agent"):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel and rel != top:
                found.append(rel)
    return found


def test_every_package_is_in_the_ownership_table_or_the_map():
    table = {m.group(1).rstrip("/") for m in re.finditer(r"^\| `([\w/]+)/?` \|", DOC, re.M)}
    missing = [p for p in _packages() if p not in table and f"{p.split('/')[-1]}/" not in DOC]
    assert not missing, f"docs/architecture.md does not name {missing}"
    for top_level in ("builder/fleet/transport", "builder/fleet/rollout", "builder/fleet/loop", "builder/execution",
                      "builder/demo"):
        assert top_level in table, top_level


def test_every_folder_the_doc_names_exists():
    named = {m.group(1).rstrip("/") for m in re.finditer(r"`((?:builder|agent)/[\w/]+?)/?`", DOC)}
    assert named, "no folders named"
    missing = sorted(p for p in named if not (ROOT / p).exists() and not (ROOT / f"{p}.py").exists())
    assert not missing, f"docs/architecture.md names {missing}, which do not exist"
