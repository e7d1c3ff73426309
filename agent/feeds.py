"""Turn an application's JSON inputs into the feeds the active runtime expects, or say why not.

A LiteRT artifact's runtime feeds by *tensor* names (``serving_default_input_ids``) while the
application knows the model's own names (``input_ids``); the manifest links them in
``target.runtime_options.signature.inputs`` ({tensor name: signature name}). Either name is
accepted. Everything the runtime would reject (unknown or missing input, wrong rank or fixed
dimension, a value that cannot be cast without changing its kind) is caught here as a
:class:`RequestError`, so a bad request is a 400 and never an inference failure of the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from agent.errors import RequestError
from agent.runtime.base import TensorInfo

if TYPE_CHECKING:  # numpy is imported on first use: `agent --help` stays fast
    import numpy as np


def input_aliases(runtime_inputs: tuple[TensorInfo, ...], runtime_options: Mapping[str, Any]) -> dict[str, str]:
    """Every accepted request name -> the runtime's input name (the runtime's own names map to themselves).

    The manifest's mapping is read both ways, so it works whether the runtime's names are the
    tensor names or the signature names."""
    signature = runtime_options.get("signature") if isinstance(runtime_options, Mapping) else None
    mapping = signature.get("inputs") if isinstance(signature, Mapping) else None
    own = {info.name for info in runtime_inputs}
    aliases = {name: name for name in own}
    if isinstance(mapping, Mapping):
        for tensor, sig_name in mapping.items():
            tensor, sig_name = str(tensor), str(sig_name)
            if tensor in own and sig_name not in own:
                aliases.setdefault(sig_name, tensor)
            elif sig_name in own and tensor not in own:
                aliases.setdefault(tensor, sig_name)
    return aliases


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int | str | None, ...]) -> None:
    fixed_ok = all(not isinstance(e, int) or e <= 0 or e == s for s, e in zip(shape, expected))
    if len(shape) != len(expected) or not fixed_ok:
        want = "[" + ", ".join(str(e) if isinstance(e, int) and e > 0 else "any" for e in expected) + "]"
        raise RequestError(f"input '{name}' has shape {list(shape)}, the model expects {want}")


def _as_array(name: str, value: Any, dtype_name: str) -> np.ndarray:
    import numpy as np

    try:
        raw = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise RequestError(f"input '{name}' is not a rectangular array of numbers: {exc}") from exc
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        return raw  # a type numpy does not know: leave it to the runtime
    # JSON gives int64/float64/bool; "same_kind" allows int64 -> int32 and float64 -> float32 but not
    # 1.5 -> int (silent truncation) or a string -> number.
    if raw.dtype == object or not np.can_cast(raw.dtype, dtype, casting="same_kind"):
        raise RequestError(f"input '{name}' has {raw.dtype.name} values, the model expects {dtype.name}")
    return raw.astype(dtype, copy=False)


def prepare_feeds(inputs: Any, runtime_inputs: tuple[TensorInfo, ...],
                  runtime_options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The request's ``inputs`` object -> {runtime input name: array}; raises RequestError naming the fix."""
    if not isinstance(inputs, Mapping):
        raise RequestError('send a JSON body {"inputs": {"<input name>": nested lists}}')
    aliases = input_aliases(runtime_inputs, runtime_options)
    accepted = ", ".join(sorted(aliases))
    infos = {info.name: info for info in runtime_inputs}
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        target = aliases.get(name)
        if target is None:
            raise RequestError(f"unknown input '{name}'; the model takes {accepted}")
        if target in feeds:
            raise RequestError(f"input '{name}' given twice (under two names); send it once")
        info = infos[target]
        array = _as_array(name, value, info.dtype)
        _check_shape(name, tuple(int(d) for d in array.shape), info.shape)
        feeds[target] = array
    missing = [n for n in infos if n not in feeds]
    if missing:
        names = ", ".join(_display(n, aliases) for n in missing)
        raise RequestError(f"missing input {names}; the model takes {accepted}")
    return feeds


def _display(runtime_name: str, aliases: Mapping[str, str]) -> str:
    others = [a for a, t in aliases.items() if t == runtime_name and a != runtime_name]
    return f"'{runtime_name}'" + (f" (or '{others[0]}')" if others else "")
