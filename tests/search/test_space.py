"""The recipe space: only applicable techniques, engine order, canonical keys; every assembled recipe
passes the engine's own validation."""
from __future__ import annotations

import itertools
import random

from builder.compression.recipe import Recipe
from builder.compression.steps import STEPS
from builder.search.space import SpaceOptions, build_space, canonical, fixed, recipe_from_steps

ALL = frozenset(STEPS)


def _names(options: SpaceOptions) -> set[str]:
    return {p.name for p in build_space(options).parameters}


def test_onnx_only_model_gets_no_pytorch_steps():
    names = _names(SpaceOptions(torch_available=False, has_train_data=False, available_steps=ALL))
    assert not names & {"distill", "use_prune_channels", "use_lowrank", "use_cluster"}
    assert {"use_prune", "quant_mode", "graph"} <= names


def test_training_steps_need_train_data_and_smoothing_needs_matmuls():
    without = _names(SpaceOptions(torch_available=True, has_train_data=False, available_steps=ALL))
    assert "distill" not in without and "use_smooth" not in without and "use_prune_channels" in without
    with_train = _names(SpaceOptions(torch_available=True, has_train_data=True, available_steps=ALL, has_matmul=True))
    assert {"distill", "use_smooth"} <= with_train


def test_assembled_steps_follow_engine_order_and_validate():
    options = SpaceOptions(torch_available=True, has_train_data=True, available_steps=ALL, has_matmul=True)
    space = build_space(options)
    rng = random.Random(3)
    for _ in range(200):
        values = {p.name: rng.choice(p.choices) for p in space.parameters}
        steps = space.steps(values)
        recipe = recipe_from_steps(steps)
        recipe.validate(torch_available=True, has_data=True, has_train_data=True)  # raises if impossible
        kinds = [s["type"] for s in steps]
        torch_part = [k for k in kinds if STEPS[k].form.value == "torch"]
        assert kinds[:len(torch_part)] == torch_part  # PyTorch steps first
        if "smooth" in kinds:
            assert kinds[kinds.index("smooth") + 1] == "quantize"
        # round trip through the TOML writer/reader that `builder compress --recipe` uses
        assert Recipe.from_toml_text(recipe.to_toml()).to_dict() == recipe.to_dict()


def test_switched_off_parameters_do_not_change_the_recipe_key():
    options = SpaceOptions(torch_available=True, has_train_data=False, available_steps=ALL)
    space = build_space(options)
    keys = set()
    for ratio, sparsity in itertools.product((0.1, 0.5), (0.3, 0.9)):
        values = {"use_prune_channels": False, "channel_ratio": ratio, "use_prune": False, "sparsity": sparsity,
                  "quant_mode": "dynamic", "per_channel": True, "keep_float": 0}
        keys.add(canonical(space.steps(space.sample(fixed(values)))))
    assert len(keys) == 1
    assert canonical([{"b": 1, "type": "x", "a": 2}]) == canonical([{"a": 2, "type": "x", "b": 1}])


def test_head_pruning_is_offered_only_for_models_with_attention():
    base = dict(torch_available=True, has_train_data=True, available_steps=ALL)
    assert "head_ratio" in _names(SpaceOptions(**base, has_matmul=True))  # a transformer graph
    assert "head_ratio" not in _names(SpaceOptions(**base, has_matmul=True, has_attention=False))
    assert "head_ratio" not in _names(SpaceOptions(**base))  # a CNN
    options = SpaceOptions(**base, has_matmul=True)
    space = build_space(options)
    values = {"use_prune_channels": True, "channel_ratio": 0.3, "head_ratio": 0.25}
    steps = space.steps(space.sample(fixed(values)))
    assert steps[0] == {"type": "prune_channels", "ratio": 0.3, "head_ratio": 0.25}
    built = recipe_from_steps(steps).validate(torch_available=True, has_data=True, has_train_data=True)
    assert built[0].head_fraction == 0.25
    no_heads = space.steps(space.sample(fixed({**values, "head_ratio": 0.0})))
    assert "head_ratio" not in no_heads[0]
    recovered = space.steps(space.sample(fixed({**values, "distill": "recover"})))
    assert recovered[1]["type"] == "distill" and recovered[1]["lr"] < 1e-3  # a transformer's fine-tuning rate
    # prune_channels refuses factorised q/k/v, so an attention model prunes before lowrank in either order
    both = {**values, "use_lowrank": True, "lowrank_energy": 0.9, "torch_order": "lowrank_then_channels"}
    assert [s["type"] for s in space.steps(space.sample(fixed(both)))][:2] == ["prune_channels", "lowrank"]
    cnn = build_space(SpaceOptions(**base))
    assert [s["type"] for s in cnn.steps(cnn.sample(fixed(both)))][:2] == ["lowrank", "prune_channels"]


