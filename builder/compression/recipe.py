"""Recipes: an ordered list of steps with parameters, read from and written to TOML.

```toml
name = "digits-small"          # optional
[[step]]
type = "prune_channels"        # a key of builder.compression.steps.STEPS
ratio = 0.5                    # the step's parameters (its dataclass fields)
[[step]]
type = "quantize"
mode = "static"
```
``Recipe.validate`` refuses impossible recipes before anything runs: unknown steps, bad parameters,
a PyTorch step after an ONNX step, a PyTorch step on an ONNX-only model, a step that needs
``--data`` / ``--train-data`` without it. ``Recipe.to_toml`` writes a recipe back (the optimizer
saves the recipes it chose this way).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from builder.compression.base import CompressionStep, ModelForm
from builder.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# --quantize NAME -> (step, parameters). "int8" is the best int8 the engine knows for the model's
# class and the target CPU (builder.compression.int8_auto); the others force one mode.
QUANTIZE_SHORTCUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("int8", {}),
    "int8-static": ("quantize", {"mode": "static", "per_channel": True, "calibration": "minmax"}),
    "int8-dynamic": ("quantize", {"mode": "dynamic", "per_channel": True}),
    "fp16": ("quantize", {"mode": "fp16"}),
}


PACKAGED_RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # shipped as package data


def packaged_recipe_names() -> list[str]:
    """Names of the recipes shipped in the package (``builder/recipes/NAME.toml``)."""
    return sorted(p.stem for p in PACKAGED_RECIPES_DIR.glob("*.toml"))


def resolve_recipe(arg: str | Path) -> Path:
    """``--recipe`` value as a file: an existing path, else a packaged recipe's name
    (``sparse-clustered`` -> ``builder/recipes/sparse-clustered.toml``); else a one-line error
    listing the packaged names."""
    path = Path(arg)
    if path.is_file():
        return path
    text = str(arg)
    name = text[:-5] if text.endswith(".toml") and "/" not in text else text
    candidate = PACKAGED_RECIPES_DIR / f"{name}.toml"
    if "/" not in name and candidate.is_file():
        return candidate
    raise UsageError(f"--recipe {text}: no such file and no packaged recipe of that name; packaged recipes: "
                     f"{', '.join(packaged_recipe_names())}")


@dataclass(frozen=True)
class StepSpec:
    """One recipe entry: the step's registry name and its parameters (as written in TOML)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[StepSpec, ...]
    name: str = ""

    # ---- reading -------------------------------------------------------------------------------
    @staticmethod
    def from_toml(path: Path) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read recipe {path}: {exc.strerror}; pass an existing TOML file") from exc
        return Recipe.from_toml_text(text, origin=str(path))

    @staticmethod
    def from_toml_text(text: str, origin: str = "recipe") -> "Recipe":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{origin} is not valid TOML: {exc}") from exc
        return Recipe.from_dict(doc, origin)

    @staticmethod
    def from_dict(doc: Mapping[str, Any], origin: str = "recipe") -> "Recipe":
        unknown = sorted(set(doc) - {"name", "description", "step"})
        if unknown:
            raise UsageError(f"{origin}: unknown top-level keys {unknown}; a recipe has 'name' and [[step]] tables")
        tables = doc.get("step", [])
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise UsageError(f"{origin}: steps must be [[step]] tables")
        if not tables:
            raise UsageError(f"{origin}: no [[step]] tables; add at least one step")
        specs = []
        for index, table in enumerate(tables, start=1):
            if "type" not in table:
                raise UsageError(f"{origin}: step {index} has no 'type'; e.g. type = \"prune\"")
            params = {k: v for k, v in table.items() if k != "type"}
            specs.append(StepSpec(str(table["type"]), params))
        return Recipe(tuple(specs), name=str(doc.get("name", "")))

    @staticmethod
    def from_shortcuts(quantize: Optional[str] = None, prune: Optional[float] = None,
                       prune_channels: Optional[float] = None, cluster: Optional[int] = None,
                       distill_from: Optional[str] = None, lowrank: Optional[float] = None,
                       torch_available: bool = True, target_cpu: Optional[Mapping[str, Any]] = None) -> "Recipe":
        """The CLI's shortcut flags as a recipe, in a sensible order: distillation, structured
        pruning, low-rank, unstructured pruning, clustering (PyTorch), then quantization (ONNX).
        For an ONNX-only model (``torch_available=False``) ``prune`` maps to ``prune_onnx``.
        ``target_cpu`` (``{"arch": ..., "dot_product": ...}``, from a device profile) tells ``int8`` which
        CPU to choose op formats for; None = this host."""
        specs: list[StepSpec] = []
        if distill_from is not None:
            specs.append(StepSpec("distill", {"teacher": distill_from}))
        if prune_channels is not None:
            specs.append(StepSpec("prune_channels", {"ratio": float(prune_channels)}))
        if lowrank is not None:
            specs.append(StepSpec("lowrank", {"energy": float(lowrank)}))
        if prune is not None and not torch_available:
            specs.append(StepSpec("prune_onnx", {"sparsity": float(prune)}))
        elif prune is not None:
            specs.append(StepSpec("prune", {"final_sparsity": float(prune)}))
        if cluster is not None:
            specs.append(StepSpec("cluster", {"clusters": int(cluster)}))
        if quantize is not None:
            if quantize not in QUANTIZE_SHORTCUTS:
                raise UsageError(f"unknown --quantize '{quantize}'; use one of {sorted(QUANTIZE_SHORTCUTS)}")
            step, params = QUANTIZE_SHORTCUTS[quantize]
            params = dict(params)
            if step == "int8" and target_cpu:
                params.update({k: v for k, v in target_cpu.items() if k in ("arch", "dot_product")})
            specs.append(StepSpec(step, params))
        if not specs:
            raise UsageError("nothing to do: pass --recipe or a shortcut (--quantize, --prune, --prune-channels, "
                             "--cluster, --lowrank, --distill-from)")
        return Recipe(tuple(specs), name="shortcuts")

    # ---- writing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name} if self.name else {}
        doc["step"] = [{"type": spec.name, **{k: _plain(v) for k, v in spec.params.items() if v is not None}} for spec in self.steps]
        return doc

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def write_toml(self, path: Path) -> Path:
        import os
        import tempfile

        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_toml())
        os.replace(tmp, path)
        return path

    # ---- checking ------------------------------------------------------------------------------
    def build_steps(self) -> list[CompressionStep]:
        """Instantiate every step (checks names and parameters); raises UsageError on the first bad one."""
        from builder.compression.steps import STEPS

        built = []
        for index, spec in enumerate(self.steps, start=1):
            cls = STEPS.get(spec.name)
            if cls is None:
                raise UsageError(f"step {index}: unknown step type '{spec.name}'; available: {', '.join(sorted(STEPS))}")
            fields: set[str] = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
            bad = sorted(set(spec.params) - fields) if fields else []
            if bad:
                raise UsageError(f"step {index} ({spec.name}): unknown parameter(s) {bad}; "
                                 f"allowed: {', '.join(sorted(fields)) or 'none'}")
            try:
                built.append(cls(**dict(spec.params)))
            except UsageError as exc:
                raise UsageError(f"step {index} ({spec.name}): {exc}") from exc
            except (TypeError, ValueError) as exc:
                raise UsageError(f"step {index} ({spec.name}): bad parameters: {exc}") from exc
        return built

    def validate(self, *, torch_available: bool, has_data: bool, has_train_data: bool) -> list[CompressionStep]:
        """Build the steps and refuse impossible recipes; returns the step objects in order."""
        steps = self.build_steps()
        seen_onnx: Optional[str] = None
        for index, step in enumerate(steps, start=1):
            label = f"step {index} ({step.name})"
            if step.form is ModelForm.TORCH:
                if not torch_available:
                    raise UsageError(f"{label} needs the PyTorch model, but this model is ONNX-only; load it from "
                                     "a PyTorch source (package.module:factory or TorchScript) or use 'prune_onnx'")
                if seen_onnx is not None:
                    raise UsageError(f"{label} works on the PyTorch model but comes after ONNX step '{seen_onnx}'; "
                                     "put PyTorch steps (prune, prune_channels, cluster, distill, lowrank) first")
            else:
                seen_onnx = seen_onnx or step.name
            if step.requires_data() and not has_data:
                raise UsageError(f"{label} needs evaluation/calibration data; pass --data")
            if step.requires_train_data() and not has_train_data:
                raise UsageError(f"{label} trains the model; pass --train-data (or set epochs = 0 where allowed)")
        return steps


def _plain(value: Any) -> Any:
    """TOML-friendly copy: tuples become lists, nested mappings stay mappings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
