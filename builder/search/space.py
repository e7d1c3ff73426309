"""The recipe search space: which techniques, in which order, with which parameters → a ``Recipe``.

The space is *static* (every trial suggests every parameter, irrelevant ones are ignored when the
recipe is assembled) because NSGA-II's crossover works on a fixed set of parameters; the recipe's
canonical form drops what is switched off, so two trials that differ only in ignored parameters hit
the same cache entry. Only applicable techniques enter the space:

* PyTorch steps (distill, prune_channels, lowrank, prune, cluster) only when the model has a
  PyTorch module, and steps that train only with ``--train-data``; removing whole attention heads
  (``prune_channels``' ``head_ratio``) only for models with attention;
* ``prune_onnx`` for ONNX-only models;
* graph steps (fold, smooth, quantize) only when the engine registers them; transformer fusions and
  activation smoothing only for models with MatMuls, smoothing only before int8 quantization.

Parameters are discrete grids (a handful of values each) so that repeated candidates are common and
cheap (cache) and the study stays small enough for a 30-minute budget.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

TORCH_ORDERS = ("channels_then_lowrank", "lowrank_then_channels")
QUANT_MODES = ("none", "dynamic", "static", "fp16")
# "int8": the engine's best int8 for the model's class and the target CPU (builder.compression.int8_auto);
# it brings its own graph steps (fold / transformer fusions, smoothing) and picks its own settings.
AUTO_INT8 = "int8"
# "recover": distil the compressed model from the original after structural steps;
# "student": start from a half-width student derived from the teacher's weights.
DISTILL_MODES = ("off", "recover", "student")
DISTILL_EPOCHS = 8
KEEP_FLOAT_TARGET_COSINE = 0.9999
HEAD_RATIOS = (0.0, 0.25, 0.5)  # fraction of attention heads removed with prune_channels
# distill's default lr (3e-3) suits small CNNs; Adam at that rate wrecks a pretrained transformer
# (prune_channels' DEFAULT_TRANSFORMER_LR, measured on MiniLM).
TRANSFORMER_DISTILL_LR = 3e-4
CALIBRATIONS = ("minmax", "entropy", "percentile")
# int8 weight storage and rounding: uint8 (asymmetric per column) suits smoothed, skewed weights;
# GPTQ re-rounds them against the calibration data (builder.compression.gptq).
WEIGHT_FORMATS = ("int8", "uint8", "uint8+gptq")
# MatMul models, dynamic mode: uint8 only for the fused attention, int8 (the faster U8S8 kernels
# without VNNI) for the other MatMuls. MiniLM: 1.36x fp32 vs 1.24x for all-uint8, NN 95.0% vs 96.3%.
MIXED_WEIGHTS = "attention-uint8+gptq"


@dataclass(frozen=True)
class SpaceOptions:
    """What the model and the user's inputs make applicable."""

    torch_available: bool
    has_train_data: bool
    available_steps: frozenset[str]
    has_matmul: bool = False
    # Attention modules whose heads prune_channels can remove; None: assumed when the graph has MatMuls
    # (a transformer), the evaluator does not probe the PyTorch module for it.
    has_attention: Optional[bool] = None
    # Steps whose default parameters train (so they need --train-data); probed from the engine.
    training_steps: frozenset[str] = frozenset({"distill"})
    keep_float_counts: tuple[int, ...] = (0, 1, 2, 4, 8)
    conv_heavy: bool = False  # Conv holds most weights: dynamic int8 (ConvInteger) is a known trap there
    # the device profile's CPU, for the int8 step's op formats: {"arch": "aarch64", "dot_product": False}
    target_cpu: Optional[Mapping[str, Any]] = None


