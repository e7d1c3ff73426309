"""Refactor guard: the search space composed from the steps' own declarations is the one
``builder/search/space.py`` spelled out before the steps carried their search parameters (same trial
parameter names, choices and order, so studies resume under the same name; same recipes for the same
values, same first trials). ``_old_parameters``, ``_old_steps`` and ``_old_starting_points`` are that
code, frozen here as the expected spec."""
from __future__ import annotations

import itertools
import random
from typing import Any, Mapping

import pytest

from builder.compression.steps import STEPS
from builder.search.space import SpaceOptions, build_space, fixed, starting_points

ALL = frozenset(STEPS)


# ---- the expected spec: the hand-written space as it was ---------------------------------------
def _old_parameters(options: SpaceOptions) -> list[tuple[str, tuple[Any, ...]]]:
    have = options.available_steps
    params: list[tuple[str, tuple[Any, ...]]] = []
    attention = options.has_attention if options.has_attention is not None else options.has_matmul

    def usable(step: str) -> bool:
        return step in have and (options.has_train_data or step not in options.training_steps)

    if options.torch_available:
        if usable("distill"):
            params.append(("distill", ("off", "recover", "student")))
        if usable("prune_channels"):
            params.append(("use_prune_channels", (False, True)))
            params.append(("channel_ratio", (0.1, 0.2, 0.3, 0.4, 0.5)))
            if attention:
                params.append(("head_ratio", (0.0, 0.25, 0.5)))
        if usable("lowrank"):
            params.append(("use_lowrank", (False, True)))
            params.append(("lowrank_energy", (0.8, 0.9, 0.95)))
        if usable("prune_channels") and usable("lowrank"):
            params.append(("torch_order", ("channels_then_lowrank", "lowrank_then_channels")))
        if usable("prune"):
            params.append(("use_prune", (False, True)))
            params.append(("sparsity", (0.3, 0.5, 0.7, 0.8, 0.9)))
        if usable("cluster"):
            params.append(("use_cluster", (False, True)))
            params.append(("clusters", (8, 16, 32, 64)))
    elif "prune_onnx" in have:
        params.append(("use_prune", (False, True)))
        params.append(("sparsity", (0.3, 0.5, 0.7)))
    graph_choices: tuple[str, ...] = ("none",) + (("fold",) if "fold" in have else ())
    if "optimize_graph" in have and options.has_matmul:
        graph_choices += ("transformer",)
    if len(graph_choices) > 1:
        params.append(("graph", graph_choices))
    if "quantize" in have:
        params.append(("quant_mode", (("int8",) if "int8" in have else ()) + ("none", "dynamic", "static", "fp16")))
        params.append(("calibration", ("minmax", "entropy", "percentile")))
        params.append(("per_channel", (True, False)))
        params.append(("keep_float", options.keep_float_counts))
        params.append(("weights", ("int8", "uint8", "uint8+gptq")
                       + (("attention-uint8+gptq",) if options.has_matmul else ())))
        if "smooth" in have and options.has_matmul:
            params.append(("use_smooth", (False, True)))
            params.append(("smooth_alpha", (0.5, 0.7, 0.85)))
    return params


