"""Get a ``torch.nn.Module`` from a TorchScript file or from ``package.module:factory``."""
from __future__ import annotations

import importlib
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

from builder.errors import ModelLoadError

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def is_factory_reference(source: str) -> bool:
    return bool(FACTORY_PATTERN.match(source))


def is_torch_zip(path: Path) -> bool:
    """TorchScript (and torch.save) files are zip archives; ONNX files are protobuf."""
    return zipfile.is_zipfile(path)


def load_torchscript(path: Path) -> Any:
    """``torch.jit.load`` on CPU, in eval mode; pickles of whole modules / state dicts are refused
    with the fix (they need their Python code: use a factory)."""
    import torch

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # RuntimeError/ValueError from the TorchScript reader
        hint = ("; a state_dict or torch.save(model) pickle needs its code: pass package.module:factory instead"
                if is_torch_zip(path) else "")
        raise ModelLoadError(f"{path} is not a TorchScript file ({_first_line(exc)}){hint}") from exc
    return module.eval()


def load_factory(reference: str) -> Any:
    """Import ``package.module`` and call ``factory()``; must return a ``torch.nn.Module``.

    The current directory is importable for the duration (as with ``python -m``), so a user's own
    package works from where the command is run.
    """
    import torch

    module_name, attr = reference.split(":", 1)
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise ModelLoadError(f"cannot import module '{module_name}' for {reference}; check the name and "
                                     f"that its package is installed or in the current directory") from exc
            raise ModelLoadError(f"importing '{module_name}' failed: {_first_line(exc)}; install what it needs") from exc
        except Exception as exc:  # errors raised while executing the user's module
            raise ModelLoadError(f"importing '{module_name}' failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        if added and sys.path and sys.path[0] == os.getcwd():
            sys.path.pop(0)
    if not hasattr(module, attr):
        raise ModelLoadError(f"module '{module_name}' has no attribute '{attr}'; check the factory name in {reference}")
    factory = getattr(module, attr)
    if isinstance(factory, torch.nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as exc:  # the user's factory can raise anything
            raise ModelLoadError(f"factory {reference}() raised {type(exc).__name__}: {_first_line(exc)}") from exc
    else:
        raise ModelLoadError(f"{reference} is a {type(factory).__name__}, not a callable returning a torch.nn.Module")
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"factory {reference}() returned {type(model).__name__}, not a torch.nn.Module; "
                             f"make it return the model")
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
