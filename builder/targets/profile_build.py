"""``build_for_profile``: everything ``builder build`` does, as one function (``builder push`` calls
it too): resolve runtime/precision/format from the device profile, load the model, check the cache,
compress with the engine when a recipe is given, then ``pipeline.build_artifact``.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from agent.manifest import TensorSpec
from builder.errors import BuilderError, TargetError, UsageError
from builder.targets import TARGETS
from builder.targets.pipeline import (
    DEFAULT_VERIFY_SAMPLES,
    BuildModel,
    BuildRequest,
    BuildResult,
    SampleSet,
    build_artifact,
    cache_key,
    reuse_cached,
    samples_from_arrays,
    source_fingerprint,
    synthetic_samples,
)

log = logging.getLogger(__name__)

KEY_DIR_NAME = "keys"
# What each runtime writes when the profile prefers another runtime's format.
DEFAULT_FORMAT = {"onnxruntime": "onnx", "onnxruntime-tensorrt": "onnx", "litert": "tflite"}


@dataclass(frozen=True)
class TargetChoice:
    runtime: str
    precision: str
    format: str
    implicit_quantize: str | None = None  # a quantize shortcut added because the profile asks for int8


def default_key_dir(registry_dir: Path | None = None) -> Path:
    """Keys live beside the registry: ``<data dir>/keys`` (data dir = --registry-dir or $EDGEFLEET_HOME)."""
    from builder.artifacts.registry import default_home

    return Path(registry_dir if registry_dir is not None else default_home()) / KEY_DIR_NAME


def choose_target(profile: Any, runtime: str | None, precision: str | None, fmt: str | None,
                  has_recipe: bool, has_data: bool = False) -> TargetChoice:
    """The profile's preferred runtime/format/precision, overridden by what the user passed.

    TensorRT counts as available when the profile lists the TensorRT execution provider. An int8
    ONNX Runtime build without a recipe gets the engine's int8 quantization (static QDQ with
    ``--data``, dynamic without), since ONNX Runtime itself does not quantize at load time.
    """
    runtime = runtime or profile.preferred_runtime
    if runtime not in TARGETS:
        raise UsageError(f"unknown runtime '{runtime}'; use one of {', '.join(TARGETS)}")
    available = set(profile.runtimes)
    if "TensorrtExecutionProvider" in profile.onnxruntime_providers:
        available.add("onnxruntime-tensorrt")
    if runtime not in available:
        raise UsageError(f"profile {profile.name} does not run '{runtime}' (it has {', '.join(sorted(available))}); "
                         "pick one of those with --runtime")
    preferred = runtime == profile.preferred_runtime
    fmt = fmt or (profile.preferred_format if preferred else DEFAULT_FORMAT[runtime])
    if runtime == "onnxruntime" and fmt not in ("onnx", "ort") or runtime != "onnxruntime" and fmt != DEFAULT_FORMAT[runtime]:
        raise UsageError(f"runtime {runtime} cannot write format '{fmt}'")
    user_precision = precision is not None
    precision = precision or (profile.preferred_precision if preferred else "fp32")
    if runtime == "onnxruntime-tensorrt" and precision == "int8" and not profile.accelerator_int8:
        if user_precision:
            raise UsageError(f"{profile.name}'s GPU has no TensorRT int8 support; use --precision fp16")
        precision = "fp16"
    implicit = None
    if runtime == "onnxruntime" and precision == "int8" and not has_recipe:
        implicit = "int8-static" if has_data else "int8"  # static QDQ is the fast int8 for CNNs (FACTS.md)
    if runtime == "onnxruntime" and precision == "fp16":
        raise UsageError("ONNX Runtime's CPU EP gains nothing from fp16; use --precision fp32 or int8 for onnxruntime "
                         "(fp16 is for --runtime onnxruntime-tensorrt or litert)")
    return TargetChoice(runtime, precision, fmt, implicit)


def _load_samples(data: str | Path | None, loaded: Any, count: int) -> tuple[SampleSet, Any]:
    specs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in loaded.inputs)
    if data is None:
        return synthetic_samples(specs, count), None
    from builder.compression.data import DataSource

    source = DataSource.from_arg(str(data), loaded.inputs)
    return samples_from_arrays(source.inputs, source.labels, count, source.origin), source


def build_for_profile(model: str, profile: str, *, recipe: Path | None = None, quantize: str | None = None,
                      prune: float | None = None, input_shapes: str | Sequence[Any] | None = None,
                      data: str | Path | None = None, registry_dir: Path | None = None, key_dir: Path | None = None,
                      runtime: str | None = None, precision: str | None = None, fmt: str | None = None,
                      name: str | None = None, version: str = "1", out_dir: Path | None = None,
                      profiles_dirs: Sequence[Path] | None = None, verify_samples: int = DEFAULT_VERIFY_SAMPLES,
                      threads: int = 1, use_cache: bool = True, options: Mapping[str, Any] | None = None,
                      on_stage: Callable[[str], None] | None = None,
                      train_data: str | Path | None = None) -> BuildResult:
    """Load, (compress), build, verify, sign and register ``model`` for ``profile``; see module doc.
    ``train_data`` (.npz or ``package.module:function``) feeds a recipe's training steps (fine-tuning,
    distillation): a recipe from `builder optimize` that trains needs the same data here."""
    from builder.artifacts.registry import Registry
    from builder.artifacts.signing import key_paths, load_private_key
    from builder.profiles import get_profile

    stage = on_stage or (lambda text: log.info(text))
    prof = get_profile(profile, list(profiles_dirs) if profiles_dirs else None)
    has_recipe = recipe is not None or quantize is not None or prune is not None
    choice = choose_target(prof, runtime, precision, fmt, has_recipe, data is not None)
    if choice.runtime == "litert" and has_recipe:
        raise TargetError("LiteRT builds convert the PyTorch model, and a compression recipe ends as ONNX: build litert "
                          "without --recipe/--quantize/--prune (use --precision int8|fp16: ai-edge-quantizer quantizes the "
                          ".tflite), or build the recipe for --runtime onnxruntime")
    private_key = load_private_key(key_paths(key_dir or default_key_dir(registry_dir)).private)
    registry = Registry(registry_dir)
    if out_dir is not None and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UsageError(f"--out {out_dir} exists and is not empty; choose a new directory")
    work = Path(tempfile.mkdtemp(prefix="edgefleet-build-"))
    try:
        from builder.loading import load_model

        _limit_threads(threads)
        stage(f"loading {model}")
        loaded = load_model(model, input_shapes, workdir=work / "load")
        samples, source = _load_samples(data, loaded, verify_samples)
        recipe_obj = None
        if has_recipe or choice.implicit_quantize:
            from builder.compression.recipe import Recipe

            if recipe is not None:
                recipe_obj = Recipe.from_toml(Path(recipe))
            else:
                recipe_obj = Recipe.from_shortcuts(quantize=quantize or choice.implicit_quantize, prune=prune,
                                                   torch_available=loaded.torch_module is not None)
        recipe_dict = recipe_obj.to_dict() if recipe_obj is not None else {}
        specs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in loaded.inputs)
        base = BuildModel(name=name or loaded.name, version=version, onnx_path=loaded.onnx_path, inputs=specs,
                          reference_onnx_path=loaded.onnx_path, torch_module=loaded.torch_module,
                          source_sha256=source_fingerprint(str(model), loaded.onnx_path, loaded.torch_module),
                          recipe=recipe_dict)
        request = BuildRequest(prof, choice.runtime, choice.precision, choice.format, dict(options or {}))
        train_source, train_sha256 = None, None
        if train_data is not None:
            from builder.compression.data import DataSource

            train_source = DataSource.from_arg(str(train_data), loaded.inputs)
            train_sha256 = samples_from_arrays(train_source.inputs, train_source.labels, len(train_source),
                                               train_source.origin).fingerprint()
        key = cache_key(base, request, samples, train_sha256)
        if use_cache:
            cached = reuse_cached(registry, key, out_dir)
            if cached is not None:
                stage(f"reusing artifact {cached.artifact_id[:12]} (same model, recipe, profile and builder)")
                return cached
        build_model = base
        if recipe_obj is not None:
            from builder.compression.engine import run_recipe

            stage(f"compressing with {recipe_obj.name or 'recipe'} ({len(recipe_obj.steps)} steps)")
            try:
                result = run_recipe(loaded, recipe_obj, data=source, train_data=train_source, out_dir=work / "compressed",
                                    threads=threads)
            except BuilderError as exc:
                if not choice.implicit_quantize:
                    raise
                raise type(exc)(f"{exc} (quantize={choice.implicit_quantize} came from {prof.name}'s default precision "
                                "int8; pass --precision fp32 to build without quantizing)") from exc
            precision_after = result.final_state.precision or choice.precision
            request = BuildRequest(prof, choice.runtime, precision_after, choice.format, dict(options or {}))
            build_model = BuildModel(base.name, base.version, Path(result.model_path), specs, loaded.onnx_path,
                                     None, base.source_sha256, recipe_dict)
        stage(f"building {choice.runtime}/{request.precision}/{choice.format} for {prof.name}")
        return build_artifact(build_model, request, samples, registry=registry, private_key=private_key,
                              workdir=work / "build", out_dir=out_dir, use_cache=False, key=key)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _limit_threads(threads: int) -> None:
    """Builds share small machines: oversubscribed OpenMP threads spin and slow everything down."""
    try:
        import torch
    except ImportError:  # an ONNX-only install
        return
    torch.set_num_threads(max(1, threads))