def _old_steps(values: Mapping[str, Any], options: SpaceOptions) -> tuple[dict[str, Any], ...]:
    attention = options.has_attention if options.has_attention is not None else options.has_matmul
    steps: list[dict[str, Any]] = []
    if options.torch_available:
        distill = values.get("distill", "off")
        distill_lr = {"lr": 3e-4} if attention else {}
        if distill == "student":
            steps.append({"type": "distill", "width": 0.5, "epochs": 8, **distill_lr})
        structured: list[dict[str, Any]] = []
        if values.get("use_prune_channels"):
            channels: dict[str, Any] = {"type": "prune_channels", "ratio": float(values["channel_ratio"])}
            if attention and float(values.get("head_ratio", 0.0)) > 0:
                channels["head_ratio"] = float(values["head_ratio"])
            structured.append(channels)
        if values.get("use_lowrank"):
            structured.append({"type": "lowrank", "energy": float(values["lowrank_energy"])})
        if values.get("torch_order") == "lowrank_then_channels" and not attention:
            structured.reverse()
        steps += structured
        if distill == "recover" and structured:
            steps.append({"type": "distill", "epochs": 8, **distill_lr})
        if values.get("use_prune"):
            steps.append({"type": "prune", "final_sparsity": float(values["sparsity"])})
        if values.get("use_cluster"):
            steps.append({"type": "cluster", "clusters": int(values["clusters"])})
    elif values.get("use_prune"):
        steps.append({"type": "prune_onnx", "sparsity": float(values["sparsity"])})
    graph = values.get("graph", "none")
    mode = values.get("quant_mode", "none")
    if mode == "int8":
        steps.append({"type": "int8", **dict(options.target_cpu or {}), "max_kept": 0})  # no sensitivity pass per trial
        return tuple(steps)
    if graph == "fold":
        steps.append({"type": "fold"})
    elif graph == "transformer":
        steps.append({"type": "optimize_graph", "level": "basic", "bert_fusions": True})
    if mode in ("dynamic", "static"):
        if values.get("use_smooth"):
            steps.append({"type": "smooth", "alpha": float(values["smooth_alpha"])})
        quant: dict[str, Any] = {"type": "quantize", "mode": mode, "per_channel": bool(values.get("per_channel", True))}
        weights = str(values.get("weights", "int8"))
        if weights == "attention-uint8+gptq":
            if mode == "dynamic":
                quant["weight_types"] = {"Attention": "uint8"}
        elif weights != "int8":
            quant["weight_type"] = "uint8"
        if weights.endswith("+gptq"):
            quant["weight_rounding"] = "gptq"
        if mode == "static":
            quant["calibration"] = str(values.get("calibration", "minmax"))
        if int(values.get("keep_float", 0)) > 0:
            quant["max_kept"] = int(values["keep_float"])
            quant["target_cosine"] = 0.9999
        steps.append(quant)
    elif mode == "fp16":
        steps.append({"type": "quantize", "mode": "fp16"})
    if not steps:
        if "fold" not in options.available_steps:
            return ()
        steps.append({"type": "fold"})
    return tuple(steps)


def _old_starting_points(parameters: list[tuple[str, tuple[Any, ...]]], options: SpaceOptions) -> list[dict[str, Any]]:
    choices = dict(parameters)
    if not choices:
        return []
    matmul = options.has_matmul
    base: dict[str, Any] = {}
    for name, values in choices.items():
        if name.startswith("use_") or name == "distill":
            base[name] = False if name.startswith("use_") else "off"
        else:
            base[name] = values[0]
    if "graph" in choices:
        graph = "transformer" if matmul and "transformer" in choices["graph"] else "fold"
        base["graph"] = graph if graph in choices["graph"] else "none"
    points = []
    modes = list(choices.get("quant_mode", ("none",)))
    if options.conv_heavy and "int8" in modes:
        modes.remove("dynamic")
    for mode in modes:
        point = dict(base, quant_mode=mode)
        if mode in ("dynamic", "static"):
            point.update(per_channel=True, keep_float=0, calibration="minmax")
            if matmul and "use_smooth" in choices:
                point.update(use_smooth=True, smooth_alpha=0.85)
            if matmul and "weights" in choices:
                point["weights"] = "uint8+gptq"
        points.append({k: v for k, v in point.items() if k in choices and v in choices[k]})
        if mode == "dynamic" and matmul and "attention-uint8+gptq" in choices.get("weights", ()):
            points.append(dict(points[-1], weights="attention-uint8+gptq"))
    return points


# ---- the option combinations a search meets ----------------------------------------------------
def _option_sets() -> list[SpaceOptions]:
    subsets = [ALL, ALL - {"int8"}, ALL - {"smooth", "optimize_graph"}, ALL - {"fold"}, ALL - {"quantize"},
               ALL - {"prune_channels"}, ALL - {"lowrank"}, frozenset({"prune", "cluster", "fold"}), frozenset()]
    out = []
    for steps, torch_available, train, matmul, attention, conv_heavy in itertools.product(
            subsets, (True, False), (True, False), (True, False), (None, False, True), (False, True)):
        out.append(SpaceOptions(torch_available=torch_available, has_train_data=train, available_steps=steps,
                                has_matmul=matmul, has_attention=attention, conv_heavy=conv_heavy,
                                target_cpu={"arch": "aarch64", "dot_product": False} if matmul else None))
    out.append(SpaceOptions(torch_available=True, has_train_data=False, available_steps=ALL,
                            training_steps=frozenset({"distill", "prune", "lowrank"}), keep_float_counts=(0, 2)))
    return out


