"""The recipe search space: which techniques, in which order, with which parameters → a ``Recipe``.

Composed from the steps' own declarations (``builder.compression.base.CompressionStep``): each
registered step (``builder.compression.steps.STEPS``, in registry order) adds its trial parameters
(``search_params``), turns a point of the space into its recipe step (``search_entries``) and says
where that step goes (``order``); this module only merges and orders them. Adding a technique to the
search is its own module's business (``docs/architecture.md``, "Adding a compression technique").

The space is *static* (every trial suggests every parameter, irrelevant ones are ignored when the
recipe is assembled) because NSGA-II's crossover works on a fixed set of parameters; the recipe's
canonical form drops what is switched off, so two trials that differ only in ignored parameters hit
the same cache entry. Only applicable techniques enter the space: PyTorch steps only when the model
has a PyTorch module, steps that train only with ``--train-data`` (``SpaceOptions.usable``), and
whatever a step's own rule adds (removing attention heads only for models with attention,
``prune_onnx`` only for ONNX-only models, transformer fusions and smoothing only for MatMul models).

Parameters are discrete grids (a handful of values each) so that repeated candidates are common and
cheap (cache) and the study stays small enough for a 30-minute budget. The trial parameters' names,
choices and order are what a stored study knows (``default_study_name`` hashes them): keep them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

from builder.compression.base import CompressionStep, ModelForm, SearchEntry, SearchParam, SpaceOptions, StepOrder
from builder.errors import SearchError

__all__ = ["SearchSpace", "SpaceOptions", "Suggester", "assemble_steps", "build_space", "canonical", "describe",
           "fixed", "recipe_from_steps", "starting_points"]

Registry = Mapping[str, type[CompressionStep]]


class Suggester(Protocol):
    """The part of ``optuna.Trial`` the space uses (a fixed dict implements it in tests)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class SearchSpace:
    """The parameters and the steps that turn their values into recipe steps."""

    options: SpaceOptions
    parameters: tuple[SearchParam, ...] = field(default_factory=tuple)
    # the registered steps the model can take, in registry order (they propose the recipe steps)
    techniques: tuple[type[CompressionStep], ...] = field(default_factory=tuple)

    def sample(self, trial: Suggester) -> dict[str, Any]:
        return {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in self.parameters}

    def steps(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
        """Recipe steps (``{"type": ..., **params}``) for one point of the space, in engine order."""
        return _assemble(values, self.options, self.techniques)


def _registry(steps: Optional[Registry]) -> Registry:
    if steps is not None:
        return steps
    from builder.compression.steps import STEPS

    return STEPS


def _techniques(options: SpaceOptions, steps: Optional[Registry]) -> tuple[type[CompressionStep], ...]:
    """Registered steps the model can take: in ``available_steps``, PyTorch ones only with a PyTorch module."""
    return tuple(cls for name, cls in _registry(steps).items() if name in options.available_steps
                 and (cls.form is not ModelForm.TORCH or options.torch_available))


def build_space(options: SpaceOptions, steps: Optional[Registry] = None) -> SearchSpace:
    """The parameter grid for the applicable techniques (see the module docstring). Parameters that
    several steps declare under one name are one parameter, their choices merged in registry order."""
    techniques = _techniques(options, steps)
    merged: dict[str, SearchParam] = {}
    for cls in techniques:
        if not options.usable(cls.name):
            continue
        for param in cls.search_params(options):
            known = merged.get(param.name)
            if known is None:
                merged[param.name] = param
                continue
            choices = known.choices + tuple(c for c in param.choices if c not in known.choices)
            start = param.start if param.start is not None else known.start
            merged[param.name] = SearchParam(param.name, choices, start)
    return SearchSpace(options=options, parameters=tuple(merged.values()), techniques=techniques)


def starting_points(space: SearchSpace) -> list[dict[str, Any]]:
    """The study's first trials: a small designed experiment before the sampler takes over.

    Every parameter at its start (techniques off, the graph rewrite that fits the model: transformer
    fusions for MatMul models, else fold), changed by the steps' ``search_starting_points``: the
    quantize step's are one point per ``quant_mode`` — first the engine's class recipe (``int8``: what
    ``--quantize int8`` does for this model and the profile's CPU), then each mode at the engine's
    recommended settings (dynamic int8 left out for Conv-heavy models): for int8 modes per-channel
    weights and, on MatMul models, smoothing 0.85 with uint8 weights rounded by GPTQ (what measured
    most faithful on MiniLM) and, for dynamic int8, a second point with uint8 only for the fused
    attention (faster, slightly less faithful) — plus the graph step alone. With no step's points, the
    start alone. NSGA-II's random first generation rarely lands on such combinations in a 30-minute
    budget (every technique has its own coin); starting from them, the search spends its
    trials improving on known-good recipes instead of rediscovering them.
    """
    choices = {p.name: p.choices for p in space.parameters}
    if not choices:
        return []
    base = {p.name: p.start if p.start is not None and p.start in p.choices else p.choices[0]
            for p in space.parameters}
    points = [point for cls in space.techniques
              for point in cls.search_starting_points(base, choices, space.options)] or [base]
    return [{k: v for k, v in point.items() if k in choices and v in choices[k]} for point in points]


def assemble_steps(values: Mapping[str, Any], options: SpaceOptions,
                   steps: Optional[Registry] = None) -> tuple[dict[str, Any], ...]:
    """Turn parameter values into ordered recipe steps; switched-off techniques are left out.

    Each step proposes its entries; those a proposed step ``replaces`` are left out; the rest are
    ordered by the steps' ``order`` (PyTorch steps always before ONNX steps; ties in registry order).
    With no technique switched on the recipe is the first step's ``search_fallback`` (``fold`` when
    the engine has it), else empty (the original model).
    """
    return _assemble(values, options, _techniques(options, steps))


@dataclass(frozen=True)
class _Placed:
    step: type[CompressionStep]
    entry: SearchEntry

    @property
    def order(self) -> StepOrder:
        return self.entry.order if self.entry.order is not None else self.step.order

    def precedes(self, other: "_Placed") -> bool:
        mine, theirs = self.order, other.order
        return ((self.step.form is ModelForm.TORCH and other.step.form is ModelForm.ONNX)
                or other.step.name in mine.before or self.step.name in theirs.after
                or (mine.first and not theirs.first) or (theirs.last and not mine.last))


def _assemble(values: Mapping[str, Any], options: SpaceOptions,
              techniques: Sequence[type[CompressionStep]]) -> tuple[dict[str, Any], ...]:
    placed = [_Placed(cls, entry) for cls in techniques for entry in cls.search_entries(values, options)]
    replaced = {name for p in placed for name in p.order.replaces}
    placed = [p for p in placed if p.step.name not in replaced]
    if not placed:
        fallbacks = [_Placed(cls, entry) for cls in techniques if (entry := cls.search_fallback(options)) is not None]
        placed = fallbacks[:1]
    ordered: list[_Placed] = []
    while placed:  # a stable topological sort: the first entry (registry order) that nothing left precedes
        ready = next((p for p in placed if not any(q is not p and q.precedes(p) for q in placed)), None)
        if ready is None:
            raise SearchError(f"the steps' declared orders contradict each other: "
                              f"{', '.join(p.step.name for p in placed)}")
        ordered.append(ready)
        placed.remove(ready)
    return tuple({"type": p.step.name, **dict(p.entry.params)} for p in ordered)


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
