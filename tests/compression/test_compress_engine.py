"""The engine end to end on the digits CNN: steps run in order, each measured, model.onnx and
report.json written; an impossible or failing recipe leaves nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.compression.engine import run_recipe
from builder.compression.evaluate import EvalConfig
from builder.execution.sessions import run_onnx
from builder.compression.recipe import Recipe, StepSpec
from builder.errors import UsageError

FAST = EvalConfig(warmup_runs=2, timed_runs=10)


def test_prune_channels_then_cluster_writes_model_and_report(
        digits_loaded, digits_test_data, digits_train_data, tmp_path: Path) -> None:
    recipe = Recipe((StepSpec("prune_channels", {"ratio": 0.5, "epochs": 3}), StepSpec("cluster", {"clusters": 16})))
    seen = []
    out = tmp_path / "out"
    result = run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=digits_train_data, out_dir=out,
                        eval_config=FAST, on_report=lambda r: seen.append(r.step))
    assert seen == ["input", "prune_channels", "cluster"]
    assert result.model_path == out / "model.onnx" and result.final_state.onnx_path == result.model_path
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["prune_channels", "cluster"]
    base, pruned, clustered = report["baseline"]["evaluation"], *[s["evaluation"] for s in report["steps"]]
    assert pruned["macs"] <= 0.5 * base["macs"]
    assert clustered["download_bytes"] < 0.5 * pruned["download_bytes"]
    assert clustered["accuracy"] >= base["accuracy"] - 0.03
    assert report["recipe"]["step"][0] == {"type": "prune_channels", "ratio": 0.5, "epochs": 3}
    # The written model is the final one and runs.
    out_logits = run_onnx(out / "model.onnx", digits_test_data.batches(64))
    assert float((out_logits.argmax(1) == digits_test_data.labels).mean()) == pytest.approx(clustered["accuracy"])
    assert not list(out.glob(".work-*")) and not list(out.glob(".*.tmp"))
    assert digits_loaded.torch_module.features[0].out_channels == 32  # the caller's module is untouched


def test_impossible_recipe_is_refused_before_anything_is_written(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    recipe = Recipe((StepSpec("prune_onnx", {}), StepSpec("prune", {"final_sparsity": 0.5})))
    with pytest.raises(UsageError, match="comes after ONNX step"):
        run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=None, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failing_step_leaves_no_partial_model(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = Recipe((StepSpec("prune", {"final_sparsity": 0.5}), StepSpec("lowrank", {"energy": 1.0})))
    with pytest.raises(UsageError, match="lowrank"):
        run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=None, out_dir=out, eval_config=FAST)
    assert not out.exists()  # the run made out/ and removes it again
    kept = tmp_path / "kept"
    (kept / "other.txt").parent.mkdir()
    (kept / "other.txt").write_text("not ours")
    with pytest.raises(UsageError, match="lowrank"):
        run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=None, out_dir=kept, eval_config=FAST)
    assert [p.name for p in kept.iterdir()] == ["other.txt"]  # an existing folder keeps only what it had


def test_onnx_only_model_gets_onnx_pruning(digits_loaded, digits_test_data, tmp_path: Path) -> None:
    import dataclasses

    onnx_only = dataclasses.replace(digits_loaded, torch_module=None, source_kind="onnx")
    recipe = Recipe.from_shortcuts(prune=0.3, torch_available=False)
    result = run_recipe(onnx_only, recipe, data=digits_test_data, train_data=None, out_dir=tmp_path / "o",
                        eval_config=FAST)
    assert result.final.nonzero_params < 0.8 * result.baseline.nonzero_params
    assert np.isfinite(run_onnx(result.model_path, digits_test_data.batches(64))).all()


def test_distill_from_a_teacher_measures_fidelity_against_the_teacher(
        digits_model, digits_test_data, digits_train_data, tmp_path: Path) -> None:
    import torch

    from builder.compression._export import export_module
    from builder.loading.types import LoadedModel
    from builder.zoo.digits_cnn import DigitsCNN
    from tests.support.models import DIGITS_INPUTS

    torch.manual_seed(0)  # the student's init must not depend on which tests ran before
    student = DigitsCNN(width=8).eval()
    export_module(student, DIGITS_INPUTS, tmp_path / "student.onnx")
    loaded = LoadedModel("student", "test", "factory", tmp_path / "student.onnx", DIGITS_INPUTS, ("output",),
                         torch_module=student)
    result = run_recipe(loaded, Recipe((StepSpec("distill", {"epochs": 12, "lr": 1e-2}),)), data=digits_test_data,
                        train_data=digits_train_data, out_dir=tmp_path / "out", teacher_module=digits_model,
                        eval_config=FAST)
    report = json.loads(result.report_path.read_text())
    assert report["baseline"]["step"] == "teacher" and result.baseline.accuracy > 0.9
    assert result.final.params * 4 < result.baseline.params
    assert result.final.fidelity.agreement > 0.8 and result.final.accuracy > 0.8
