"""The walk-through technique of ``docs/architecture.md`` ("Adding a compression technique"), as a real
step: registered only here, it runs from a TOML recipe through the engine and enters the search space
and its recipe order without any edit to ``builder/search/space.py``."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import pytest

from builder.compression.base import (CompressionStep, ModelForm, ModelState, SearchEntry, SearchParam,
                                      SpaceOptions, StepContext, StepOrder, StepRecord)
from builder.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RoundWeightsStep(CompressionStep):
    """Float weights rounded to fewer mantissa bits: same graph and speed, a smaller compressed download."""

    name: ClassVar[str] = "round_weights"
    form: ClassVar[ModelForm] = ModelForm.ONNX
    order: ClassVar[StepOrder] = StepOrder(after=("fold", "optimize_graph"), before=("smooth", "quantize"))
    mantissa_bits: int = 10  # of float32's 23; 7 is bfloat16's precision

    def __post_init__(self) -> None:
        if not 1 <= self.mantissa_bits <= 22:
            raise UsageError(f"mantissa_bits must be in 1..22, got {self.mantissa_bits}")

    @classmethod
    def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
        return (SearchParam("use_round_weights", (False, True)), SearchParam("mantissa_bits", (7, 10)))

    @classmethod
    def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
        if not values.get("use_round_weights"):
            return ()
        return (SearchEntry({"mantissa_bits": int(values["mantissa_bits"])}),)

    def apply(self, state: ModelState, ctx: StepContext) -> tuple[ModelState, StepRecord]:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(state.onnx_path))
        drop = 23 - self.mantissa_bits
        rounded = 0
        for init in model.graph.initializer:
            weights = numpy_helper.to_array(init)
            if weights.dtype != np.float32:
                continue
            bits = weights.view(np.uint32).astype(np.uint64)  # room for the carry of rounding up
            bits = ((bits + (1 << (drop - 1))) >> drop) << drop
            init.CopyFrom(numpy_helper.from_array(bits.astype(np.uint32).view(np.float32), init.name))
            rounded += 1
        out = ctx.workdir / "model.onnx"
        onnx.save(model, str(out))
        return dataclasses.replace(state, onnx_path=out), StepRecord(
            step=self.name, params=dataclasses.asdict(self), facts={"initializers_rounded": rounded})


@pytest.fixture()
def registered(monkeypatch: pytest.MonkeyPatch) -> dict[str, type[CompressionStep]]:
    """``STEPS`` with the example step appended, as its line in ``builder/compression/steps.py`` would."""
    from builder.compression.steps import STEPS

    monkeypatch.setitem(STEPS, RoundWeightsStep.name, RoundWeightsStep)
    return STEPS


RECIPE = """
name = "rounded"
[[step]]
type = "fold"
[[step]]
type = "round_weights"
mantissa_bits = 7
"""


def test_example_step_runs_from_a_toml_recipe(registered, digits_loaded, digits_test_data, tmp_path: Path) -> None:
    from builder.compression.engine import run_recipe
    from builder.compression.evaluate import EvalConfig
    from builder.compression.recipe import Recipe

    recipe = Recipe.from_toml_text(RECIPE)
    (fold, rounding) = recipe.validate(torch_available=True, has_data=False, has_train_data=False)
    assert isinstance(rounding, RoundWeightsStep) and rounding.mantissa_bits == 7
    result = run_recipe(digits_loaded, recipe, data=digits_test_data, train_data=None, out_dir=tmp_path / "out",
                        eval_config=EvalConfig(warmup_runs=1, timed_runs=3))
    folded, rounded = (report.evaluation for report in result.steps)
    assert result.steps[1].record.facts["initializers_rounded"] > 0
    assert rounded.download_bytes < 0.8 * folded.download_bytes  # zeroed mantissa bits compress
    assert rounded.accuracy >= folded.accuracy - 0.02
    assert Recipe.from_toml_text(recipe.to_toml()) == recipe


def test_example_step_uses_the_contract_defaults_and_checks_its_parameters(registered) -> None:
    from builder.compression.recipe import Recipe

    step = RoundWeightsStep()
    assert (step.requires_data(), step.requires_train_data(), step.teacher_source()) == (False, False, None)
    with pytest.raises(UsageError, match="mantissa_bits"):
        Recipe.from_toml_text('[[step]]\ntype = "round_weights"\nmantissa_bits = 30\n').build_steps()
    with pytest.raises(UsageError, match="unknown parameter"):
        Recipe.from_toml_text('[[step]]\ntype = "round_weights"\nbits = 7\n').build_steps()


def test_example_step_enters_the_search_space_and_its_order(registered) -> None:
    from builder.compression.recipe import Recipe
    from builder.search.space import SpaceOptions, build_space, fixed, recipe_from_steps

    options = SpaceOptions(torch_available=False, has_train_data=False, available_steps=frozenset(registered),
                           has_matmul=True)
    space = build_space(options)
    names = [p.name for p in space.parameters]
    assert names[-2:] == ["use_round_weights", "mantissa_bits"]  # appended: the other trial names keep their order
    values = {"use_prune": True, "graph": "transformer", "quant_mode": "dynamic", "use_smooth": True,
              "use_round_weights": True, "mantissa_bits": 10}
    steps = space.steps(space.sample(fixed(values)))
    assert [s["type"] for s in steps] == ["prune_onnx", "optimize_graph", "round_weights", "smooth", "quantize"]
    assert steps[2] == {"type": "round_weights", "mantissa_bits": 10}
    recipe = recipe_from_steps(steps)
    recipe.validate(torch_available=False, has_data=True, has_train_data=False)
    assert Recipe.from_toml_text(recipe.to_toml()).to_dict() == recipe.to_dict()
    off = space.steps(space.sample(fixed({**values, "use_round_weights": False})))
    assert "round_weights" not in [s["type"] for s in off]
    int8 = space.steps(space.sample(fixed({**values, "quant_mode": "int8"})))
    assert [s["type"] for s in int8] == ["prune_onnx", "round_weights", "int8"]  # int8 brings its own graph steps


def test_the_walk_through_shows_this_step() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Adding a compression technique"):]
    assert inspect.getsource(RoundWeightsStep) in section
    assert "tests/compression/test_example_step.py" in section
