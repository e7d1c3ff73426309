"""Turn typed errors into one-line messages and exit codes: the only place that does so."""
from __future__ import annotations

import sys
from typing import Callable

import typer


def run_app(app: typer.Typer, error_types: tuple[type[BaseException], ...], prog: str) -> None:
    """Run a Typer app; a user's mistake prints ``prog: error: …`` and exits non-zero, no traceback."""
    try:
        app(prog_name=prog)
    except error_types as exc:  # typed errors from our own layers
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def guarded(fn: Callable[[], None], error_types: tuple[type[BaseException], ...], prog: str) -> None:
    """Same contract as run_app, for code that is not a Typer app (scripts, the demo)."""
    try:
        fn()
    except error_types as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
