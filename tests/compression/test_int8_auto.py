"""int8 (``--quantize int8``): static QDQ for Conv nets, the encoder recipe for attention nets, the CPU's
int8 support read from the host or a profile; a missed fidelity floor is written and flagged, not
refused; Constant-node weights are candidates for mixed precision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.compression.base import ModelState, StepContext
from builder.compression.cpu_features import support_from_flags
from builder.compression.data import DataSource
from builder.compression.engine import run_recipe
from builder.compression.int8_auto import Int8Step, detect_model_class
from builder.compression.quantization import QuantizeStep
from builder.compression.recipe import Recipe
from builder.loading.types import InputSpec, LoadedModel
from tests.compression.compression_helpers import context

torch = pytest.importorskip("torch")


def ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def fresh(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_cpu_support_reads_vnni_and_dot_product_flags() -> None:
    assert support_from_flags("x86_64", {"avx2", "avx512f", "avx512_vnni"}).dot_product
    no_vnni = support_from_flags("x86_64", {"avx2", "fma"})
    assert not no_vnni.dot_product and no_vnni.u8s8_saturates and "no VNNI" in no_vnni.description
    assert support_from_flags("aarch64", {"fp", "asimd", "asimddp"}).dot_product
    a72 = support_from_flags("aarch64", {"fp", "asimd"})
    assert not a72.dot_product and not a72.u8s8_saturates


def test_int8_picks_static_qdq_for_a_conv_net(digits_loaded: LoadedModel, digits_test_data: DataSource,
                                             tmp_path: Path) -> None:
    assert detect_model_class(digits_loaded.onnx_path).kind == "cnn"
    step = Int8Step(calibrations=("minmax",), check_latency=False, arch="x86_64", dot_product=False)
    state = ModelState(digits_loaded.inputs, digits_loaded.output_names, onnx_path=digits_loaded.onnx_path)
    out, record = step.apply(state, context(workdir := fresh(tmp_path, "w"), calibration=digits_test_data))
    facts = record.facts
    assert facts["model_class"] == "cnn" and facts["mode"] == "static"
    # candidates share calibrated ranges: one file for the folded model, one for the equalised one
    assert len(list((workdir / "ranges").glob("*.json"))) == 2 < len(facts["candidates"])
    assert "QuantizeLinear" in ops(out.onnx_path) and "ConvInteger" not in ops(out.onnx_path)
    assert "static QDQ" in facts["choice"] and "no dot-product" in facts["choice"]
    labels = [c["recipe"] for c in facts["candidates"]]
    # the greedy search tried the levers (7-bit weights only because the target x86 has no VNNI)
    assert any("bias correction" in label for label in labels) and any("equalised" in label for label in labels)
    assert any("GPTQ rounding" in label for label in labels)
    assert any("7-bit" in label for label in labels) and any("u8/u8" in label for label in labels)
    assert facts["agreement"] >= 0.95


def tiny_encoder(tmp_path: Path) -> tuple[LoadedModel, DataSource]:
    from builder.compression._export import export_module
    from builder.zoo.tiny_transformer import untrained

    torch.manual_seed(0)
    module = untrained().eval()
    inputs = (InputSpec("x", (1, 16, 64)),)
    path = tmp_path / "enc.onnx"
    names = export_module(module, inputs, path)
    x = np.random.default_rng(0).normal(size=(48, 16, 64)).astype(np.float32)
    return (LoadedModel("enc", "tiny", "factory", path, inputs, names),
            DataSource.from_arrays({"x": x}, None, inputs, "random"))


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_picks_the_encoder_recipe_for_an_attention_net(tmp_path: Path, vnni: bool) -> None:
    loaded, data = tiny_encoder(tmp_path)
    assert detect_model_class(loaded.onnx_path).kind == "encoder"
    state = ModelState(loaded.inputs, loaded.output_names, onnx_path=loaded.onnx_path)
    step = Int8Step(check_latency=False, arch="x86_64", dot_product=vnni)
    out, record = step.apply(state, context(fresh(tmp_path, "w"), calibration=data))
    facts = record.facts
    # uint8 Attention weights only where U8S8 saturates; with VNNI int8 everywhere (the VNNI kernels)
    assert ("Attention uint8" in facts["recipe"]) is (not vnni)
    assert facts["model_class"] == "encoder" and facts["mode"] == "dynamic"
    assert [s["step"] for s in facts["steps"]][-2:] == ["smooth", "quantize"]
    assert facts["steps"][-1]["facts"]["gptq_rounded"] > 0
    assert "QuantizeLinear" not in ops(out.onnx_path)  # no static QDQ: it collapses encoders


def test_missed_floor_is_written_and_flagged_with_its_gap(digits_loaded: LoadedModel, digits_test_data: DataSource,
                                                         tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"step": [{"type": "int8", "calibrations": ["minmax"], "check_latency": False,
                                         "min_cosine": 0.999999, "min_agreement": 1.0}]})
    result = run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=None, out_dir=tmp_path / "out")
    assert result.model_path.is_file()
    assert "fidelity_floor_missed" in result.flags
    report = json.loads(result.report_path.read_text())
    gap = report["steps"][0]["facts"]["floor_missed"]
    assert "cosine" in gap and "gap" in gap and "\n" not in gap


def constant_weight_mlp(path: Path) -> Path:
    """x -> MatMul(Constant W1) -> Relu -> MatMul(Constant W2) -> y: weights in Constant nodes, as
    Paddle exports them."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 32)).astype(np.float32)
    w1[:, 3] *= 40.0  # an outlier column: int8 of that layer hurts
    w2 = rng.normal(size=(32, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1c")),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2c")),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_mixed_precision_ranks_constant_node_weights(tmp_path: Path) -> None:
    source = constant_weight_mlp(tmp_path / "mlp.onnx")
    batches = [{"x": np.random.default_rng(i).normal(size=(32, 16)).astype(np.float32)} for i in range(2)]
    # preprocess=False: as when ORT's pre-processing fails on such a graph and the model is quantized as it is
    step = QuantizeStep(mode="dynamic", per_channel=False, check_latency=False, target_cosine=0.999999, max_kept=1,
                        preprocess=False)
    state, record = step.apply(ModelState((InputSpec("x", (1, 16)),), ("y",), onnx_path=source),
                               StepContext(workdir=fresh(tmp_path, "w"), calibration_batches=lambda: iter(batches)))
    assert record.facts["constants_to_initializers"] == 2
    assert {r["node"] for r in record.facts["sensitivity"]} == {"mm1", "mm2"}
    assert len(record.facts["kept_float"]) == 1 and state.precision == "mixed"


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_a_cnn_under_the_target_gets_a_sensitive_layers_float_candidate(digits_loaded: LoadedModel,
                                                                         digits_test_data: DataSource,
                                                                         tmp_path: Path, target: float) -> None:
    step = Int8Step(calibrations=("minmax",), check_latency=False, target_cosine=target, target_agreement=target,
                    max_kept=2)
    state = ModelState(digits_loaded.inputs, digits_loaded.output_names, onnx_path=digits_loaded.onnx_path)
    _, record = step.apply(state, context(fresh(tmp_path, "w"), calibration=digits_test_data))
    labels = [c["recipe"] for c in record.facts["candidates"]]
    tried = [label for label in labels if "sensitive layers float" in label]
    assert len(tried) == (1 if target == 1.0 else 0), labels
    if tried and tried[0] == record.facts["recipe"]:
        assert len(record.facts["kept_float"]) >= 1


