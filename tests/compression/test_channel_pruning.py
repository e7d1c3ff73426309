"""Structured channel pruning: channels physically removed, MACs down by at least the ratio, accuracy kept."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch

from builder.compression._export import export_module
from builder.compression.channel_pruning import ChannelPruneStep
from builder.compression.evaluate import model_macs
from compression_helpers import accuracy, context, torch_state
from tests.support.models import DIGITS_INPUTS


def test_channels_removed_macs_halved_accuracy_within_budget(
        digits_model: torch.nn.Module, digits_train_data, digits_test_data, tmp_path: Path) -> None:
    before_acc = accuracy(digits_model, digits_test_data)
    export_module(digits_model, DIGITS_INPUTS, tmp_path / "before.onnx")
    step = ChannelPruneStep(ratio=0.5, epochs=4)
    state, record = step.apply(torch_state(digits_model, DIGITS_INPUTS),
                               context(tmp_path, train=digits_train_data, teacher=digits_model))
    module = state.torch_module
    assert module.features[0].out_channels == 16 and module.features[3].out_channels == 32
    assert module.features[4].num_features == 32  # BatchNorm followed its conv
    assert module.classifier[3].out_features == 10  # the classifier keeps its outputs
    assert record.facts["macs_after"] <= 0.5 * record.facts["macs_before"]
    export_module(module, DIGITS_INPUTS, tmp_path / "after.onnx")
    macs_before = model_macs(onnx.load(str(tmp_path / "before.onnx")), DIGITS_INPUTS)
    macs_after = model_macs(onnx.load(str(tmp_path / "after.onnx")), DIGITS_INPUTS)
    assert macs_after <= 0.5 * macs_before
    assert accuracy(module, digits_test_data) >= before_acc - 0.02


def test_transformer_feed_forward_channels_pruned_and_model_still_runs(tmp_path: Path) -> None:
    from builder.loading.types import InputSpec
    from builder.zoo.tiny_transformer import untrained

    model = untrained()
    inputs = (InputSpec("x", (1, 16, 64)),)
    state, record = ChannelPruneStep(ratio=0.5, epochs=0).apply(torch_state(model, inputs), context(tmp_path))
    layer = state.torch_module.encoder.layers[0]
    assert layer.linear1.out_features == 64  # 128 -> 64 hidden units
    assert record.facts["macs_after"] < record.facts["macs_before"]
    with torch.no_grad():
        assert state.torch_module(torch.randn(2, 16, 64)).shape == (2, 5)
    export_module(state.torch_module, inputs, tmp_path / "t.onnx")
