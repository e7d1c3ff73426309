"""The tiny transformer, exported once with dynamic batch and sequence, analysed at two shapes:
attention MatMuls and totals match hand-computed values."""
from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from builder.analysis import analyze_onnx, estimate_latency
from builder.loading import load_model
from builder.profiles import load_profiles
from builder.zoo.tiny_transformer import D_MODEL, FF, HEADS, LAYERS, NUM_CLASSES

HEAD_DIM = D_MODEL // HEADS


@pytest.fixture(scope="module")
def transformer_onnx(tmp_path_factory):
    loaded = load_model("builder.zoo.tiny_transformer:untrained", f"1xseq@16x{D_MODEL}",
                        workdir=tmp_path_factory.mktemp("tt"))
    return loaded.onnx_path


def expected_macs(batch: int, seq: int) -> int:
    tokens = batch * seq
    per_layer = (tokens * D_MODEL * 3 * D_MODEL  # q, k, v projections
                 + 2 * batch * HEADS * seq * seq * HEAD_DIM  # QK^T and attention x V
                 + tokens * D_MODEL * D_MODEL  # output projection
                 + 2 * tokens * D_MODEL * FF)  # feed-forward
    return LAYERS * per_layer + batch * D_MODEL * NUM_CLASSES


@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 40)])
def test_attention_and_total_macs_follow_the_input_shape(transformer_onnx, batch, seq):
    stats = analyze_onnx(transformer_onnx, {"input": (batch, seq, D_MODEL)})
    assert not stats.unresolved_tensors
    attention = [layer for layer in stats.layers
                 if layer.op_type == "MatMul" and layer.params == 0 and layer.output_shape[-1] in (seq, HEAD_DIM)
                 and len(layer.output_shape) == 4]
    assert len(attention) == 2 * LAYERS
    assert all(layer.macs == batch * HEADS * seq * seq * HEAD_DIM for layer in attention)
    assert stats.macs == expected_macs(batch, seq)


def test_params_equal_the_initializer_elements(transformer_onnx):
    model = onnx.load(str(transformer_onnx))
    stats = analyze_onnx(transformer_onnx, {"input": (1, 16, D_MODEL)})
    assert stats.params == sum(numpy_helper.to_array(init).size for init in model.graph.initializer)
    assert stats.weight_bytes == sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer)
    assert sum(layer.params for layer in stats.layers) == stats.params


def test_longer_sequences_need_more_memory_and_time(transformer_onnx):
    short = analyze_onnx(transformer_onnx, {"input": (1, 16, D_MODEL)})
    long = analyze_onnx(transformer_onnx, {"input": (1, 128, D_MODEL)})
    assert long.peak_activation_bytes > 4 * short.peak_activation_bytes
    assert long.params == short.params
    pi4 = load_profiles()["raspberry-pi-4"]
    assert estimate_latency(long, pi4).latency_ms > estimate_latency(short, pi4).latency_ms
