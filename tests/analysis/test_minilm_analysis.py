"""all-MiniLM-L6-v2 (real pretrained BERT-class model, offline) at seq 128: hand-computed MACs."""
from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from builder.analysis import analyze_loaded, estimate_latency
from builder.loading import load_model
from builder.profiles import load_profiles

LAYERS, HIDDEN, HEADS, FFN, SEQ = 6, 384, 12, 1536, 128


@pytest.mark.slow
def test_minilm_macs_params_and_estimates(tmp_path):
    from builder.zoo.minilm import INPUT_SPEC

    loaded = load_model("builder.zoo.minilm:minilm", INPUT_SPEC, workdir=tmp_path)
    assert loaded.export_max_abs_diff < 1e-4
    stats = analyze_loaded(loaded)
    per_layer = (4 * SEQ * HIDDEN * HIDDEN  # q, k, v, output projections
                 + 2 * HEADS * SEQ * SEQ * (HIDDEN // HEADS)  # QK^T and attention x V
                 + 2 * SEQ * HIDDEN * FFN)  # feed-forward
    assert stats.macs == LAYERS * per_layer == 1_434_451_968
    model = onnx.load(str(loaded.onnx_path))
    # parameters = every initializer and every Constant holding weights, not shapes or indices (the documented convention)
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    numeric = [numpy_helper.to_array(t) for t in constants]
    assert stats.params == (sum(numpy_helper.to_array(i).size for i in model.graph.initializer)
                            + sum(a.size for a in numeric if a.dtype.name not in ("int64", "int32", "bool")))
    assert 22_000_000 < stats.params < 23_000_000  # 22.7 M with the unused pooler, which the export drops
    assert not stats.unresolved_tensors
    profiles = load_profiles()
    pi4 = estimate_latency(stats, profiles["raspberry-pi-4"])
    orin_fp16 = estimate_latency(stats, profiles["jetson-orin-nano"], "fp16")
    assert pi4.fits_in_ram and pi4.compute_bound_layers >= 36  # the 36 big MatMuls at least
    assert orin_fp16.latency_ms < pi4.latency_ms / 5
