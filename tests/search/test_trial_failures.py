"""A search on targets the data cannot measure stops before the first trial; every failed trial keeps
its exception text in the outcome (report.json "failed") and the log; Conv nets start from int8."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from builder.errors import CompressionError, UsageError
from builder.search.evaluate import EvaluationSetup
from builder.search.objectives import Targets
from builder.search.optimize import SearchConfig, run_search
from builder.search.space import SpaceOptions, assemble_steps, build_space, starting_points
from tests.search.fakes import AnalyticEvaluator, count_evaluations


def config(tmp_path: Path, targets: Targets, trials: int = 6) -> SearchConfig:
    setup = EvaluationSetup(model="analytic", device="raspberry-pi-4", data="-", workdir=str(tmp_path / "work"))
    return SearchConfig(setup=setup, targets=targets, out_dir=str(tmp_path / "out"),
                        cache_path=str(tmp_path / "cache.sqlite"), trials=trials, population_size=3)


class Unlabelled(AnalyticEvaluator):
    use_accuracy = False


class Failing(AnalyticEvaluator):
    def evaluate(self, steps, quality_check=None):
        kinds = {s["type"]: s for s in steps}
        if kinds.get("quantize", {}).get("mode") == "static":
            raise CompressionError("static quantization refused: boom")
        if kinds.get("quantize", {}).get("mode") == "fp16":
            raise ValueError("a library bug")
        return super().evaluate(steps, quality_check)


def test_accuracy_target_without_labels_fails_before_the_first_trial(tmp_path: Path) -> None:
    cfg = config(tmp_path, Targets(max_accuracy_drop=0.01))
    with pytest.raises(UsageError, match="labels in --data"):
        run_search(cfg, evaluator=Unlabelled(cfg.setup))
    assert count_evaluations(tmp_path / "work") == 0


def test_failed_trials_keep_their_exception_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path, Targets(min_fidelity=0.5), trials=8)
    with caplog.at_level(logging.WARNING, logger="builder.search.optimize"):
        outcome = run_search(cfg, evaluator=Failing(cfg.setup))
    errors = {f["error"] for f in outcome.failed}
    assert outcome.failed and None not in errors
    assert any("static quantization refused: boom" in e for e in errors)
    assert any("ValueError: a library bug" in e for e in errors)
    assert "static quantization refused: boom" in caplog.text


def test_conv_nets_start_from_the_int8_class_recipe_without_dynamic() -> None:
    options = SpaceOptions(torch_available=False, has_train_data=False, conv_heavy=True,
                           available_steps=frozenset({"fold", "quantize", "int8"}),
                           target_cpu={"arch": "aarch64", "dot_product": False})
    points = starting_points(build_space(options))
    modes = [p["quant_mode"] for p in points]
    assert modes[0] == "int8" and "dynamic" not in modes
    assert assemble_steps(points[0], options) == ({"type": "int8", "arch": "aarch64", "dot_product": False,
                                                   "max_kept": 0},)
