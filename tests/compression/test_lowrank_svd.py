"""Low-rank factorisation: rank by retained energy, only where it saves parameters, outputs kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from builder.compression.lowrank import LowRankStep, rank_for_energy
from builder.errors import UsageError
from builder.loading.types import InputSpec
from compression_helpers import context, torch_state


def test_rank_for_energy_counts_squared_singular_values() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 0.6) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3


def test_low_rank_layers_are_split_and_outputs_preserved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    with torch.no_grad():  # a rank-4 first layer plus a little noise
        model[0].weight.copy_(torch.randn(96, 4) @ torch.randn(4, 64) + 1e-3 * torch.randn(96, 64))
    x = torch.randn(32, 64)
    with torch.no_grad():
        before = model(x)
    inputs = (InputSpec("x", (1, 64)),)
    state, record = LowRankStep(energy=0.999, include=("0",)).apply(torch_state(model, inputs), context(tmp_path))
    factored = record.facts["factored"]["0"]
    assert factored["rank"] == 4
    first, second = state.torch_module[0]
    assert (first.in_features, first.out_features, second.out_features) == (64, 4, 96)
    with torch.no_grad():
        assert torch.allclose(state.torch_module(x), before, atol=1e-2)


def test_full_rank_layers_are_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    with pytest.raises(UsageError, match="no Linear/1x1 Conv layer gets smaller"):
        LowRankStep(energy=0.999).apply(torch_state(model, (InputSpec("x", (1, 8)),)), context(tmp_path))
