"""``build_for_profile``: everything ``builder build`` does, as one function (``builder push`` calls
it too): resolve runtime/precision/format from the device profile, load the model, check the cache,
compress with the engine when a recipe is given, then ``pipeline.build_artifact``.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from agent.manifest import TensorSpec
from builder.errors import BuilderError, TargetError, UsageError
from builder.targets import TARGETS
from builder.targets.base import MIN_INT8_SAMPLES
from builder.targets.onnx_to_torch import LiteRtConversionError
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
RUNTIME_TITLES = {"onnxruntime": "ONNX Runtime", "onnxruntime-tensorrt": "ONNX Runtime (TensorRT)", "litert": "LiteRT"}


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
        implicit = "int8" if has_data else "int8-dynamic"  # int8 picks by model class; needs data for CNNs
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
    return samples_from_arrays(source.inputs, source.labels, count, source.origin, source.batch_axes), source


def build_for_profile(model: str, profile: str, *, recipe: Path | None = None, quantize: str | None = None,
                      prune: float | None = None, input_shapes: str | Sequence[Any] | None = None,
                      data: str | Path | None = None, registry_dir: Path | None = None, key_dir: Path | None = None,
                      runtime: str | None = None, precision: str | None = None, fmt: str | None = None,
                      name: str | None = None, version: str = "1", out_dir: Path | None = None,
                      profiles_dirs: Sequence[Path] | None = None, verify_samples: int | None = None,
                      threads: int = 1, use_cache: bool = True, options: Mapping[str, Any] | None = None,
                      on_stage: Callable[[str], None] | None = None,
                      batch_axes: Mapping[str, int | None] | None = None, task: str | None = None,
                      min_cosine: float | None = None, min_agreement: float | None = None,
                      train_data: str | Path | None = None) -> BuildResult:
    """Load, (compress), build, verify, sign and register ``model`` for ``profile``; see module doc.

    ``verify_samples`` None: 16, or ``MIN_INT8_SAMPLES`` (64) for int8 and compressed builds (all
    of ``data`` when it holds fewer). ``task``/``min_cosine``/``min_agreement`` override the
    detected task and the precision's floors (``targets.base``). ``train_data`` (.npz or
    ``package.module:function``) feeds a recipe's training steps (fine-tuning, distillation): a
    recipe from `builder optimize` that trains needs the same data here."""
    from builder.artifacts.registry import Registry
    from builder.artifacts.signing import key_paths, load_private_key
    from builder.profiles import get_profile

    stage = on_stage or (lambda text: log.info(text))
    prof = get_profile(profile, list(profiles_dirs) if profiles_dirs else None)
    has_recipe = recipe is not None or quantize is not None or prune is not None
    choice = choose_target(prof, runtime, precision, fmt, has_recipe, data is not None)
    # only a runtime the profile chose falls back; one the user named is built or refused
    may_fall_back = choice.runtime == "litert" and runtime is None and fmt is None and bool(prof.fallback_runtime)
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
        from builder.compression.data import load_model_with_data

        _limit_threads(threads)
        stage(f"loading {model}")
        loaded = load_model_with_data(model, input_shapes, None if data is None else str(data), batch_axes=batch_axes,
                                      workdir=work / "load")
        if loaded.normalisation is not None:
            stage(loaded.normalisation.summary())
        if may_fall_back and loaded.torch_module is None:
            refuse_unconvertible(loaded.onnx_path)  # before the minutes litert-torch would spend
        if verify_samples is None:
            lossy = choice.precision == "int8" or has_recipe
            verify_samples = MIN_INT8_SAMPLES if lossy else DEFAULT_VERIFY_SAMPLES
        samples, source = _load_samples(data, loaded, verify_samples)
        from builder.targets.task_metrics import normalise_task

        try:
            task = normalise_task(task)
        except ValueError as exc:
            raise UsageError(f"--task: {exc}") from exc
        recipe_obj = None
        if has_recipe or choice.implicit_quantize:
            from builder.compression.recipe import Recipe

            if recipe is not None:
                recipe_obj = Recipe.from_toml(Path(recipe))
            else:
                recipe_obj = Recipe.from_shortcuts(quantize=quantize or choice.implicit_quantize, prune=prune,
                                                   torch_available=loaded.torch_module is not None,
                                                   target_cpu={"arch": prof.arch, "dot_product": prof.dot_product})
        recipe_dict = recipe_obj.to_dict() if recipe_obj is not None else {}
        specs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in loaded.inputs)
        base = BuildModel(name=name or loaded.name, version=version, onnx_path=loaded.onnx_path, inputs=specs,
                          reference_onnx_path=loaded.onnx_path, torch_module=loaded.torch_module,
                          source_sha256=source_fingerprint(str(model), loaded.onnx_path, loaded.torch_module),
                          recipe=recipe_dict)
        floors: dict[str, Any] = dict(task=task, min_cosine=min_cosine, min_agreement=min_agreement)
        request = BuildRequest(prof, choice.runtime, choice.precision, choice.format, dict(options or {}), **floors)
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
            precision_after = honoured_precision(choice.precision, precision is not None,
                                                 result.final_state.precision or "fp32", choice.runtime)
            request = BuildRequest(prof, choice.runtime, precision_after, choice.format, dict(options or {}), **floors)
            build_model = BuildModel(base.name, base.version, Path(result.model_path), specs, loaded.onnx_path,
                                     None, base.source_sha256, recipe_dict, trained=result.retrained)
        stage(f"building {choice.runtime}/{request.precision}/{choice.format} for {prof.name}")
        return build_artifact(build_model, request, samples, registry=registry, private_key=private_key,
                              workdir=work / "build", out_dir=out_dir, use_cache=False, key=key)
    except LiteRtConversionError as exc:
        if not may_fall_back:
            raise
        failure = exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fallback = fallback_choice(prof, choice, failure)
    line = (f"LiteRT: {failure.op.describe()} does not convert: building {RUNTIME_TITLES[fallback.runtime]} "
            f".{fallback.format} for {prof.name} instead")
    stage(line)
    try:
        built = build_for_profile(model, profile, recipe=recipe, quantize=quantize, prune=prune, input_shapes=input_shapes,
                                   data=data, registry_dir=registry_dir, key_dir=key_dir, runtime=fallback.runtime,
                                   precision=fallback.precision, fmt=fallback.format, name=name, version=version,
                                   out_dir=out_dir, profiles_dirs=profiles_dirs, verify_samples=verify_samples,
                                   threads=threads, use_cache=use_cache, options=options, on_stage=on_stage,
                                   batch_axes=batch_axes, task=task, min_cosine=min_cosine, min_agreement=min_agreement,
                                   train_data=train_data)
    except BuilderError as exc:  # say that it was the fallback that failed
        raise type(exc)(f"{line}; {exc}") from exc
    why = f"LiteRT refused {failure.op.describe()}: {failure.op.reason}"
    if fallback.runtime == "onnxruntime":
        why += f"; on the device the .{fallback.format} runs with execution providers {', '.join(prof.onnxruntime_providers)}"
    return dataclasses.replace(built, fallback=line, warnings=(why,) + built.warnings)


def refuse_unconvertible(onnx_path: Path) -> None:
    """Raise ``LiteRtConversionError`` for the first node an ONNX-only model cannot take to LiteRT."""
    import onnx

    from builder.targets.onnx_to_torch import first_unconvertible

    found = first_unconvertible(onnx.load(str(onnx_path), load_external_data=False))
    if found is not None:
        raise LiteRtConversionError(found)


def fallback_choice(profile: Any, failed: TargetChoice, failure: LiteRtConversionError) -> TargetChoice:
    """The profile's fallback runtime/format at the precision the LiteRT build was asked for; a
    precision the fallback cannot build is refused with both reasons, never silently changed."""
    if failed.precision == "fp16" and profile.fallback_runtime == "onnxruntime":
        raise UsageError(f"LiteRT: {failure.op.describe()} does not convert, and the fallback ONNX Runtime gains nothing "
                         "from fp16 on the CPU: use --precision fp32 or int8")
    return choose_target(profile, profile.fallback_runtime, failed.precision, profile.fallback_format or None, False)


def honoured_precision(asked: str, explicit: bool, after_recipe: str, runtime: str) -> str:
    """The precision to compile after a recipe ran: the one asked for, or a UsageError with the reason
    (a prune-only recipe with ``--precision fp16`` built fp32 silently before).

    A recipe that quantized decides (int8/mixed/fp16 weights are what it wrote) unless the user
    explicitly asked for another precision; an fp32 result is compiled at the asked precision when
    the target converts itself (fp16 for TensorRT; int8 via TensorRT's calibration table)."""
    if after_recipe == asked or (after_recipe == "mixed" and asked == "int8"):
        return after_recipe
    if after_recipe != "fp32":
        if explicit:
            raise UsageError(f"the recipe quantized the model to {after_recipe} but --precision {asked} was asked; "
                             f"drop the quantize step or pass --precision {after_recipe}")
        return after_recipe
    if runtime == "onnxruntime-tensorrt" and asked in ("fp16", "int8"):
        return asked  # the TensorRT target converts fp32 to fp16 / calibrates int8 itself
    if not explicit:  # the profile's default precision: build what the recipe wrote (the table says fp32)
        log.warning("the recipe does not quantize: building fp32, not the profile's default %s", asked)
        return after_recipe
    raise UsageError(f"--precision {asked}: the recipe does not quantize and {runtime} does not convert an fp32 model "
                     f"to {asked} by itself; add a quantize step (e.g. --quantize {'int8-static' if asked == 'int8' else asked}) "
                     "or pass --precision fp32")


def _limit_threads(threads: int) -> None:
    """Builds share small machines: oversubscribed OpenMP threads spin and slow everything down."""
    try:
        import torch
    except ImportError:  # an ONNX-only install
        return
    torch.set_num_threads(max(1, threads))