class Suggester(Protocol):
    """The part of ``optuna.Trial`` the space uses (a fixed dict implements it in tests)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Choice:
    name: str
    choices: tuple[Any, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The parameters and the rule that turns their values into recipe steps."""

    options: SpaceOptions
    parameters: tuple[Choice, ...] = field(default_factory=tuple)

    def sample(self, trial: Suggester) -> dict[str, Any]:
        return {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in self.parameters}

    def steps(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
        """Recipe steps (``{"type": ..., **params}``) for one point of the space, in engine order."""
        return assemble_steps(values, self.options)


def build_space(options: SpaceOptions) -> SearchSpace:
    """The parameter grid for the applicable techniques (see the module docstring)."""
    have = options.available_steps
    params: list[Choice] = []

    def usable(step: str) -> bool:
        return step in have and (options.has_train_data or step not in options.training_steps)

    # Each technique has its own on/off switch (a fair coin for a random start) and its parameter.
    if options.torch_available:
        if usable("distill"):
            params.append(Choice("distill", DISTILL_MODES))
        if usable("prune_channels"):
            params.append(Choice("use_prune_channels", (False, True)))
            params.append(Choice("channel_ratio", (0.1, 0.2, 0.3, 0.4, 0.5)))
            if _attention(options):
                params.append(Choice("head_ratio", HEAD_RATIOS))
        if usable("lowrank"):
            params.append(Choice("use_lowrank", (False, True)))
            params.append(Choice("lowrank_energy", (0.8, 0.9, 0.95)))
        if usable("prune_channels") and usable("lowrank"):
            params.append(Choice("torch_order", TORCH_ORDERS))
        if usable("prune"):
            params.append(Choice("use_prune", (False, True)))
            params.append(Choice("sparsity", (0.3, 0.5, 0.7, 0.8, 0.9)))
        if usable("cluster"):
            params.append(Choice("use_cluster", (False, True)))
            params.append(Choice("clusters", (8, 16, 32, 64)))
    elif "prune_onnx" in have:
        params.append(Choice("use_prune", (False, True)))
        params.append(Choice("sparsity", (0.3, 0.5, 0.7)))
    graph_choices = ("none",) + (("fold",) if "fold" in have else ())
    if "optimize_graph" in have and options.has_matmul:
        graph_choices += ("transformer",)
    if len(graph_choices) > 1:
        params.append(Choice("graph", graph_choices))
    if "quantize" in have:
        params.append(Choice("quant_mode", ((AUTO_INT8,) if AUTO_INT8 in have else ()) + QUANT_MODES))
        params.append(Choice("calibration", CALIBRATIONS))
        params.append(Choice("per_channel", (True, False)))
        params.append(Choice("keep_float", options.keep_float_counts))
        params.append(Choice("weights", WEIGHT_FORMATS + ((MIXED_WEIGHTS,) if options.has_matmul else ())))
        if "smooth" in have and options.has_matmul:
            params.append(Choice("use_smooth", (False, True)))
            params.append(Choice("smooth_alpha", (0.5, 0.7, 0.85)))
    return SearchSpace(options=options, parameters=tuple(params))


def starting_points(space: SearchSpace) -> list[dict[str, Any]]:
    """The study's first trials: a small designed experiment before the sampler takes over.

    First the engine's class recipe (``int8``: what ``--quantize int8`` does for this model and the
    profile's CPU), then one point per quantization mode at the engine's recommended settings and nothing else switched
    on (dynamic int8 left out for Conv-heavy models) — the graph step that fits the model (transformer fusions for MatMul models, else fold),
    for int8 modes per-channel weights and, on MatMul models, smoothing 0.85 with uint8 weights
    rounded by GPTQ (what measured most faithful on MiniLM) and, for dynamic int8, a second point
    with uint8 only for the fused attention (faster, slightly less faithful) — plus the graph step alone. NSGA-II's random
    first generation rarely lands on such combinations in a 30-minute budget (every technique has
    its own coin); starting from them, the search spends its trials improving on known-good
    recipes instead of rediscovering them.
    """
    choices = {p.name: p.choices for p in space.parameters}
    if not choices:
        return []
    matmul = space.options.has_matmul
    base: dict[str, Any] = {}
    for name, options in choices.items():
        if name.startswith("use_") or name == "distill":
            base[name] = False if name.startswith("use_") else "off"
        else:
            base[name] = options[0]
    if "graph" in choices:
        graph = "transformer" if matmul and "transformer" in choices["graph"] else "fold"
        base["graph"] = graph if graph in choices["graph"] else "none"
    points = []
    modes = list(choices.get("quant_mode", ("none",)))
    if space.options.conv_heavy and AUTO_INT8 in modes:
        modes.remove("dynamic")  # ConvInteger: ~8x slower than float on an EfficientNet-class CNN
    for mode in modes:
        point = dict(base, quant_mode=mode)
        if mode in ("dynamic", "static"):
            point.update(per_channel=True, keep_float=0, calibration="minmax")
            if matmul and "use_smooth" in choices:
                point.update(use_smooth=True, smooth_alpha=0.85)
            if matmul and "weights" in choices:
                point["weights"] = "uint8+gptq"
        points.append({k: v for k, v in point.items() if k in choices and v in choices[k]})
        if mode == "dynamic" and matmul and MIXED_WEIGHTS in choices.get("weights", ()):
            points.append(dict(points[-1], weights=MIXED_WEIGHTS))  # the faster of the two measured formats
    return points


def assemble_steps(values: Mapping[str, Any], options: SpaceOptions) -> tuple[dict[str, Any], ...]:
    """Turn parameter values into ordered recipe steps; switched-off techniques are left out.

    Order: a distilled half-width student, structured pruning and low-rank (in the searched order),
    distillation from the original to recover accuracy, unstructured pruning, clustering (PyTorch), then fold, smooth, quantize (ONNX). With no technique switched on the
    recipe is just ``fold`` when the engine has it, else empty (the original model).
    """
    steps: list[dict[str, Any]] = []
    if options.torch_available:
        distill = values.get("distill", "off")
        distill_lr = {"lr": TRANSFORMER_DISTILL_LR} if _attention(options) else {}
        if distill == "student":
            steps.append({"type": "distill", "width": 0.5, "epochs": DISTILL_EPOCHS, **distill_lr})
        structured: list[dict[str, Any]] = []
        if values.get("use_prune_channels"):
            channels: dict[str, Any] = {"type": "prune_channels", "ratio": float(values["channel_ratio"])}
            if _attention(options) and float(values.get("head_ratio", 0.0)) > 0:
                channels["head_ratio"] = float(values["head_ratio"])
            structured.append(channels)
        if values.get("use_lowrank"):
            structured.append({"type": "lowrank", "energy": float(values["lowrank_energy"])})
        # Attention models prune before factorising: prune_channels refuses factorised q/k/v.
        if values.get("torch_order") == "lowrank_then_channels" and not _attention(options):
            structured.reverse()
        steps += structured
        if distill == "recover" and structured:
            steps.append({"type": "distill", "epochs": DISTILL_EPOCHS, **distill_lr})
        if values.get("use_prune"):
            steps.append({"type": "prune", "final_sparsity": float(values["sparsity"])})
        if values.get("use_cluster"):
            steps.append({"type": "cluster", "clusters": int(values["clusters"])})
    elif values.get("use_prune"):
        steps.append({"type": "prune_onnx", "sparsity": float(values["sparsity"])})
    graph = values.get("graph", "none")
    mode = values.get("quant_mode", "none")
    if mode == AUTO_INT8:  # brings its own fold / fusions / smoothing
        steps.append({"type": AUTO_INT8, **dict(options.target_cpu or {})})
        return tuple(steps)
    if graph == "fold":
        steps.append({"type": "fold"})
    elif graph == "transformer":  # ORT's BERT fusions (attention, LayerNorm, GELU); heads/hidden detected
        steps.append({"type": "optimize_graph", "level": "basic", "bert_fusions": True})
    if mode in ("dynamic", "static"):
        if values.get("use_smooth"):
            steps.append({"type": "smooth", "alpha": float(values["smooth_alpha"])})
        quant: dict[str, Any] = {"type": "quantize", "mode": mode, "per_channel": bool(values.get("per_channel", True))}
        weights = str(values.get("weights", "int8"))
        if weights == MIXED_WEIGHTS:  # static QDQ takes one weight type: int8 there
            if mode == "dynamic":
                quant["weight_types"] = {"Attention": "uint8"}
        elif weights != "int8":  # the step's defaults (int8, nearest) stay implicit: same cache key as before
            quant["weight_type"] = "uint8"
        if weights.endswith("+gptq"):
            quant["weight_rounding"] = "gptq"
        if mode == "static":
            quant["calibration"] = str(values.get("calibration", "minmax"))
        if int(values.get("keep_float", 0)) > 0:
            # The engine keeps the most sensitive weighted nodes in float, one at a time, until the
            # target holds or max_kept are kept: a near-perfect target makes the count the knob.
            quant["max_kept"] = int(values["keep_float"])
            quant["target_cosine"] = KEEP_FLOAT_TARGET_COSINE
        steps.append(quant)
    elif mode == "fp16":
        steps.append({"type": "quantize", "mode": "fp16"})
    if not steps:
        fallback = "fold" if "fold" in options.available_steps else None
        if fallback is None:
            return ()
        steps.append({"type": fallback})
    return tuple(steps)


def _attention(options: SpaceOptions) -> bool:
    return options.has_attention if options.has_attention is not None else options.has_matmul


def canonical(steps: Sequence[Mapping[str, Any]]) -> str:
    """One string per distinct recipe (key order and float formatting normalised): the cache key part."""
    return json.dumps([{k: step[k] for k in sorted(step)} for step in steps], sort_keys=True,
                      separators=(",", ":"), default=str)


def describe(steps: Sequence[Mapping[str, Any]]) -> str:
    """Short human form, e.g. ``prune_channels(ratio=0.3) → quantize(mode=static, calibration=entropy)``."""
    if not steps:
        return "(original model)"
    parts = []
    for step in steps:
        params = ", ".join(f"{k}={v}" for k, v in step.items() if k != "type")
        parts.append(f"{step['type']}({params})" if params else str(step["type"]))
    return " → ".join(parts)


def recipe_from_steps(steps: Sequence[Mapping[str, Any]], name: str = "optimized") -> Any:
    """The engine's ``Recipe`` for these steps (its TOML writer is what ``builder compress`` reads)."""
    from builder.compression.recipe import Recipe, StepSpec

    return Recipe(tuple(StepSpec(str(s["type"]), {k: v for k, v in s.items() if k != "type"}) for s in steps), name=name)


def fixed(values: Mapping[str, Any]) -> Suggester:
    """A suggester that returns given values (tests, re-evaluating a known point)."""

    class _Fixed:
        def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
            return values[name] if name in values else choices[0]

    return _Fixed()