def test_one_samples_worth_of_agreement_is_not_a_difference_but_size_is(tmp_path: Path) -> None:
    """On 64 calibration samples 1/64 of agreement is one photo flipping: a >10% smaller candidate
    within it (and within the cosine margin) wins; two samples lower still loses."""
    from builder.compression.base import StepRecord
    from builder.compression.int8_auto import Candidate, _wins

    def entry(name: str, size: int, agreement: float, cosine: float) -> tuple:
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(b"x" * size)
        state = ModelState((), (), onnx_path=path)
        facts = {"agreement": agreement, "cosine_mean": cosine, "latency_ratio": 0.5}
        return state, StepRecord(step="quantize", params={}, facts=facts), Candidate(name, False, {})

    big = entry("classifier-float", 9000, 61 / 64, 0.9985)
    small = entry("classifier-int8", 5000, 60 / 64, 0.9984)
    smaller_worse = entry("all-int8", 4000, 59 / 64, 0.9984)
    assert _wins(small, big, "classify", 0.5, one_sample=1 / 64)
    assert not _wins(small, big, "classify", 0.5)  # without the sample count: 1.6 points > 1 point
    assert not _wins(smaller_worse, big, "classify", 0.5, one_sample=1 / 64)


def test_speed_book_pools_graphs_that_differ_only_in_weight_values(tmp_path: Path) -> None:
    from builder.compression.int8_auto import SpeedBook

    def model(name: str, dtype: int, value: int, op: str = "Identity") -> ModelState:
        w = helper.make_tensor("w_quantized", dtype, [2], [value, value])
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        return ModelState((), (), onnx_path=path)

    book = SpeedBook()
    nearest, corrected = model("nearest", TensorProto.INT8, 1), model("corrected", TensorProto.INT8, 2)
    u8 = model("u8", TensorProto.UINT8, 1)
    book.add(nearest, 0.50)
    book.add(corrected, 0.41)  # a lucky reading of the same kernels
    book.add(corrected, 0.52)
    book.add(u8, 0.60)
    assert book.ratio(nearest) == book.ratio(corrected) == 0.50  # pooled median
    assert book.ratio(u8) == 0.60 and book.fastest() == 0.50
