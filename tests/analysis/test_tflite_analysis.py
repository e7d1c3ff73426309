"""`.tflite` files are analysed from their flatbuffer: params, weight bytes, op histogram, MACs."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from builder.analysis.tflite_stats import analyze_tflite
from tests.analysis.tflite_graphs import write_tiny_tflite


def _interpreter_ops(path: Path) -> list[dict]:
    """Operators and tensor shapes as LiteRT's own (C++) reader sees them: the independent count."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    shapes = {d["index"]: tuple(int(v) for v in d["shape"]) for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    return [{"op": op["op_name"], "inputs": [shapes[int(i)] for i in op["inputs"] if int(i) >= 0],
             "output": shapes[int(op["outputs"][0])]} for op in ops]


def test_tflite_params_and_macs_match_an_independent_count(tmp_path: Path) -> None:
    path = tmp_path / "tiny.tflite"
    weights = write_tiny_tflite(path)
    stats = analyze_tflite(path)

    float_weights = [w for w in weights.values() if w.dtype == np.float32]
    assert stats.params == sum(w.size for w in float_weights)  # the int32 Reshape target is no parameter
    assert stats.weight_bytes == sum(w.nbytes for w in float_weights)

    expected = 0
    ops = _interpreter_ops(path)
    for op in ops:
        out = int(np.prod(op["output"]))
        if op["op"] == "CONV_2D":
            expected += out * int(np.prod(op["inputs"][1][1:]))
        elif op["op"] == "DEPTHWISE_CONV_2D":
            expected += out * op["inputs"][1][1] * op["inputs"][1][2]
        elif op["op"] in ("FULLY_CONNECTED", "BATCH_MATMUL"):
            expected += out * op["inputs"][0][-1]
    # and by hand: 6x6x8 x 3x3x3 + 6x6x8 x 3x3 + 36x5 x 8 + 4x7 x 6
    assert expected == 7776 + 2592 + 1440 + 168
    assert stats.macs == expected
    assert dict(stats.op_histogram) == dict(Counter(op["op"] for op in ops))
    conv = next(layer for layer in stats.layers if layer.op_type == "CONV_2D")
    assert conv.params == weights["conv_w"].size + weights["conv_b"].size
    assert conv.output_shape == (1, 6, 6, 8)


def test_analyze_cli_reads_a_tflite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    from tests.support.cli import run_builder

    path = tmp_path / "tiny.tflite"
    weights = write_tiny_tflite(path)
    code, out, err = run_builder(monkeypatch, capsys, "analyze", str(path), "--json")
    assert code == 0, err
    assert "TorchScript" not in err
    report = json.loads(out)
    assert report["model"]["source_kind"] == "tflite"
    assert report["totals"]["params"] == sum(w.size for w in weights.values() if w.dtype == np.float32)
    assert report["totals"]["macs"] == 7776 + 2592 + 1440 + 168
    assert report["estimates"]


@pytest.mark.slow
def test_tflite_from_litert_torch_matches_torch_counts(tmp_path: Path) -> None:
    """A real converter's output (litert-torch): params against torch's own count."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            h = self.depthwise(torch.relu(self.conv(x))).mean(dim=(2, 3))
            return self.fc(h)

    net = Net().eval()
    path = tmp_path / "net.tflite"
    litert_torch.convert(net, (torch.randn(1, 3, 6, 6),)).export(str(path))
    stats = analyze_tflite(path)
    assert stats.params == sum(p.numel() for p in net.parameters())
    assert stats.macs == 6 * 6 * 8 * 27 + 6 * 6 * 8 * 9 + 5 * 8
