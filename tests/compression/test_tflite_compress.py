"""`builder compress MODEL.tflite --quantize int8`: a .tflite a user brings is quantized by
ai-edge-quantizer, judged on the user's data against the input model, and written with its report;
other steps are refused in one line, and a file with nothing to quantize says so."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import run_builder

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")


@pytest.fixture(scope="module")
def tflite_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A float .tflite with weights worth quantizing (75 KB), converted here by litert-torch, and data."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    root = tmp_path_factory.mktemp("tflite")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    path = root / "mlp.tflite"
    litert_torch.convert(module, (torch.randn(1, 64),)).export(str(path))
    from ai_edge_litert.interpreter import Interpreter

    name = Interpreter(model_path=str(path)).get_input_details()[0]["name"]
    data = root / "data.npz"
    np.savez(data, **{name: np.random.default_rng(0).normal(size=(40, 1, 64)).astype(np.float32)[:, 0]})
    return path, data


def test_int8_quantizes_judges_and_writes_the_tflite(tflite_mlp: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    path, data = tflite_mlp
    out = tmp_path / "out"
    code, stdout, stderr = run_builder(monkeypatch, capsys, "compress", str(path), "--quantize", "int8",
                                       "--data", str(data), "-o", str(out), "--json", "--task", "regression")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert json.loads(stdout)["tflite"]["precision"] == "int8"
    assert report["size_bytes"] < 0.5 * report["source_size_bytes"]  # int8 weights: ~1/4 of fp32
    assert report["samples"] == 40 and report["cosine_mean"] > 0.99
    assert "not_quantized" not in report["flags"]
    from ai_edge_litert.interpreter import Interpreter

    Interpreter(model_path=str(out / "model.tflite")).allocate_tensors()  # a loadable model, not a stub

    code, _, stderr = run_builder(monkeypatch, capsys, "compress", str(path), "--quantize", "int8",
                                  "--data", str(data), "-o", str(out))
    assert code != 0 and "already exists" in stderr  # never overwritten without --force


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8-static"], "int8-static needs the ONNX or PyTorch model"),
    (["--prune", "0.5"], "--prune need the ONNX or PyTorch model"),
    ([], "a .tflite file takes --quantize int8 or --quantize fp16"),
])
def test_other_steps_on_a_tflite_are_one_line_refusals(tflite_mlp: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                       args: list[str], message: str) -> None:
    path, data = tflite_mlp
    code, _, stderr = run_builder(monkeypatch, capsys, "compress", str(path), *args, "--data", str(data),
                                  "-o", str(tmp_path / "o"))
    assert code != 0 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_a_tflite_with_fp16_weights_says_int8_quantized_nothing(tflite_mlp: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """mediapipe ships fp16 weights behind DEQUANTIZE; ai-edge-quantizer leaves them: flag, don't pretend."""
    from builder.targets.litert_target import quantize_tflite

    path, data = tflite_mlp
    fp16 = tmp_path / "fp16.tflite"
    quantize_tflite(path, fp16, "fp16")
    code, _, stderr = run_builder(monkeypatch, capsys, "compress", str(fp16), "--quantize", "int8",
                                  "--data", str(data), "-o", str(tmp_path / "o"), "--task", "regression")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0 and "not_quantized" in report["flags"]
    assert "stored as fp16 behind DEQUANTIZE" in stderr
