"""ORT's fused attention ops count their projections and QKᵀ/AV, so fusing a transformer does not
make its MACs (and its latency estimate) drop by a third."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.analysis import analyze_onnx

BATCH, SEQ, HIDDEN, HEADS = 1, 8, 16, 2


def attention_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(HIDDEN, 3 * HIDDEN)).astype(np.float32), "qkv_w")
    bias = numpy_helper.from_array(np.zeros(3 * HIDDEN, np.float32), "qkv_b")
    node = helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["y"], name="attn", domain="com.microsoft",
                            num_heads=HEADS)
    graph = helper.make_graph([node], "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])],
                              [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def test_fused_attention_counts_projection_and_attention_core(tmp_path: Path) -> None:
    stats = analyze_onnx(attention_model(tmp_path / "attn.onnx"), {"x": (BATCH, SEQ, HIDDEN)})
    projections = BATCH * SEQ * HIDDEN * 3 * HIDDEN
    core = 2 * BATCH * SEQ * SEQ * HIDDEN  # QK^T and AV over all heads
    assert stats.macs == projections + core
