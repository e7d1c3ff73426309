"""Get a ``torch.nn.Module`` from a TorchScript file or from ``package.module:factory``."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from builder.errors import ModelLoadError
from builder.loading.references import first_line as _first_line, is_reference, resolve_reference

def is_factory_reference(source: str) -> bool:
    return is_reference(source)


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
    """Resolve ``package.module:factory`` (``references.resolve_reference``) and call ``factory()``;
    must return a ``torch.nn.Module``."""
    import torch

    factory = resolve_reference(reference)
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


