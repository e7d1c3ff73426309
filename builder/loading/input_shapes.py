"""Parse ``--input-shape`` text into ``InputSpec``s and reconcile them with an ONNX graph's inputs.

Grammar (whitespace ignored)::

    spec  := entry ("," entry)*
    entry := [NAME "="] dims [":" DTYPE]          e.g.  input_ids=1x128:int64
    dims  := "scalar" | dim ("x" dim)*            e.g.  sr=scalar:int64  (a 0-d input)
    dim   := INT | AXIS "@" INT                   e.g.  1xseq@128  (axis 1 stays dynamic, named "seq")

Axis 0 is always exported as the dynamic axis ``batch`` unless it is named with ``@``; other axes are
static unless named. DTYPE is a numpy dtype name (default float32). Unnamed entries are positional:
one unnamed entry is the model's only input; several become ``input_0``, ``input_1``... for PyTorch
models.

Batch axes (``--batch-axis NAME=AXIS``, repeatable, or ``__batch_axes__`` in a data ``.npz``, see
``builder.compression.data``): the axis an input's samples are stacked on. Without a declaration it
is the axis holding the same symbol as the first input's axis 0 (silero VAD's state
``[2, batch, 128]`` beside ``input [batch, T]`` -> 1), else 0; a 0-d input is not batched.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from builder.errors import UsageError
from builder.loading.types import InputSpec

DTYPES = ("float32", "float16", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_NAME = r"[A-Za-z_][A-Za-z0-9_.:/\-]*"
_AXIS = r"[A-Za-z_][A-Za-z0-9_]*"
_DIM = re.compile(rf"(?:({_AXIS})@)?(\d+)")
_DIMS = re.compile(rf"^(?:{_AXIS}@)?\d+(?:x(?:{_AXIS}@)?\d+)*$")
EXAMPLE = "1x3x224x224 or input_ids=1xseq@128:int64,attention_mask=1xseq@128:int64 (sr=scalar:int64 for a 0-d input)"
SCALAR = "scalar"


def _parse_entry(entry: str, text: str) -> tuple[str | None, tuple[int, ...], dict[int, str], str | None]:
    name: str | None = None
    body = entry
    if "=" in entry:
        name, body = entry.split("=", 1)
        if not re.fullmatch(_NAME, name):
            raise UsageError(f"--input-shape '{text}': '{name}' is not a valid input name; expected e.g. {EXAMPLE}")
    dtype: str | None = None
    if ":" in body:
        body, dtype = body.rsplit(":", 1)
        if dtype not in DTYPES:
            raise UsageError(f"--input-shape '{text}': unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if body == SCALAR:
        return name, (), {}, dtype
    if not _DIMS.match(body):
        raise UsageError(f"--input-shape '{text}': cannot read dims '{body}'; expected e.g. {EXAMPLE}")
    shape: list[int] = []
    axes: dict[int, str] = {}
    for axis, token in enumerate(_split_dims(body)):
        match = _DIM.fullmatch(token)
        assert match is not None  # guaranteed by _DIMS
        if match.group(1):
            axes[axis] = match.group(1)
        value = int(match.group(2))
        if value <= 0:
            raise UsageError(f"--input-shape '{text}': dims must be positive, got {value}")
        shape.append(value)
    axes.setdefault(0, "batch")
    return name, tuple(shape), dict(sorted(axes.items())), dtype


def _split_dims(body: str) -> list[str]:
    """Split on the 'x' separators only (axis names may contain an 'x')."""
    tokens = []
    pos = 0
    while pos < len(body):
        match = _DIM.match(body, pos)
        assert match is not None
        tokens.append(match.group(0))
        pos = match.end() + 1  # skip the 'x'
    return tokens


def parse_input_shapes(text: str) -> tuple[InputSpec, ...]:
    """Parse ``--input-shape`` text (see module docstring); raises UsageError with the fix on bad text."""
    cleaned = "".join((text or "").split())
    if not cleaned:
        raise UsageError(f"--input-shape is empty; expected e.g. {EXAMPLE}")
    entries = [_parse_entry(entry, text) for entry in cleaned.split(",") if entry]
    names = [e[0] for e in entries]
    if any(n is None for n in names) and any(n is not None for n in names):
        raise UsageError(f"--input-shape '{text}': name all inputs or none; expected e.g. {EXAMPLE}")
    if len(set(names)) != len(names) and names[0] is not None:
        raise UsageError(f"--input-shape '{text}': an input is given twice")
    specs = []
    for index, (name, shape, axes, dtype) in enumerate(entries):
        if name is None:
            name = "input" if len(entries) == 1 else f"input_{index}"
        specs.append(InputSpec(name=name, shape=shape, dtype=dtype or "float32", dynamic_axes=axes))
    return tuple(specs)


def parse_batch_axes(values: Sequence[str] | str | None) -> dict[str, int | None]:
    """``--batch-axis NAME=AXIS`` values (repeatable, comma lists allowed; AXIS ``none`` = not batched)."""
    if isinstance(values, str):
        values = [values]
    axes: dict[str, int | None] = {}
    for value in values or ():
        for entry in "".join(value.split()).split(","):
            if not entry:
                continue
            name, sep, axis = entry.partition("=")
            if not sep or not re.fullmatch(_NAME, name) or not (axis.isdigit() or axis == "none"):
                raise UsageError(f"--batch-axis '{entry}' is not NAME=AXIS; e.g. state=1 (or sr=none: not batched)")
            axes[name] = None if axis == "none" else int(axis)
    return axes


def specs_given_names(text: str) -> bool:
    """True when the entries of ``text`` carry explicit input names."""
    return "=" in text


def infer_batch_axes(graph_inputs: Sequence[tuple[str, tuple[int | str | None, ...], str]],
                     declared: Mapping[str, int | None] | None = None) -> dict[str, int | None]:
    """The batch axis of each input (module docstring): declared, else by the batch symbol, else 0."""
    declared = dict(declared or {})
    known = {n for n, _, _ in graph_inputs}
    for name in declared:
        if name not in known:
            raise UsageError(f"a batch axis is declared for '{name}' but the model's inputs are {', '.join(sorted(known))}")
    symbol = next((dims[0] for _, dims, _ in graph_inputs if dims and isinstance(dims[0], str)), None)
    axes: dict[str, int | None] = {}
    for name, dims, _ in graph_inputs:
        if name in declared:
            axis = declared[name]
            if axis is not None and axis >= max(len(dims), 1):
                raise UsageError(f"batch axis {axis} declared for '{name}', which has {len(dims)} dims ({_show(dims)})")
            axes[name] = None if not dims else axis
        elif not dims:
            axes[name] = None
        elif symbol is not None and symbol in dims:
            axes[name] = dims.index(symbol)
        else:
            axes[name] = 0
    return axes


def reconcile_with_graph(graph_inputs: Sequence[tuple[str, tuple[int | str | None, ...], str]],
                         given: Sequence[InputSpec] | None, named: bool,
                         data_shapes: Mapping[str, tuple[int, ...]] | None = None,
                         batch_axes: Mapping[str, int | None] | None = None) -> tuple[InputSpec, ...]:
    """Concrete ``InputSpec``s for an ONNX graph's inputs ``(name, dims, dtype)``.

    Dims in the graph are ints (fixed) or strings/None (dynamic). Given specs must match names, rank,
    fixed dims and dtype. Dynamic dims not given take, in order: the value given for the same symbol
    on another input, 1 on the batch axis, the size in the input's array in ``data_shapes``
    (``--data``); else the user must give them.
    """
    axes_by_name = infer_batch_axes(graph_inputs, batch_axes)
    data_shapes = dict(data_shapes or {})
    given_by_name: dict[str, InputSpec] = {}
    spec: InputSpec | None  # a given spec, then each input's (None when not given)
    if given:
        if not named:
            if len(given) != 1 or len(graph_inputs) != 1:
                names = ", ".join(n for n, _, _ in graph_inputs)
                raise UsageError(f"the model has {len(graph_inputs)} inputs ({names}); name each in --input-shape, "
                                 f"e.g. {graph_inputs[0][0]}=...")
            given_by_name[graph_inputs[0][0]] = given[0]
        else:
            known = {n for n, _, _ in graph_inputs}
            for spec in given:
                if spec.name not in known:
                    raise UsageError(f"--input-shape names input '{spec.name}' but the model's inputs are "
                                     f"{', '.join(sorted(known))}")
                given_by_name[spec.name] = spec
    symbols: dict[str, int] = {}
    for name, dims, _ in graph_inputs:
        spec = given_by_name.get(name)
        if spec is not None and len(spec.shape) == len(dims):
            for dim, value in zip(dims, spec.shape):
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
    result = []
    for name, dims, dtype in graph_inputs:
        spec = given_by_name.get(name)
        dynamic = {axis: (dim if isinstance(dim, str) else f"{name}_dim{axis}")
                   for axis, dim in enumerate(dims) if not isinstance(dim, int)}
        if spec is not None:
            if len(spec.shape) != len(dims):
                raise UsageError(f"--input-shape gives input '{name}' {len(spec.shape)} dims but the model expects "
                                 f"{len(dims)} ({_show(dims)})")
            for axis, (dim, value) in enumerate(zip(dims, spec.shape)):
                if isinstance(dim, int) and dim != value:
                    raise UsageError(f"--input-shape gives input '{name}' axis {axis} = {value} but the model fixes it "
                                     f"at {dim} ({_show(dims)})")
            # float32 is also the default when no dtype is written, so only other dtypes are checked.
            if spec.dtype != "float32" and spec.dtype != dtype:
                raise UsageError(f"--input-shape says input '{name}' is {spec.dtype} but the model expects {dtype}")
            shape = spec.shape
        else:
            batch_axis = axes_by_name[name]
            from_data = data_shapes.get(name)
            if from_data is not None and len(from_data) != len(dims):
                from_data = None  # a rank mismatch is reported by the data check, with the data's origin
            shape_list = []
            for axis, dim in enumerate(dims):
                if isinstance(dim, int):
                    shape_list.append(dim)
                elif isinstance(dim, str) and dim in symbols:
                    shape_list.append(symbols[dim])
                elif axis == batch_axis:
                    shape_list.append(1)
                elif from_data is not None:
                    shape_list.append(int(from_data[axis]))
                else:
                    raise UsageError(f"input '{name}' has dynamic dims ({_show(dims)}); give them with "
                                     f"--input-shape {name}=" + "x".join(
                                         str(d) if isinstance(d, int) else ("1" if a == batch_axis else "N")
                                         for a, d in enumerate(dims)) + " or pass --data with arrays of that shape")
            shape = tuple(shape_list)
        result.append(InputSpec(name=name, shape=tuple(shape), dtype=dtype, dynamic_axes=dynamic,
                                batch_axis=axes_by_name[name]))
    return tuple(result)


def _show(dims: Sequence[int | str | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) if len(dims) else SCALAR


def shapes_by_name(specs: Sequence[InputSpec]) -> Mapping[str, tuple[int, ...]]:
    return {spec.name: spec.shape for spec in specs}
