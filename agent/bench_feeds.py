"""What ``agent bench`` feeds the model: a sample file, ``--input-shape`` values, or synthetic inputs.

A dynamic dimension is never silently timed as 1 (a detector with dynamic H/W timed at 1x3x1x1 reads
0.9 ms instead of ~47 ms): only a dynamic leading (batch) axis defaults to 1; any other dynamic dim
must come from ``--input-shape`` or ``--sample``, else the bench refuses with one line naming it.

``--input-shape`` grammar (repeatable, each value may hold a comma list)::

    [NAME=]DIMS[:DTYPE]      DIMS = 1x3x640x640, or "scalar" for a 0-d input (sr=scalar:int64)

A sample file is an ``.npz`` keyed by input name, or by ``in:<name>`` (an artifact's sample.npz).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from agent.errors import AgentError
from agent.runtime.base import TensorInfo, synthetic_feeds

if TYPE_CHECKING:
    import numpy as np

_ENTRY = re.compile(r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_.:/\-]*)=)?(?P<dims>scalar|\d+(?:x\d+)*)(?::(?P<dtype>[a-z0-9]+))?$")
SHAPE_EXAMPLE = "1x3x640x640, x=1x3x640x640, or sr=scalar:int64"


def parse_shape_options(values: Sequence[str]) -> dict[str | None, tuple[tuple[int, ...], str | None]]:
    """``--input-shape`` values -> {input name or None (the only input): (shape, dtype or None)}."""
    shapes: dict[str | None, tuple[tuple[int, ...], str | None]] = {}
    for value in values:
        for entry in "".join(value.split()).split(","):
            if not entry:
                continue
            match = _ENTRY.match(entry)
            if match is None:
                raise AgentError(f"--input-shape '{entry}' is not DIMS or NAME=DIMS[:DTYPE]; e.g. {SHAPE_EXAMPLE}")
            dims = match.group("dims")
            shape = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
            if any(d <= 0 for d in shape):
                raise AgentError(f"--input-shape '{entry}': dims must be positive")
            shapes[match.group("name")] = (shape, match.group("dtype"))
    return shapes


def load_sample_file(path: Path) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` keyed by input name or ``in:<name>``."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise AgentError(f"--sample {path} is not a readable .npz ({exc}); write it with numpy.savez") from exc
    prefixed = {k[3:]: v for k, v in arrays.items() if k.startswith("in:")}
    return prefixed or {k: v for k, v in arrays.items() if not k.startswith("out:")}


def _show(shape: Sequence[int | str | None]) -> str:
    """``1x3xHxW``: fixed dims as numbers, dynamic ones by their symbol (``?`` when unnamed)."""
    return "scalar" if len(shape) == 0 else "x".join(
        str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?") for d in shape)


def resolve_feeds(inputs: Sequence[TensorInfo], *, sample: Mapping[str, np.ndarray] | None = None,
                  shapes: Mapping[str | None, tuple[tuple[int, ...], str | None]] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every input: the sample's arrays, else synthetic arrays of the given or fixed shape.

    Raises AgentError (one line) for an input whose non-batch dims are dynamic and not given, a
    shape that contradicts a fixed dim, or a name the model does not have.
    """
    shapes = dict(shapes or {})
    names = [i.name for i in inputs]
    if None in shapes:
        if len(inputs) != 1:
            raise AgentError(f"the model has {len(inputs)} inputs ({', '.join(names)}); name each in --input-shape, "
                             f"e.g. {names[0]}=...")
        shapes[names[0]] = shapes.pop(None)
    unknown = [n for n in list(shapes) + list(sample or {}) if n not in names]
    if unknown:
        raise AgentError(f"input '{unknown[0]}' is not one of the model's inputs ({', '.join(names)})")
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        if sample is not None and info.name in sample:
            feeds[info.name] = sample[info.name]
            continue
        given = shapes.get(info.name)
        if given is not None:
            shape, dtype = given
            if len(shape) != len(info.shape) or any(isinstance(d, int) and d > 0 and d != g
                                                    for d, g in zip(info.shape, shape)):
                raise AgentError(f"--input-shape gives input '{info.name}' {_show(shape)} but the model expects "
                                 f"{_show(info.shape)}")
            spec = TensorInfo(info.name, shape, dtype or info.dtype)
        else:
            dynamic = [axis for axis, d in enumerate(info.shape) if not (isinstance(d, int) and d > 0) and axis > 0]
            if dynamic:
                raise AgentError(f"input '{info.name}' has dynamic dims ({_show(info.shape)}); give them with "
                                 f"--input-shape {info.name}=" + "x".join(
                                     str(d) if isinstance(d, int) and d > 0 else ("1" if a == 0 else "N")
                                     for a, d in enumerate(info.shape)) + " or --sample FILE.npz")
            spec = info
        feeds.update(synthetic_feeds((spec,), seed=seed))
    return feeds


def describe_feeds(feeds: Mapping[str, np.ndarray]) -> str:
    """``name 1x3x640x640 float32, sr scalar int64``: what was timed, printed beside the figures."""
    return ", ".join(f"{name} {_show(tuple(int(d) for d in arr.shape))} {arr.dtype}" for name, arr in feeds.items())
