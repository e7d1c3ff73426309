"""Weight clustering: at most k values per layer, a much smaller download, tied layers share one tensor."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from builder.compression._export import export_module
from builder.compression.clustering import ClusterStep
from builder.artifacts.download import download_size
from builder.loading.types import InputSpec
from compression_helpers import accuracy, context, torch_state
from tests.support.models import DIGITS_INPUTS


def test_clusters_bound_unique_values_and_shrink_download(
        digits_model: torch.nn.Module, digits_train_data, digits_test_data, tmp_path: Path) -> None:
    export_module(digits_model, DIGITS_INPUTS, tmp_path / "dense.onnx")
    before_acc = accuracy(digits_model, digits_test_data)
    state, record = ClusterStep(clusters=8, epochs=1).apply(
        torch_state(digits_model, DIGITS_INPUTS), context(tmp_path, train=digits_train_data))
    for name, layer in state.torch_module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.numel() >= 64:
            assert torch.unique(layer.weight).numel() <= 8, name
    assert record.facts["max_unique_values"] <= 8
    assert not any("parametrizations" in n for n, _ in state.torch_module.named_parameters())
    export_module(state.torch_module, DIGITS_INPUTS, tmp_path / "clustered.onnx")
    assert download_size(tmp_path / "clustered.onnx") < 0.4 * download_size(tmp_path / "dense.onnx")
    assert accuracy(state.torch_module, digits_test_data) >= before_acc - 0.03


def test_tied_layers_share_one_weight_in_the_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    inputs = (InputSpec("x", (1, 32)),)
    state, record = ClusterStep(clusters=4, tie=[["0", "2"]]).apply(torch_state(model, inputs), context(tmp_path))
    module = state.torch_module
    assert module[0].weight is module[2].weight
    assert torch.unique(module[0].weight).numel() <= 4
    assert record.facts["tied"] == [["0", "2"]]
    export_module(module, inputs, tmp_path / "tied.onnx")
    weights = [i for i in onnx.load(str(tmp_path / "tied.onnx")).graph.initializer if len(i.dims) == 2]
    assert len(weights) == 1


def test_clustering_after_pruning_keeps_the_zeros(digits_model: torch.nn.Module, tmp_path: Path) -> None:
    from builder.compression.pruning import PruneStep

    state, _ = PruneStep(final_sparsity=0.6).apply(torch_state(digits_model, DIGITS_INPUTS), context(tmp_path))
    state, record = ClusterStep(clusters=8).apply(state, context(tmp_path))
    for name, layer in state.torch_module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.numel() >= 64:
            assert float((layer.weight == 0).float().mean()) >= 0.59, name
            assert torch.unique(layer.weight).numel() <= 8, name  # 7 shared values + the zero
    assert record.facts["sparsity_preserved"]
