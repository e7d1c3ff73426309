"""Unstructured magnitude pruning: sparsity really reached, schedule followed, masks permanent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builder.compression.pruning import PruneStep, polynomial_sparsity
from compression_helpers import accuracy, context, torch_state
from tests.support.models import DIGITS_INPUTS


def test_polynomial_schedule_is_tf_mot_polynomial_decay() -> None:
    kwargs = dict(initial=0.2, final=0.8, begin=10, end=110, power=3.0)
    assert polynomial_sparsity(0, **kwargs) == 0.2
    assert polynomial_sparsity(110, **kwargs) == 0.8
    assert polynomial_sparsity(60, **kwargs) == pytest.approx(0.8 - 0.6 * 0.5 ** 3)
    values = [polynomial_sparsity(s, **kwargs) for s in range(0, 130, 5)]
    assert values == sorted(values)


def test_layerwise_one_shot_reaches_sparsity_in_every_layer(digits_model: torch.nn.Module, tmp_path: Path) -> None:
    state, record = PruneStep(final_sparsity=0.6).apply(torch_state(digits_model, DIGITS_INPUTS), context(tmp_path))
    for name, layer in state.torch_module.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            assert float((layer.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01), name
            assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")  # prune.remove ran
    assert record.facts["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_global_schedule_fine_tunes_to_final_sparsity_and_keeps_accuracy(
        digits_model: torch.nn.Module, digits_train_data, digits_test_data, tmp_path: Path) -> None:
    before = accuracy(digits_model, digits_test_data)
    step = PruneStep(scope="global", initial_sparsity=0.3, final_sparsity=0.8, epochs=3, frequency=5)
    state, record = step.apply(torch_state(digits_model, DIGITS_INPUTS),
                               context(tmp_path, train=digits_train_data, teacher=digits_model))
    assert record.facts["sparsity"] == pytest.approx(0.8, abs=0.005)
    assert record.facts["schedule"]["updates"] >= 5  # the polynomial schedule really stepped
    per_layer = record.facts["layer_sparsity"]
    assert max(per_layer.values()) - min(per_layer.values()) > 0.1  # global: layers differ
    assert accuracy(state.torch_module, digits_test_data) >= before - 0.03
