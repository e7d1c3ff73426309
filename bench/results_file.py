"""bench/RESULTS.md is one file with a section per benchmark: each run replaces its own section
(heading to the next ``## ``) and leaves the others, written atomically (a run killed mid-write
must not truncate the other benchmarks' results)."""
from __future__ import annotations

import os
from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` (starting with ``heading``) in place of the file's section of that heading,
    or at the end when it has none."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
