"""How one output is compared with its reference: the rule the builder's verification (every target,
``builder.targets.base.compare_outputs``) and the agent's install-time health check
(``agent.install.health_check``) share, so a model the host accepted is judged the same on the device.

Numpy only (imported lazily, as everywhere in the agent). Conventions:

* values are compared in float64; ``max_abs_diff`` ignores NaN (``finite`` says whether any was
  there), both differences are 0 for empty arrays;
* ``within``: every ``|got - ref| <= atol + rtol * |ref|`` (``numpy.allclose``'s rule);
* ``cosine`` of the flattened arrays; two all-zero arrays are 1.0, and an all-zero array against a
  non-zero one is 1.0 only when they differ by at most 1e-6 everywhere (an empty detection map
  matches only a near-empty one), else 0.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ZERO_MATCH_ATOL = 1e-6


@dataclass(frozen=True)
class ArrayComparison:
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    within: bool  # |got - ref| <= atol + rtol * |ref| everywhere
    finite: bool  # got has no NaN or infinity


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (see the module docstring for all-zero arrays)."""
    import numpy as np

    a64, b64 = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 1.0 if float(np.max(np.abs(a64 - b64))) <= ZERO_MATCH_ATOL else 0.0
    return float(np.dot(a64, b64) / (na * nb))


def compare_arrays(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> ArrayComparison:
    """``got`` against ``ref`` (same number of elements; ``got`` is read in ``ref``'s shape)."""
    import numpy as np

    ref64 = np.asarray(ref, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64).reshape(ref64.shape)
    diff = np.abs(got64 - ref64)
    with np.errstate(invalid="ignore"):  # an infinite rtol times a zero reference (int8/fp16 tolerances)
        within = bool(np.all(diff <= atol + rtol * np.abs(ref64)))
    return ArrayComparison(
        max_abs_diff=float(np.nanmax(diff)) if diff.size else 0.0,
        mean_abs_diff=float(np.mean(diff)) if diff.size else 0.0,
        cosine=cosine(got64, ref64),
        within=within,
        finite=bool(np.all(np.isfinite(got64))),
    )
