"""ONNX, TorchScript and factory sources load to checked ONNX files with the same analysis; bad
sources raise one-line typed errors."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from builder.analysis import analyze_loaded
from builder.errors import ModelLoadError, UnsupportedOpError, UsageError
from builder.loading import load_model


def test_onnx_torchscript_and_factory_give_the_same_totals(digits_files, tmp_path):
    from_factory = load_model("builder.zoo.digits_cnn:untrained", "1x1x8x8", workdir=tmp_path / "f")
    from_ts = load_model(digits_files["torchscript"], "1x1x8x8", workdir=tmp_path / "t")
    from_onnx = load_model(digits_files["onnx"], "1x1x8x8")
    assert (from_factory.source_kind, from_ts.source_kind, from_onnx.source_kind) == ("factory", "torchscript", "onnx")
    totals = []
    for loaded in (from_factory, from_ts, from_onnx):
        stats = analyze_loaded(loaded)
        totals.append((stats.params, stats.macs, stats.fp32_weight_bytes, stats.peak_activation_bytes))
    assert totals[0] == totals[1] == totals[2]
    # Conv 1->32, 32->64 at 8x8, 64->64 at 4x4 (3x3 kernels), Linear 64->128->10; BatchNorm folded by export.
    assert totals[0][1] == 32 * 64 * 9 + 64 * 64 * 32 * 9 + 64 * 16 * 64 * 9 + 64 * 128 + 128 * 10


def test_factory_export_is_checked_single_file_with_dynamic_batch(tmp_path):
    import torch

    from builder.zoo import digits_cnn

    loaded = load_model("builder.zoo.digits_cnn:untrained", "1x1x8x8", workdir=tmp_path)
    assert loaded.export_max_abs_diff is not None and loaded.export_max_abs_diff < 1e-4
    assert loaded.torch_module is not None and loaded.opset == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_cnn-untrained.onnx"]  # no .onnx.data, no temp left
    model = onnx.load(str(loaded.onnx_path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(loaded.onnx_path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = digits_cnn.untrained()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, atol=1e-4)


def test_torch_loaded_models_need_input_shapes(digits_files, tmp_path):
    with pytest.raises(UsageError, match="needs --input-shape"):
        load_model("builder.zoo.digits_cnn:untrained", None, workdir=tmp_path)
    with pytest.raises(UsageError, match="check --input-shape"):
        load_model(digits_files["torchscript"], "1x3x8", workdir=tmp_path)


@pytest.mark.parametrize("source, message", [
    ("no/such/model.onnx", "not found"),
    ("no_such_package.models:make", "cannot import module 'no_such_package.models'"),
    ("builder.zoo.digits_cnn:no_such_factory", "has no attribute 'no_such_factory'"),
    ("builder.zoo.digits_cnn:load_digits_split", "not a torch.nn.Module"),
    ("builder.zoo.digits_cnn:INPUT_SHAPE", "not a callable"),
])
def test_bad_sources_raise_one_line_model_load_errors(source, message, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(source, "1x1x8x8", workdir=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_non_model_and_corrupt_files_are_refused(digits_files, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(text)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(digits_files["onnx"].read_bytes()[:5000])
    with pytest.raises(ModelLoadError):
        load_model(truncated)
    pickle = tmp_path / "weights.pt"
    import torch

    torch.save({"w": torch.ones(2)}, str(pickle))
    with pytest.raises(ModelLoadError, match="not a TorchScript file.*factory"):
        load_model(pickle, "1x2")


def test_invalid_graph_and_unknown_operator_are_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    custom = helper.make_model(helper.make_graph([helper.make_node("FancyActivation", ["x"], ["y"], name="fancy")],
                                                 "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(custom, tmp_path / "custom.onnx")
    with pytest.raises(UnsupportedOpError, match="'FancyActivation' \\(node 'fancy'\\)"):
        load_model(tmp_path / "custom.onnx")
    dangling = helper.make_model(helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g", [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(dangling, tmp_path / "dangling.onnx")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(tmp_path / "dangling.onnx")


def test_onnx_shapes_follow_input_shape(digits_files):
    loaded = load_model(digits_files["onnx"], "4x1x8x8")
    assert loaded.inputs[0].shape == (4, 1, 8, 8)
    assert analyze_loaded(loaded).macs == 4 * analyze_loaded(load_model(digits_files["onnx"])).macs
    with pytest.raises(UsageError, match="fixes it at 8"):
        load_model(digits_files["onnx"], "1x1x9x9")
