"""Evaluation, calibration and training data: ``--data`` / ``--train-data``.

Two sources, both materialised as arrays (these sets are small: hundreds to a few thousand samples):
- an ``.npz`` holding one array per model input, keyed by input name (or a single key ``x`` for a
  single-input model), and optionally integer labels ``y``;
- a Python factory ``package.module:function`` returning batches: an iterable of dicts
  (input name -> array), of ``(dict, labels)`` pairs, or of plain arrays / ``(array, labels)`` for a
  single-input model.
Everything is checked against the model's ``InputSpec``s up front and reported as one ``DataError``.

Samples are stacked on each input's batch axis (``InputSpec.batch_axis``): axis 0 for most inputs,
axis 1 for a state shaped (layers, batch, hidden). An input that is not batched (a 0-d sample rate)
holds its one value, shared by every sample (an array of N equal values is taken as that value).
An ``.npz`` may declare batch axes itself in the optional key ``__batch_axes__``: a 0-d string
array holding a JSON object, e.g. ``np.array(json.dumps({"state": 1, "sr": None}))`` (None = not
batched). ``--batch-axis NAME=AXIS`` says the same on the command line.
"""
from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from builder.errors import DataError
from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"
BATCH_AXES_KEY = "__batch_axes__"


def take_along_batch(arr: np.ndarray, axis: Optional[int], index: Any) -> np.ndarray:
    """Samples ``index`` (a slice or index array) of ``arr`` along its batch ``axis``; the whole
    array when the input is not batched."""
    if axis is None:
        return arr
    selector = [slice(None)] * arr.ndim
    selector[axis] = index
    return arr[tuple(selector)]


def data_layout(text: Optional[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, Optional[int]]]:
    """(array shapes by key, declared batch axes) of a ``--data`` ``.npz``, read before the model is
    loaded so its dynamic dims can come from the data; empty for a factory or no data."""
    if not text or not (str(text).endswith(".npz") and Path(text).is_file()):
        return {}, {}
    try:
        with np.load(Path(text), allow_pickle=False) as archive:
            shapes = {key: tuple(int(d) for d in archive[key].shape) for key in archive.files
                      if key not in (LABEL_KEY, BATCH_AXES_KEY)}
            declared = _declared_axes(archive[BATCH_AXES_KEY], str(text)) if BATCH_AXES_KEY in archive.files else {}
    except DataError:
        raise
    except Exception as exc:  # zipfile/format errors all mean "not a usable npz"
        raise DataError(f"cannot read {text} as .npz ({exc}); write it with numpy.savez") from exc
    return shapes, declared


def _declared_axes(value: np.ndarray, origin: str) -> dict[str, Optional[int]]:
    try:
        declared = json.loads(str(np.asarray(value).item()))
        if not isinstance(declared, dict) or not all(v is None or (isinstance(v, int) and v >= 0)
                                                     for v in declared.values()):
            raise ValueError("not an object of input name -> axis or null")
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: '{BATCH_AXES_KEY}' must be a JSON string like '{{\"state\": 1, \"sr\": null}}' "
                        f"({exc})") from exc
    return {str(k): v for k, v in declared.items()}


