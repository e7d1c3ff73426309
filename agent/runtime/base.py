"""The one interface every runtime backend implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy dtype name


class ModelRuntime(Protocol):
    """A loaded model. ``run`` takes numpy arrays by input name and returns outputs by name."""

    backend: str  # e.g. "onnxruntime[CPUExecutionProvider]"

    @property
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def concrete_shape(shape: tuple[int | str | None, ...], default_dim: int = 1) -> tuple[int, ...]:
    """Replace dynamic dimensions with ``default_dim`` (benchmarks on synthetic inputs)."""
    return tuple(d if isinstance(d, int) and d > 0 else default_dim for d in shape)


def synthetic_feeds(inputs: tuple[TensorInfo, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs of the right shape and dtype (integers small: token ids, masks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for info in inputs:
        shape = concrete_shape(info.shape)
        dtype = np.dtype(info.dtype)
        if np.issubdtype(dtype, np.integer):
            feeds[info.name] = rng.integers(0, 2, size=shape).astype(dtype) if "mask" in info.name else rng.integers(0, 100, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[info.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
    return feeds
