"""Small helpers for compression tests: a StepContext over real data, a state from a module."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Optional

from builder.compression.base import ModelState, StepContext
from builder.compression.data import DataSource
from builder.loading.types import InputSpec


def context(workdir: Path, train: Optional[DataSource] = None, teacher: Any = None, task: str = "classify",
            calibration: Optional[DataSource] = None) -> StepContext:
    epochs = itertools.count()
    train_batches = (lambda: train.labelled_batches(64, shuffle=True, seed=next(epochs))) if train else None
    cal = (lambda: calibration.batches(32)) if calibration else None
    teacher_copy = copy.deepcopy(teacher).eval() if teacher is not None else None
    return StepContext(workdir=workdir, calibration_batches=cal, train_batches=train_batches,
                       labels_available=bool(train and train.has_labels), teacher=teacher_copy, task=task)


def torch_state(module: Any, inputs: tuple[InputSpec, ...]) -> ModelState:
    return ModelState(inputs=inputs, output_names=("output",), torch_module=module)


def accuracy(module: Any, data: DataSource) -> float:
    import torch

    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(next(iter(data.inputs.values())))
        pred = module(x).argmax(dim=1).numpy()
    return float((pred == data.labels).mean())
