"""A small CNN on scikit-learn's digits (1,797 real 8x8 images): trains to ~97% in a few seconds.

Factories for ``package.module:factory`` loading: ``builder.zoo.digits_cnn:untrained`` and
``builder.zoo.digits_cnn:trained`` (deterministic, seed 0), ``builder.zoo.digits_cnn:student`` (a 5x
smaller, randomly initialised distillation student). Input shape 1x1x8x8 float32.

Full-data digits is saturated (a 5x smaller model reaches ~99% too), so distillation is measured on
``few_labels`` subsets, optionally with ``shifted_copies`` (harder, noisier inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 8, 8)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Stratified, deterministic split of the bundled digits data set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_test, y_test)


def few_labels(x: np.ndarray, y: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class drawn without replacement (the few-label regime in which a
    teacher's soft targets carry information the labels do not)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)]
    idx = np.concatenate(chosen)
    return x[idx], y[idx]


def shifted_copies(x: np.ndarray, y: np.ndarray, copies: int, seed: int, max_shift: int = 1,
                   noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The images plus ``copies`` versions shifted by up to ``max_shift`` pixels (zero-filled, not
    wrapped) with Gaussian pixel noise, clipped to [0, 1]; labels repeated."""
    rng = np.random.default_rng(seed)
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    xs, ys = [x], [y]
    for _ in range(copies):
        dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
        moved = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        moved = moved + rng.normal(0.0, noise, moved.shape) if noise > 0 else moved
        xs.append(np.clip(moved, 0.0, 1.0).astype(np.float32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU blocks; wide enough that channel pruning has real work to remove."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(model: ModuleT, x: np.ndarray, y: np.ndarray, epochs: int = 30, lr: float = 3e-3,
          batch_size: int = 64, seed: int = 0) -> ModuleT:
    """Plain Adam + cross-entropy; deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def untrained(width: int = 32) -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(width=width).eval()


def student(width: int = 14) -> DigitsCNN:
    """A ~5x smaller DigitsCNN (13,114 vs 65,354 parameters), initialised from torch's current seed
    (the distill step seeds it from the run's seed, so two runs with the same seed start alike)."""
    return DigitsCNN(width=width).eval()


def trained(width: int = 32, epochs: int = 30) -> DigitsCNN:
    """Deterministically trained model (seed 0); a few seconds on 2 cores."""
    torch.manual_seed(0)
    split = load_digits_split()
    model = DigitsCNN(width=width)
    return train(model, split.x_train, split.y_train, epochs=epochs)


def write_npz(path: Path, split: DigitsSplit | None = None, part: str = "test") -> Path:
    """Write the inputs (key ``x``) and labels (``y``) of a split, the ``--data`` format."""
    split = split or load_digits_split()
    x, y = (split.x_test, split.y_test) if part == "test" else (split.x_train, split.y_train)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path


def write_onnx(path: Path, model: nn.Module | None = None) -> Path:
    """The trained CNN as an ONNX file (input ``x``, dynamic batch): an ONNX-only model to try the CLI on."""
    import warnings

    model = (model or trained()).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def write_torchscript(path: Path, model: nn.Module | None = None) -> Path:
    """The trained CNN traced to a TorchScript file (``.pt``), the other file format `builder analyze` reads."""
    model = (model or trained()).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(path))
    return path
