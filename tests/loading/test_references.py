"""The one ``package.module:name`` resolver: model factories and the search's evaluator go through it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from builder.errors import ModelLoadError, SearchError
from builder.loading.references import is_reference, resolve_reference


def test_resolves_from_the_current_directory_and_leaves_sys_path_as_it_was(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "userrefs_ok.py").write_text("VALUE = 41\ndef make():\n    return VALUE + 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    before = list(sys.path)
    assert resolve_reference("userrefs_ok:make")() == 42
    assert sys.path == before


@pytest.mark.parametrize("reference, error, words", [
    ("no_such_pkg_xyz.mod:make", ModelLoadError, "cannot import module 'no_such_pkg_xyz.mod'"),
    ("builder.errors:nothing_here", SearchError, "has no attribute 'nothing_here'"),
    ("builder.errors", SearchError, "not a package.module:name reference"),
])
def test_failures_are_one_line_in_the_callers_error(reference: str, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        resolve_reference(reference, error)


def test_a_module_that_raises_while_importing_is_named(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "userrefs_broken.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="importing 'userrefs_broken' failed: RuntimeError: half written"):
        resolve_reference("userrefs_broken:make")


def test_the_model_loader_and_the_search_use_the_same_resolver(tmp_path: Path, monkeypatch) -> None:
    """A factory in the current directory resolves for both callers (the search's used to need sys.path)."""
    from builder.loading.torch_sources import is_factory_reference
    from builder.search.optimize import SearchConfig, make_evaluator

    (tmp_path / "userrefs_eval.py").write_text("def make(setup):\n    return ('evaluator for', setup)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    config = SearchConfig.__new__(SearchConfig)
    object.__setattr__(config, "evaluator", "userrefs_eval:make")
    object.__setattr__(config, "setup", "SETUP")
    assert make_evaluator(config) == ("evaluator for", "SETUP")
    assert is_factory_reference("userrefs_eval:make") and is_reference("a.b:c") and not is_reference("a/b.onnx")
    with pytest.raises(SearchError, match="no attribute 'missing'"):
        object.__setattr__(config, "evaluator", "userrefs_eval:missing")
        make_evaluator(config)
