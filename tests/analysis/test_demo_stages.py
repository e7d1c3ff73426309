"""The demo is a sequence of named stages; unknown stage names are refused before anything runs."""
from __future__ import annotations

import pytest

from builder.demo.stages import STAGES, run_demo
from builder.errors import UsageError


def test_stages_have_unique_names_and_analysis_comes_first():
    names = [stage.name for stage in STAGES]
    assert names[0] == "analyse" and len(set(names)) == len(names)


def test_unknown_stage_is_a_usage_error_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="unknown demo stage 'nope'; stages: analyse"):
        run_demo(tmp_path / "out", ["nope"])
    assert not (tmp_path / "out").exists()