def test_parameters_keep_their_names_choices_and_order():
    for options in _option_sets():
        composed = [(p.name, tuple(p.choices)) for p in build_space(options).parameters]
        assert composed == _old_parameters(options), options


def test_full_space_for_a_transformer_with_training_data_is_spelled_out():
    """The whole grid for the widest case, written out: the trial names a stored study knows."""
    options = SpaceOptions(torch_available=True, has_train_data=True, available_steps=ALL, has_matmul=True)
    assert [(p.name, tuple(p.choices)) for p in build_space(options).parameters] == [
        ("distill", ("off", "recover", "student")),
        ("use_prune_channels", (False, True)), ("channel_ratio", (0.1, 0.2, 0.3, 0.4, 0.5)),
        ("head_ratio", (0.0, 0.25, 0.5)),
        ("use_lowrank", (False, True)), ("lowrank_energy", (0.8, 0.9, 0.95)),
        ("torch_order", ("channels_then_lowrank", "lowrank_then_channels")),
        ("use_prune", (False, True)), ("sparsity", (0.3, 0.5, 0.7, 0.8, 0.9)),
        ("use_cluster", (False, True)), ("clusters", (8, 16, 32, 64)),
        ("graph", ("none", "fold", "transformer")),
        ("quant_mode", ("int8", "none", "dynamic", "static", "fp16")),
        ("calibration", ("minmax", "entropy", "percentile")), ("per_channel", (True, False)),
        ("keep_float", (0, 1, 2, 4, 8)), ("weights", ("int8", "uint8", "uint8+gptq", "attention-uint8+gptq")),
        ("use_smooth", (False, True)), ("smooth_alpha", (0.5, 0.7, 0.85)),
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_assembled_recipes_match_the_hand_written_order(seed: int):
    rng = random.Random(seed)
    for options in _option_sets():
        space = build_space(options)
        for _ in range(60):
            values = {p.name: rng.choice(p.choices) for p in space.parameters}
            assert space.steps(values) == _old_steps(values, options), (options, values)
            assert space.steps(space.sample(fixed(values))) == _old_steps(values, options)


def test_starting_points_are_the_hand_written_designed_experiment():
    for options in _option_sets():
        space = build_space(options)
        expected = _old_starting_points([(p.name, tuple(p.choices)) for p in space.parameters], options)
        assert starting_points(space) == expected, options


def test_contradictory_declared_orders_are_refused_by_name():
    from dataclasses import dataclass
    from typing import ClassVar

    from builder.compression.base import CompressionStep, ModelForm, SearchEntry, SearchParam, StepOrder
    from builder.errors import SearchError

    @dataclass(frozen=True)
    class _Toy(CompressionStep):
        name: ClassVar[str] = "toy"
        form: ClassVar[ModelForm] = ModelForm.ONNX
        order: ClassVar[StepOrder] = StepOrder(after=("quantize",))  # but quantize must be last

        @classmethod
        def search_params(cls, options: SpaceOptions) -> tuple[SearchParam, ...]:
            return (SearchParam("use_toy", (False, True)),)

        @classmethod
        def search_entries(cls, values: Mapping[str, Any], options: SpaceOptions) -> tuple[SearchEntry, ...]:
            return (SearchEntry(),) if values.get("use_toy") else ()

        def apply(self, state, ctx):  # never run here
            raise NotImplementedError

    registry = {**STEPS, "toy": _Toy}
    options = SpaceOptions(torch_available=False, has_train_data=False, available_steps=frozenset(registry))
    space = build_space(options, registry)
    assert space.steps(space.sample(fixed({"use_toy": True, "quant_mode": "none"}))) == ({"type": "toy"},)
    with pytest.raises(SearchError, match="toy"):
        space.steps(space.sample(fixed({"use_toy": True, "quant_mode": "fp16"})))
