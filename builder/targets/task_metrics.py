"""What a model's output *means*, and the metric that says whether a changed model still does it.

Pure functions over numpy arrays, shared by build verification (``targets.base.compare_outputs``)
and compression's evaluation (``compression.evaluate``), so both judge a model the same way.

Task kinds (``--task`` on build/compress, else detected from one sample's output, batch axis dropped):

=========== ===================================================== =====================================
task        detected when (first match)                           score in [0, 1] (1 = unchanged)
=========== ===================================================== =====================================
classify    the data has labels; or a vector that is not unit-norm top-1 agreement (argmax per sample)
regression  a single value per sample                              1 - relative L2 error
embed       a unit-norm vector; or a (T, C) array whose rows are   nearest-neighbour agreement between
            not probability rows (token embeddings)                samples (NaN under 10 samples)
sequence    a (T, C) array of probability rows (softmax per step:   per-step argmax agreement
            an OCR recogniser)
dense_map   3 or more dims (C, H, W): probability / segmentation   map IoU: masks at 0.5 (probabilities)
            / feature maps (a text detector)                       or 0 (logits) for one channel; mean
                                                                   IoU of the argmax class map for several
=========== ===================================================== =====================================

A nearest-neighbour metric means nothing on probability maps (the detector's ``fidelity_collapse``
of issue 12): maps are judged by IoU.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TASKS = ("classify", "embed", "dense_map", "sequence", "regression")
ALIASES = {"classifier": "classify", "embedding": "embed", "dense": "dense_map", "map": "dense_map",
           "segmentation": "dense_map", "detector": "dense_map", "seq": "sequence"}
METRIC_NAMES = {"classify": "top-1", "embed": "NN", "dense_map": "map IoU", "sequence": "seq argmax",
                "regression": "1-rel.err"}


def normalise_task(name: str | None) -> str | None:
    """A ``--task`` value in the one vocabulary (``auto``/None -> None: detect); ValueError if unknown."""
    if name is None or name == "auto":
        return None
    task = ALIASES.get(name, name)
    if task not in TASKS:
        raise ValueError(f"unknown task '{name}'; use auto or one of {', '.join(TASKS)}")
    return task


def _is_probability_rows(a: np.ndarray) -> bool:
    return bool(a.size and np.all(a >= -1e-4) and np.all(a <= 1 + 1e-4)
                and np.allclose(a.sum(axis=-1), 1.0, atol=1e-2))


def detect_task(sample_output: np.ndarray, has_labels: bool = False) -> str:
    """The task of one sample's output (its batch axis already dropped); see the module table."""
    a = np.asarray(sample_output, dtype=np.float64)
    if has_labels:
        return "classify"
    while a.ndim > 1 and a.shape[0] == 1 and a.ndim != 3:  # (1, C) -> (C,); keep (1, H, W) maps
        a = a[0]
    if a.size <= 1:
        return "regression"
    if a.ndim == 1:
        # a softmax row first: a confident 2-class [0.999, 0.001] also has norm ~1 (PP-OCR's direction
        # classifier was judged as an embedding, by nearest-neighbour agreement, and "collapsed")
        if _is_probability_rows(a):
            return "classify"
        return "embed" if np.isclose(np.linalg.norm(a), 1.0, atol=1e-3) else "classify"
    if a.ndim == 2:
        return "sequence" if _is_probability_rows(a) else "embed"
    return "dense_map"


def _flat(samples: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(s, dtype=np.float64).ravel() for s in samples])


def top1_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    return float(np.mean([int(np.argmax(r)) == int(np.argmax(c)) for r, c in zip(reference, candidate)]))


# Under this many samples one changed neighbour already drops the score below the 0.9 floor, so the
# metric says nothing (a 4-sample MiniLM build read NN 0.5 at cosine 0.98): NaN, and cosine decides.
MIN_NN_SAMPLES = 10


def nearest_neighbour_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Is each sample's nearest other sample (cosine) still the same one; NaN under MIN_NN_SAMPLES."""
    if len(reference) < MIN_NN_SAMPLES:
        return float("nan")

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return float(np.mean(neighbours(_flat(reference)) == neighbours(_flat(candidate))))


def sequence_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Per-step argmax agreement over every step of every sample (last axis = classes)."""
    hits = total = 0
    for r, c in zip(reference, candidate):
        r_ids = np.asarray(r).reshape(-1, np.asarray(r).shape[-1]).argmax(-1)
        c_ids = np.asarray(c).reshape(-1, np.asarray(c).shape[-1]).argmax(-1)
        hits += int(np.sum(r_ids == c_ids))
        total += r_ids.size
    return float(hits / total) if total else 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def map_iou(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """IoU pooled over all samples: one channel is thresholded (0.5 for probabilities, 0 for logits);
    several channels become an argmax class map, scored as the mean IoU over the classes present."""
    ref = [np.asarray(r, dtype=np.float64) for r in reference]
    got = [np.asarray(c, dtype=np.float64) for c in candidate]
    first = ref[0]
    while first.ndim > 2 and first.shape[0] == 1:
        ref, got, first = [r[0] for r in ref], [g[0] for g in got], ref[0][0]
    if first.ndim >= 3:  # (C, H, W): class map
        r_ids = np.concatenate([r.argmax(0).ravel() for r in ref])
        g_ids = np.concatenate([g.argmax(0).ravel() for g in got])
        classes = np.union1d(np.unique(r_ids), np.unique(g_ids))
        return float(np.mean([_iou(r_ids == k, g_ids == k) for k in classes]))
    r_all = np.concatenate([r.ravel() for r in ref])
    g_all = np.concatenate([g.ravel() for g in got])
    threshold = 0.5 if r_all.min() >= 0.0 and r_all.max() <= 1.0 else 0.0
    return _iou(r_all > threshold, g_all > threshold)


def relative_error_score(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """1 - ||candidate - reference|| / ||reference|| over all samples (clipped at 0)."""
    r, c = _flat(reference), _flat(candidate)
    denom = max(float(np.linalg.norm(r)), 1e-12)
    return float(max(0.0, 1.0 - float(np.linalg.norm(c - r)) / denom))


SCORES = {"classify": top1_agreement, "embed": nearest_neighbour_agreement, "dense_map": map_iou,
          "sequence": sequence_agreement, "regression": relative_error_score}


def task_score(task: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The task's score of ``candidate`` against ``reference`` (one array per sample, same order)."""
    return SCORES[task](reference, candidate)
