"""``package.module:name`` references: the one resolver for model factories (``--model pkg.mod:make``)
and the search's evaluator (``SearchConfig.evaluator``).

The current directory is importable for the duration of the import (as with ``python -m``), so a
user's own package works from where the command is run; every failure is one line in ``error``.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from builder.errors import BuilderError, ModelLoadError

REFERENCE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def is_reference(text: str) -> bool:
    """``text`` is spelled ``package.module:name``."""
    return bool(REFERENCE_PATTERN.match(text))


def resolve_reference(reference: str, error: type[BuilderError] = ModelLoadError) -> Any:
    """The object ``package.module:name`` names (not called); ``error`` says why it cannot be had."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"'{reference}' is not a package.module:name reference")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise error(f"cannot import module '{module_name}' for {reference}; check the name and "
                            f"that its package is installed or in the current directory") from exc
            raise error(f"importing '{module_name}' failed: {first_line(exc)}; install what it needs") from exc
        except Exception as exc:  # errors raised while executing the user's module
            raise error(f"importing '{module_name}' failed: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        if added and sys.path and sys.path[0] == os.getcwd():
            sys.path.pop(0)
    if not hasattr(module, attr):
        raise error(f"module '{module_name}' has no attribute '{attr}'; check the name in {reference}")
    return getattr(module, attr)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
