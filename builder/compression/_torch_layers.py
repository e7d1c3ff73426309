"""Helpers shared by the PyTorch steps: which layers carry prunable / clusterable weights."""
from __future__ import annotations

from typing import Any, Sequence

from builder.errors import UsageError


def weight_layers(module: Any, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """(name, layer) for every Conv / Linear with a weight, filtered by exact module names or prefixes."""
    from torch import nn

    layers = [(name, layer) for name, layer in module.named_modules()
              if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and layer.weight is not None]
    known = {name for name, _ in layers}
    for wanted in list(include) + list(exclude):
        if not any(name == wanted or name.startswith(wanted + ".") for name in known):
            raise UsageError(f"no Conv/Linear layer named '{wanted}'; layers are: {', '.join(sorted(known))}")
    if include:
        layers = [(n, m) for n, m in layers if any(n == w or n.startswith(w + ".") for w in include)]
    return [(n, m) for n, m in layers if not any(n == w or n.startswith(w + ".") for w in exclude)]


def last_linear_name(module: Any) -> str | None:
    """The name of the last Linear layer (usually the classifier head, kept whole by default)."""
    from torch import nn

    names = [name for name, layer in module.named_modules() if isinstance(layer, nn.Linear)]
    return names[-1] if names else None


def check_fraction(name: str, value: float, *, low_open: bool = False, high_open: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UsageError(f"{name} must be a number, got {value!r}")
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        raise UsageError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}")
