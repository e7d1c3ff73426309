"""Evaluation, calibration and training data: ``--data`` / ``--train-data``.

Two sources, both materialised as arrays (these sets are small: hundreds to a few thousand samples):
- an ``.npz`` holding one array per model input, keyed by input name (or a single key ``x`` for a
  single-input model), and optionally integer labels ``y``;
- a Python factory ``package.module:function`` returning batches: an iterable of dicts
  (input name -> array), of ``(dict, labels)`` pairs, or of plain arrays / ``(array, labels)`` for a
  single-input model.
Everything is checked against the model's ``InputSpec``s up front and reported as one ``DataError``.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from builder.errors import DataError
from builder.loading.types import InputSpec

log = logging.getLogger(__name__)

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"


@dataclass(frozen=True)
class DataSource:
    """Inputs by name (all with the same leading sample axis) and optional integer labels."""

    inputs: Mapping[str, np.ndarray]
    labels: Optional[np.ndarray]
    origin: str

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def batches(self, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Inputs in order, ``batch_size`` samples at a time (the last batch may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield {name: arr[start:start + batch_size] for name, arr in self.inputs.items()}

    def labelled_batches(self, batch_size: int = 32, shuffle: bool = False,
                         seed: int = 0) -> Iterator[tuple[dict[str, np.ndarray], Optional[np.ndarray]]]:
        """``(inputs, labels or None)`` pairs; shuffled deterministically by ``seed`` when asked."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            labels = self.labels[idx] if self.labels is not None else None
            yield {name: arr[idx] for name, arr in self.inputs.items()}, labels

    def sample(self, count: int = 1) -> dict[str, np.ndarray]:
        """The first ``count`` samples (a latency-measurement input, an export example)."""
        return {name: arr[:count] for name, arr in self.inputs.items()}

    def take(self, count: int) -> "DataSource":
        labels = self.labels[:count] if self.labels is not None else None
        return DataSource({n: a[:count] for n, a in self.inputs.items()}, labels, f"{self.origin}[:{count}]")

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
        names = [spec.name for spec in inputs]
        if len(names) == 1 and names[0] not in arrays and set(arrays) == {SINGLE_INPUT_KEY}:
            arrays = {names[0]: arrays[SINGLE_INPUT_KEY]}
        return DataSource.from_arrays(arrays, labels, inputs, origin=str(path))

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
        arrays = {n: np.concatenate(p, axis=0) for n, p in parts.items()}
        labels = np.concatenate(label_parts) if label_parts else None
        return DataSource.from_arrays(arrays, labels, inputs, origin=spec)

    @staticmethod
    def from_arrays(arrays: Mapping[str, Any], labels: Any, inputs: Sequence[InputSpec],
                    origin: str = "arrays") -> "DataSource":
        """Check names, shapes and dtypes against the model inputs; cast only within a dtype kind."""
        names = [spec.name for spec in inputs]
        missing = [n for n in names if n not in arrays]
        extra = [k for k in arrays if k not in names]
        if missing or extra:
            hint = f" (or a single key '{SINGLE_INPUT_KEY}')" if len(names) == 1 else ""
            raise DataError(f"{origin}: model inputs are {names}{hint} plus optional '{LABEL_KEY}', got keys "
                            f"{sorted(arrays)}; rename the arrays")
        checked: dict[str, np.ndarray] = {}
        count: Optional[int] = None
        for spec in inputs:
            arr = np.asarray(arrays[spec.name])
            checked[spec.name] = _check_array(arr, spec, origin)
            if count is None:
                count = arr.shape[0]
            elif arr.shape[0] != count:
                raise DataError(f"{origin}: input '{spec.name}' has {arr.shape[0]} samples, others {count}; "
                                "give every input the same number of samples")
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
        return DataSource(checked, label_array, origin)


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


def _check_array(arr: np.ndarray, spec: InputSpec, origin: str) -> np.ndarray:
    if arr.ndim != len(spec.shape):
        raise DataError(f"{origin}: input '{spec.name}' has shape {arr.shape}, the model expects "
                        f"{len(spec.shape)} dims like {spec.shape} (first axis = samples)")
    for axis in range(1, arr.ndim):
        if axis not in spec.dynamic_axes and arr.shape[axis] != spec.shape[axis]:
            raise DataError(f"{origin}: input '{spec.name}' has shape {arr.shape}, the model expects "
                            f"{spec.shape} (axis {axis} is fixed); reshape the data or pass --input-shape")
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