@dataclass(frozen=True)
class DataSource:
    """Inputs by name (samples on each input's batch axis, see module doc) and optional integer labels."""

    inputs: Mapping[str, np.ndarray]
    labels: Optional[np.ndarray]
    origin: str
    batch_axes: Mapping[str, Optional[int]] = field(default_factory=dict)  # missing name -> axis 0

    def axis(self, name: str) -> Optional[int]:
        return self.batch_axes.get(name, 0)

    def __len__(self) -> int:
        for name, arr in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(arr.shape[axis])
        return 1  # only unbatched inputs: one sample

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def _select(self, index: Any) -> dict[str, np.ndarray]:
        return {name: take_along_batch(arr, self.axis(name), index) for name, arr in self.inputs.items()}

    def batches(self, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Inputs in order, ``batch_size`` samples at a time (the last batch may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self._select(slice(start, start + batch_size))

    def labelled_batches(self, batch_size: int = 32, shuffle: bool = False,
                         seed: int = 0) -> Iterator[tuple[dict[str, np.ndarray], Optional[np.ndarray]]]:
        """``(inputs, labels or None)`` pairs; shuffled deterministically by ``seed`` when asked."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            labels = self.labels[idx] if self.labels is not None else None
            yield self._select(idx), labels

    def sample(self, count: int = 1) -> dict[str, np.ndarray]:
        """The first ``count`` samples (a latency-measurement input, an export example)."""
        return self._select(slice(0, count))

    def per_sample(self, limit: Optional[int] = None) -> list[dict[str, np.ndarray]]:
        """One feed per sample (batch 1 on every batch axis), the first ``limit`` of them."""
        count = len(self) if limit is None else min(limit, len(self))
        return [self._select(slice(i, i + 1)) for i in range(count)]

    def take(self, count: int) -> "DataSource":
        labels = self.labels[:count] if self.labels is not None else None
        return DataSource(self._select(slice(0, count)), labels, f"{self.origin}[:{count}]", dict(self.batch_axes))

    @staticmethod
    def from_arg(text: str, inputs: Sequence[InputSpec]) -> "DataSource":
        """Parse a ``--data`` value: an ``.npz`` path or ``package.module:function``."""
        path = Path(text)
        if path.suffix == ".npz" or path.exists():
            return DataSource.from_npz(path, inputs)
        if ":" in text:
            return DataSource.from_factory(text, inputs)
        raise DataError(f"data '{text}' is neither an existing .npz file nor a 'package.module:function' factory; "
                        "pass one of those")

    @staticmethod
    def from_npz(path: Path, inputs: Sequence[InputSpec]) -> "DataSource":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist; pass an .npz with the model's inputs")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except Exception as exc:  # zipfile/pickle/format errors all mean "not a usable npz"
            raise DataError(f"cannot read {path} as .npz ({exc}); write it with numpy.savez") from exc
        labels = arrays.pop(LABEL_KEY, None)
        declared = _declared_axes(arrays.pop(BATCH_AXES_KEY), str(path)) if BATCH_AXES_KEY in arrays else None
        names = [spec.name for spec in inputs]
        if len(names) == 1 and names[0] not in arrays and set(arrays) == {SINGLE_INPUT_KEY}:
            arrays = {names[0]: arrays[SINGLE_INPUT_KEY]}
        return DataSource.from_arrays(arrays, labels, inputs, origin=str(path), batch_axes=declared)

    @staticmethod
    def from_factory(spec: str, inputs: Sequence[InputSpec]) -> "DataSource":
        module_name, _, func_name = spec.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise DataError(f"cannot import data factory '{spec}' ({exc}); use 'package.module:function'") from exc
        try:
            produced = func()
        except Exception as exc:  # user code: report it as bad data, keep the cause
            raise DataError(f"data factory '{spec}' failed: {exc}") from exc
        names = [s.name for s in inputs]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        label_parts: list[np.ndarray] = []
        for batch in produced:
            batch_inputs, batch_labels = _split_batch(batch, names, spec)
            for name in names:
                if name not in batch_inputs:
                    raise DataError(f"data factory '{spec}' yielded a batch without input '{name}'; "
                                    f"yield dicts keyed by {names}")
                parts[name].append(np.asarray(batch_inputs[name]))
            if batch_labels is not None:
                label_parts.append(np.asarray(batch_labels).reshape(-1))
        if not parts[names[0]]:
            raise DataError(f"data factory '{spec}' yielded no batches")
        if label_parts and len(label_parts) != len(parts[names[0]]):
            raise DataError(f"data factory '{spec}' gave labels for some batches only; give them for all or none")
        arrays = {s.name: (parts[s.name][0] if s.batch_axis is None else np.concatenate(parts[s.name], axis=s.batch_axis))
                  for s in inputs}
        labels = np.concatenate(label_parts) if label_parts else None
        return DataSource.from_arrays(arrays, labels, inputs, origin=spec)

    @staticmethod
    def from_arrays(arrays: Mapping[str, Any], labels: Any, inputs: Sequence[InputSpec],
                    origin: str = "arrays", batch_axes: Optional[Mapping[str, Optional[int]]] = None) -> "DataSource":
        """Check names, shapes and dtypes against the model inputs; cast only within a dtype kind.
        ``batch_axes`` (declared by the data) override the inputs' own ``batch_axis``."""
        names = [spec.name for spec in inputs]
        unknown = sorted(set(batch_axes or {}) - set(names))
        if unknown:
            raise DataError(f"{origin}: '{BATCH_AXES_KEY}' names '{unknown[0]}', not a model input ({names})")
        axes = {spec.name: (batch_axes or {}).get(spec.name, spec.batch_axis) for spec in inputs}
        missing = [n for n in names if n not in arrays]
        extra = [k for k in arrays if k not in names]
        if missing or extra:
            hint = f" (or a single key '{SINGLE_INPUT_KEY}')" if len(names) == 1 else ""
            raise DataError(f"{origin}: model inputs are {names}{hint} plus optional '{LABEL_KEY}', got keys "
                            f"{sorted(arrays)}; rename the arrays")
        checked: dict[str, np.ndarray] = {}
        count: Optional[int] = None
        for spec in inputs:
            axis = axes[spec.name]
            arr = _unbatched(np.asarray(arrays[spec.name]), spec, origin) if axis is None else np.asarray(arrays[spec.name])
            checked[spec.name] = _check_array(arr, spec, axis, origin)
            if axis is None:
                continue
            if count is None:
                count = arr.shape[axis]
            elif arr.shape[axis] != count:
                raise DataError(f"{origin}: input '{spec.name}' has {arr.shape[axis]} samples (axis {axis}), others "
                                f"{count}; give every input the same number of samples, or declare the axis it is batched on "
                                f"(--batch-axis {spec.name}=AXIS or '{BATCH_AXES_KEY}' in the .npz)")
        count = 1 if count is None else count  # only unbatched inputs: one sample
        label_array = None
        if labels is not None:
            label_array = np.asarray(labels)
            if label_array.ndim == 2 and label_array.shape[1] == 1:  # (N, 1) column vectors are common
                label_array = label_array.reshape(-1)
            if label_array.ndim != 1 or label_array.shape[0] != count:
                raise DataError(f"{origin}: labels '{LABEL_KEY}' must be a 1-D array of {count} class ids, "
                                f"got shape {label_array.shape}")
            if not np.issubdtype(label_array.dtype, np.integer):
                raise DataError(f"{origin}: labels '{LABEL_KEY}' must be integer class ids, got {label_array.dtype}")
            label_array = label_array.astype(np.int64)
        if not count:
            raise DataError(f"{origin}: no samples")
        return DataSource(checked, label_array, origin, axes)


def _split_batch(batch: Any, names: list[str], spec: str) -> tuple[Mapping[str, Any], Any]:
    labels = None
    if isinstance(batch, tuple) and len(batch) == 2:
        batch, labels = batch
    if isinstance(batch, Mapping):
        return batch, labels
    if len(names) == 1:
        return {names[0]: batch}, labels
    raise DataError(f"data factory '{spec}' must yield dicts keyed by input name for a multi-input model "
                    f"({names})")


def _unbatched(arr: np.ndarray, spec: InputSpec, origin: str) -> np.ndarray:
    """An unbatched input's one value; N equal values stacked on a leading axis are accepted too."""
    if arr.ndim == len(spec.shape) + 1 and arr.shape[0] >= 1:
        if not np.all(arr == arr[:1]):
            raise DataError(f"{origin}: input '{spec.name}' is not batched (shape {spec.shape or 'scalar'}), but the data "
                            f"holds {arr.shape[0]} different values; give one value for all samples")
        return np.asarray(arr[0])
    return arr


def _check_array(arr: np.ndarray, spec: InputSpec, batch_axis: Optional[int], origin: str) -> np.ndarray:
    where = "not batched" if batch_axis is None else f"samples on axis {batch_axis}"
    if arr.ndim != len(spec.shape):
        raise DataError(f"{origin}: input '{spec.name}' has shape {arr.shape}, the model expects "
                        f"{len(spec.shape)} dims like {spec.shape} ({where}; declare another batch axis with "
                        f"--batch-axis {spec.name}=AXIS or '{BATCH_AXES_KEY}' in the .npz)")
    for axis in range(arr.ndim):
        if axis != batch_axis and axis not in spec.dynamic_axes and arr.shape[axis] != spec.shape[axis]:
            raise DataError(f"{origin}: input '{spec.name}' has shape {arr.shape}, the model expects "
                            f"{spec.shape} ({where}; axis {axis} is fixed); reshape the data or pass --input-shape")
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    # within one kind (float64 -> float32, int32 -> int64) the cast is safe enough: do it, and say so;
    # across kinds (ints for a float input, floats for token ids) the data is probably the wrong array
    if want.kind == arr.dtype.kind or (want.kind in "iu" and arr.dtype.kind in "iu"):
        log.warning("warning: %s: input '%s' is %s, cast to the model's %s", origin, spec.name, arr.dtype, spec.dtype)
        return arr.astype(want)
    raise DataError(f"{origin}: input '{spec.name}' is {arr.dtype}, the model expects {spec.dtype}; "
                    f"convert the array (e.g. arr.astype(np.{spec.dtype}), scaled as the model was trained)")


def load_model_with_data(source: str, input_shapes: Any, data: Optional[str], *,
                         batch_axes: Optional[Mapping[str, Optional[int]]] = None, workdir: Optional[Path] = None,
                         opset: Optional[int] = None) -> Any:
    """``load_model`` where the dims ``--input-shape`` leaves open come from the ``--data`` ``.npz``
    (arrays of the exact shapes need no ``--input-shape``), with the batch axes the ``.npz``
    declares, updated by ``--batch-axis`` (``batch_axes``). The data's first sample also feeds the
    load-time normalisation check, so a value that selects an ``If`` branch (a 0-d ``sr``) is used."""
    from builder.loading import load_model

    shapes, declared = data_layout(data)
    declared.update(batch_axes or {})
    values = first_sample_values(data, declared) if shapes else None
    return load_model(source, input_shapes, workdir=workdir, opset=opset, data_shapes=shapes, batch_axes=declared,
                      input_values=values)


def first_sample_values(text: Optional[str], batch_axes: Mapping[str, Optional[int]]) -> dict[str, np.ndarray]:
    """Input values by name from a ``.npz``: 0-d and unbatched arrays whole, others their first sample
    along their batch axis (0 unless declared), kept as a batch of one (also `analyze --data`)."""
    if not text:
        return {}
    try:
        with np.load(Path(text), allow_pickle=False) as archive:
            values = {}
            for key in archive.files:
                if key in (LABEL_KEY, BATCH_AXES_KEY):
                    continue
                arr = archive[key]
                axis = batch_axes.get(key, 0) if arr.ndim else None
                values[key] = arr if axis is None else take_along_batch(arr, axis, slice(0, 1))
            return values
    except Exception as exc:  # zipfile/format errors all mean "not a usable npz"
        raise DataError(f"cannot read {text} as .npz ({exc}); write it with numpy.savez") from exc
