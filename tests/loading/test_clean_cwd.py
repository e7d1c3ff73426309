"""Nothing is written outside --out and the work directory, even when ORT's shape inference fails
(it saves ``sym_shape_infer_temp.onnx`` into the current directory)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.support.cli import run_builder


def symbolic_inference_breaker(path: Path) -> None:
    """MatMul + Add of two inputs with different symbolic batch dims: ORT's symbolic shape inference
    cannot merge them without ``auto_merge`` and gives up (what ``quant_pre_process`` runs)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "z"], ["y"], name="add")]
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    model = helper.make_model(helper.make_graph(nodes, "g", [x, z], [y], [weight]),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)


@pytest.fixture()
def model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "inputs" / "breaker.onnx"
    model.parent.mkdir()
    symbolic_inference_breaker(model)
    rng = np.random.default_rng(1)
    data = tmp_path / "inputs" / "data.npz"
    np.savez(data, x=rng.standard_normal((16, 4)).astype(np.float32), z=rng.standard_normal((16, 4)).astype(np.float32))
    return model, data


def test_quant_pre_process_scratch_stays_out_of_the_cwd(model_and_data, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from builder.compression.quantization import preprocess

    model, _ = model_and_data
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.chdir(raw)
    with pytest.raises(Exception, match="symbolic shape inference"):  # ORT raises a bare Exception
        quant_pre_process(str(model), str(tmp_path / "raw-out.onnx"))
    assert "sym_shape_infer_temp.onnx" in os.listdir(raw)  # the trap being guarded against

    clean = tmp_path / "clean"
    clean.mkdir()
    monkeypatch.chdir(clean)
    work = tmp_path / "work"
    work.mkdir()
    prepared, why = preprocess(model, work / "pre.onnx")
    assert os.listdir(clean) == []
    assert why and "symbolic shape inference" in why  # not silent: the fallback says what was lost
    assert prepared == (work / "pre.onnx").resolve() and prepared.exists()
    assert sorted(os.listdir(work)) == ["pre.onnx"]


def test_compress_and_analyze_leave_a_clean_cwd_empty(model_and_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    model, data = model_and_data
    clean = tmp_path / "cwd"
    clean.mkdir()
    monkeypatch.chdir(clean)
    out = tmp_path / "out"
    code, stdout, stderr = run_builder(monkeypatch, capsys, "compress", str(model), "--data", str(data),
                                    "--quantize", "int8", "--latency-runs", "5", "--out", str(out))
    assert os.listdir(clean) == [], stderr
    if code == 0:  # tiny graphs may be refused as slower than fp32; either way nothing leaks
        assert (out / "model.onnx").exists()
        assert (out / "report.json").exists()  # (compress prints the normalisation only when it changed something)
    else:
        assert stderr.strip().splitlines()[-1].startswith("builder: error:")
    code, stdout, stderr = run_builder(monkeypatch, capsys, "analyze", str(model), "--input-shape", "x=2x4,z=2x4",
                                    "--top", "3")
    assert code == 0, stderr
    assert "normalised:" in stdout
    assert os.listdir(clean) == []
