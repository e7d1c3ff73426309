"""Magnitude pruning of ONNX initializers (ONNX-only models): sparsity reached, model still runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.compression._export import export_module
from builder.compression.base import ModelState
from builder.compression.evaluate import output_fidelity
from builder.execution.sessions import run_onnx
from builder.compression.onnx_pruning import OnnxPruneStep
from compression_helpers import context
from tests.support.models import DIGITS_INPUTS


def test_initializers_reach_sparsity_and_model_runs(digits_model, digits_test_data, tmp_path: Path) -> None:
    source = tmp_path / "dense.onnx"
    names = export_module(digits_model, DIGITS_INPUTS, source)
    state = ModelState(inputs=DIGITS_INPUTS, output_names=names, onnx_path=source)
    work = tmp_path / "w"
    work.mkdir()
    new_state, record = OnnxPruneStep(sparsity=0.5).apply(state, context(work))
    assert new_state.onnx_path != source and source.exists()
    model = onnx.load(str(new_state.onnx_path))
    pruned = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name in record.facts["tensor_sparsity"]]
    assert len(pruned) >= 4
    for array in pruned:
        assert float((array == 0).mean()) == pytest.approx(0.5, abs=0.01)
    ref = run_onnx(source, digits_test_data.batches(64))
    out = run_onnx(new_state.onnx_path, digits_test_data.batches(64))
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert output_fidelity(ref, out, "classify").agreement > 0.5
