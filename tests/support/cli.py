"""Run the real `builder` entry point in-process (same error handling, no torch re-import)."""
from __future__ import annotations

import sys

import pytest


def run_builder(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``builder ARGS...``."""
    from builder.cli.main import app

    monkeypatch.setattr(sys, "argv", ["builder", *args])
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