def test_weight_format_choice_reaches_the_quantize_step():
    options = SpaceOptions(torch_available=False, has_train_data=False, available_steps=ALL, has_matmul=True)
    space = build_space(options)
    assert "weights" in _names(options)
    base = {"use_prune": False, "graph": "none", "quant_mode": "dynamic", "per_channel": True, "keep_float": 0,
            "use_smooth": False}

    def quantize_step(weights: str, mode: str = "dynamic") -> dict:
        steps = space.steps({**base, "quant_mode": mode, "weights": weights})
        return next(s for s in steps if s["type"] == "quantize")

    assert "weight_type" not in quantize_step("int8") and "weight_rounding" not in quantize_step("int8")
    assert quantize_step("uint8")["weight_type"] == "uint8" and "weight_rounding" not in quantize_step("uint8")
    gptq = quantize_step("uint8+gptq")
    assert (gptq["weight_type"], gptq["weight_rounding"]) == ("uint8", "gptq")
    assert quantize_step("uint8+gptq", mode="fp16") == {"type": "quantize", "mode": "fp16"}
    mixed = quantize_step("attention-uint8+gptq")
    assert mixed["weight_types"] == {"Attention": "uint8"} and "weight_type" not in mixed
    assert mixed["weight_rounding"] == "gptq"
    assert "weight_types" not in quantize_step("attention-uint8+gptq", mode="static")  # QDQ: one weight type
    recipe_from_steps([mixed]).validate(torch_available=False, has_data=True, has_train_data=False)
    cnn = SpaceOptions(torch_available=False, has_train_data=False, available_steps=ALL, has_matmul=False)
    assert "attention-uint8+gptq" not in next(p.choices for p in build_space(cnn).parameters if p.name == "weights")
    recipe_from_steps([gptq]).validate(torch_available=False, has_data=True, has_train_data=False)


def test_starting_points_are_valid_recipes_one_per_quantization_mode():
    from builder.search.space import starting_points

    options = SpaceOptions(torch_available=True, has_train_data=False, available_steps=ALL, has_matmul=True)
    space = build_space(options)
    points = starting_points(space)
    names = {p.name for p in space.parameters}
    # one per mode, and dynamic twice on MatMul models (all-uint8 and attention-only uint8 weights)
    assert len(points) == len(next(p.choices for p in space.parameters if p.name == "quant_mode")) + 1
    recipes = [space.steps(space.sample(fixed(point))) for point in points]
    for point, steps in zip(points, recipes):
        assert set(point) == names  # every parameter pinned: the first trials are exactly these
        assert not {s["type"] for s in steps} & {"prune_channels", "lowrank", "prune", "cluster", "distill"}
        recipe_from_steps(steps).validate(torch_available=True, has_data=True, has_train_data=False)
    dynamic = [steps for point, steps in zip(points, recipes) if point["quant_mode"] == "dynamic"]
    assert all([s["type"] for s in d] == ["optimize_graph", "smooth", "quantize"] for d in dynamic)
    assert all(d[-1]["weight_rounding"] == "gptq" for d in dynamic)
    assert [d[-1].get("weight_types") for d in dynamic] == [None, {"Attention": "uint8"}]
    cnn = build_space(SpaceOptions(torch_available=True, has_train_data=False, available_steps=ALL, has_matmul=False))
    for point in starting_points(cnn):  # no MatMuls: fold, no smoothing, int8 weights
        steps = cnn.steps(cnn.sample(fixed(point)))
        if point["quant_mode"] == "int8":  # the class recipe brings its own fold
            assert [s["type"] for s in steps] == ["int8"]
            assert steps[0]["max_kept"] == 0  # no minutes-long sensitivity pass inside one trial
            continue
        assert steps[0]["type"] == "fold" and "smooth" not in {s["type"] for s in steps}
