"""`builder compress` as a user runs it: a table and report.json, and one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.compression._export import export_module
from tests.support.cli import run_builder
from tests.support.models import DIGITS_INPUTS


import builder.loading  # noqa: E402

if not hasattr(builder.loading, "load_model"):  # lands with the model-loading issue
    pytest.skip("builder.loading.load_model is not there yet", allow_module_level=True)


class Proc:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def _builder(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run the real entry point (``builder.cli.main.app``) in-process: same error handling, no torch re-import."""
    def run(*args: str) -> Proc:
        return Proc(*run_builder(monkeypatch, capsys, "compress", *args))

    return run


@pytest.fixture()
def onnx_model_and_data(digits_model, digits_split, tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "digits.onnx"
    export_module(digits_model, DIGITS_INPUTS, model)
    data = tmp_path / "test.npz"
    np.savez(data, x=digits_split.x_test[:200], y=digits_split.y_test[:200])
    return model, data


def test_onnx_model_with_prune_shortcut_prints_table_and_writes_report(_builder, onnx_model_and_data, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = onnx_model_and_data
    out = tmp_path / "out"
    monkeypatch.setenv("COLUMNS", "80")
    proc = _builder(str(model), "--data", str(data), "--prune", "0.2", "--out", str(out), "--latency-runs", "5")
    assert proc.returncode == 0, proc.stderr
    assert "prune_onnx" in proc.stdout and "download" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in table) <= 80, proc.stdout  # the table fits 80 columns
    assert "MiB" not in proc.stdout and "KiB" not in proc.stdout  # one size convention: kB/MB = 10^3/10^6
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["step"] == "prune_onnx"
    assert report["steps"][0]["evaluation"]["nonzero_params"] < report["baseline"]["evaluation"]["nonzero_params"]
    assert (out / "model.onnx").is_file()
    again = _builder(str(model), "--data", str(data), "--prune", "0.2", "--out", str(out), "--latency-runs", "2",
                     "--force", "--json")  # --force overwrites; --json is the table as data
    assert again.returncode == 0, again.stderr
    steps = json.loads(again.stdout)["steps"]
    assert [s["step"] for s in steps] == ["input", "prune_onnx"] and steps[1]["evaluation"]["accuracy"] is not None


def test_accuracy_collapse_exits_non_zero_and_keeps_the_flagged_output(_builder, onnx_model_and_data,
                                                                       tmp_path: Path) -> None:
    """The README's old `--prune 0.5` example: accuracy 0.99 -> ~0.6 used to exit 0."""
    model, data = onnx_model_and_data
    out = tmp_path / "out"
    proc = _builder(str(model), "--data", str(data), "--prune", "0.5", "--out", str(out), "--latency-runs", "2")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("builder: error: accuracy fell from") and "--max-accuracy-drop 5.0%" in last, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert "accuracy_drop" in report["steps"][-1]["evaluation"]["flags"] and (out / "model.onnx").is_file()
    accepted = _builder(str(model), "--data", str(data), "--prune", "0.5", "--out", str(out), "--latency-runs", "2",
                        "--force", "--max-accuracy-drop", "90%")
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("extra, fragment", [
    (["--cluster", "8"], "ONNX-only"),
    (["--quantize", "int3"], "unknown --quantize 'int3'"),
    (["--prune", "0.5", "--recipe", "r.toml"], "either --recipe or shortcut flags"),
    (["--prune", "1.5"], "final_sparsity must be in"),
    ([], "nothing to do"),
])
def test_bad_input_is_one_line_and_writes_nothing(_builder, onnx_model_and_data, tmp_path: Path, extra: list[str],
                                                  fragment: str) -> None:
    model, data = onnx_model_and_data
    out = tmp_path / "out"
    proc = _builder(str(model), "--data", str(data), "--out", str(out), *extra)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("builder: error:") and fragment in lines[0], proc.stderr
    assert not (out / "model.onnx").exists()


def test_data_that_does_not_fit_the_model_is_one_line(_builder, onnx_model_and_data, tmp_path: Path) -> None:
    model, _ = onnx_model_and_data
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 1, 8, 8), np.float32))
    proc = _builder(str(model), "--data", str(bad), "--prune", "0.5", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "model inputs are ['input']" in proc.stderr


@pytest.mark.parametrize("case, fragment", [
    ("missing data file", "nope.npz"),
    ("npz without the model's input", "model inputs are ['input']"),
    ("recipe syntax error", "r.toml"),
    ("unknown step", "no_such_step"),
    ("step fails at run time", "quantization refused"),
])
def test_bad_input_exits_non_zero_with_one_line_and_no_out_dir(_builder, onnx_model_and_data, tmp_path: Path,
                                                               case: str, fragment: str) -> None:
    model, data = onnx_model_and_data
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\ntype = "prune_onnx"\n')
    if case == "missing data file":
        data = tmp_path / "nope.npz"
    elif case == "npz without the model's input":
        data = tmp_path / "bad.npz"
        np.savez(data, pixels=np.zeros((4, 1, 8, 8), np.float32))
    elif case == "recipe syntax error":
        recipe.write_text('[[step]\ntype = "prune_onnx"\n')
    elif case == "unknown step":
        recipe.write_text('[[step]]\ntype = "no_such_step"\n')
    elif case == "step fails at run time":  # valid recipe; the step refuses its result inside the engine
        recipe.write_text('[[step]]\ntype = "quantize"\nmode = "dynamic"\nmin_agreement = 1.01\n')
    out = tmp_path / "out"
    proc = _builder(str(model), "--data", str(data), "--out", str(out), "--recipe", str(recipe), "--latency-runs", "2")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()  # progress lines ("0. input: ...") may precede the error
    assert lines[-1].startswith("builder: error:") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not any(line.startswith("builder: error:") for line in lines[:-1])
    assert not out.exists()


@pytest.mark.slow  # the int8 step tries its calibrations and levers (~30-60 s on the digits CNN here)
def test_quantize_int8_on_a_conv_net_says_which_recipe_and_why(_builder, onnx_model_and_data, tmp_path: Path) -> None:
    model, data = onnx_model_and_data
    out = tmp_path / "out"
    proc = _builder(str(model), "--data", str(data), "--quantize", "int8", "--out", str(out), "--latency-runs", "5")
    assert proc.returncode == 0, proc.stderr
    chose = [line for line in proc.stderr.splitlines() if line.startswith("chose int8 recipe")]
    assert len(chose) == 1 and "static QDQ" in chose[0] and "cnn" in chose[0] and "CPU" in chose[0]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["step"] == "int8" and report["steps"][0]["facts"]["mode"] == "static"
