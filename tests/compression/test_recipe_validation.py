"""Recipes: TOML in and out, shortcuts, and impossible recipes refused before anything runs."""
from __future__ import annotations

import pytest

from builder.compression.recipe import Recipe, StepSpec
from builder.errors import UsageError


def test_toml_recipe_reads_steps_in_order_and_round_trips() -> None:
    text = """
name = "digits-small"
[[step]]
type = "prune_channels"
ratio = 0.5
[[step]]
type = "cluster"
clusters = 16
tie = [["classifier.1", "classifier.3"]]
"""
    recipe = Recipe.from_toml_text(text)
    assert [s.name for s in recipe.steps] == ["prune_channels", "cluster"]
    assert recipe.steps[0].params == {"ratio": 0.5}
    again = Recipe.from_toml_text(recipe.to_toml())
    assert again == Recipe.from_toml_text(text)


def test_shortcuts_put_torch_steps_before_quantization() -> None:
    recipe = Recipe.from_shortcuts(quantize="int8-static", prune=0.5, prune_channels=0.3, cluster=16,
                                   lowrank=0.9, distill_from="pkg.mod:teacher")
    assert [s.name for s in recipe.steps] == ["distill", "prune_channels", "lowrank", "prune", "cluster", "quantize"]
    assert recipe.steps[-1].params == {"mode": "static", "per_channel": True, "calibration": "minmax"}
    onnx_only = Recipe.from_shortcuts(prune=0.4, torch_available=False)
    assert onnx_only.steps == (StepSpec("prune_onnx", {"sparsity": 0.4}),)


@pytest.mark.parametrize("text, fragment", [
    ('[[step]]\ntype = "sharpen"\n', "unknown step type 'sharpen'"),
    ('[[step]]\ntype = "prune"\nsparsity_goal = 0.5\n', "unknown parameter(s) ['sparsity_goal']"),
    ('[[step]]\ntype = "prune"\nfinal_sparsity = 1.5\n', "final_sparsity must be in"),
    ('[[step]]\ntype = "cluster"\nclusters = 1\n', "clusters must be an integer"),
    ('[[step]]\nratio = 0.5\n', "has no 'type'"),
    ('name = "x"\n', "no [[step]] tables"),
    ('[[step]\n', "not valid TOML"),
])
def test_bad_recipes_fail_with_a_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        Recipe.from_toml_text(text).validate(torch_available=True, has_data=True, has_train_data=True)
    assert fragment in str(info.value)


def test_torch_step_after_onnx_step_is_refused() -> None:
    recipe = Recipe((StepSpec("prune_onnx", {"sparsity": 0.3}), StepSpec("cluster", {"clusters": 8})))
    with pytest.raises(UsageError, match="comes after ONNX step 'prune_onnx'"):
        recipe.validate(torch_available=True, has_data=True, has_train_data=True)


def test_torch_step_on_onnx_only_model_is_refused() -> None:
    with pytest.raises(UsageError, match="ONNX-only"):
        Recipe.from_shortcuts(cluster=8).validate(torch_available=False, has_data=True, has_train_data=True)


def test_training_step_without_train_data_is_refused() -> None:
    with pytest.raises(UsageError, match="--train-data"):
        Recipe.from_shortcuts(distill_from="a.b:c").validate(torch_available=True, has_data=True, has_train_data=False)
    explicit = Recipe((StepSpec("prune", {"final_sparsity": 0.5, "epochs": 3}),))
    with pytest.raises(UsageError, match="--train-data"):
        explicit.validate(torch_available=True, has_data=True, has_train_data=False)
    # Without explicit epochs, pruning falls back to one shot: allowed.
    Recipe.from_shortcuts(prune=0.5).validate(torch_available=True, has_data=False, has_train_data=False)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static", "fp16"])
def test_quantize_shortcuts_match_the_registered_quantize_step(mode: str) -> None:
    from builder.compression.steps import STEPS

    recipe = Recipe.from_shortcuts(quantize=mode)
    if "quantize" not in STEPS:  # before the graph steps are registered: a clear error, not a crash
        with pytest.raises(UsageError, match="unknown step type 'quantize'"):
            recipe.build_steps()
        return
    (step,) = recipe.build_steps()
    assert step.mode == {"int8-dynamic": "dynamic", "int8-static": "static", "fp16": "fp16"}[mode]


def test_int8_shortcut_is_the_auto_step_with_the_target_cpu() -> None:
    (step,) = Recipe.from_shortcuts(quantize="int8", target_cpu={"arch": "aarch64", "dot_product": False}).build_steps()
    assert (step.name, step.arch, step.dot_product) == ("int8", "aarch64", False)


def test_unknown_quantize_shortcut_is_refused() -> None:
    with pytest.raises(UsageError, match="--quantize"):
        Recipe.from_shortcuts(quantize="int3")


def test_shipped_example_recipes_are_valid() -> None:
    from pathlib import Path

    from builder.compression.steps import STEPS

    folder = Path(__file__).resolve().parents[2] / "builder" / "recipes"
    files = sorted(folder.glob("*.toml"))
    assert files, "builder/recipes/ ships example recipes"
    for path in files:
        recipe = Recipe.from_toml(path)
        if all(s.name in STEPS for s in recipe.steps):
            recipe.validate(torch_available=True, has_data=True, has_train_data=True)
