"""bench/RESULTS.md: a benchmark replaces its own section and leaves the others as they were."""
from __future__ import annotations

from pathlib import Path

from bench.results_file import replace_section


def test_a_run_replaces_its_own_section_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    replace_section(path, "## Fleet", "## Fleet\n\nold\n")
    replace_section(path, "## Agent", "## Agent\n\nagent rows\n")
    replace_section(path, "## Fleet", "## Fleet\n\nnew\n")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmark results\n") and "old" not in text
    assert text.index("## Fleet\n\nnew") < text.index("## Agent\n\nagent rows")
    replace_section(path, "## Agent", "## Agent\n\nagent again\n")
    assert path.read_text(encoding="utf-8").endswith("## Agent\n\nagent again\n") and "new" in path.read_text()
    assert not (tmp_path / "RESULTS.md.tmp").exists()
