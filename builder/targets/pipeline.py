"""One build: check ops, compile for a runtime, verify against the reference, package, sign, register.

``build_artifact`` is what ``builder build`` (and later the search) calls. The order is the
contract: nothing is packaged before verification passed, nothing is registered that is not
packaged and signed, and an identical earlier build (same cache key) is reused instead of rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from agent.manifest import SAMPLE_FILE, Manifest, Target, TensorSpec, canonical_json
from builder import __version__
from builder.artifacts.download import download_bytes
from builder.errors import DataError, UnsupportedOpError, UsageError, VerificationError
from builder.targets import get_target
from builder.targets.base import (
    FP32_SPREAD_FACTOR,
    TRAINED_MIN_COSINE,
    CompiledPayloads,
    Tolerance,
    UnsupportedOp,
    VerificationReport,
    output_spread,
    tolerance_for,
)

log = logging.getLogger(__name__)

DEFAULT_VERIFY_SAMPLES = 16


@dataclass(frozen=True)
class BuildModel:
    """The model to build (possibly compressed) and the reference it must match (the original)."""

    name: str
    version: str
    onnx_path: Path  # what is compiled
    inputs: tuple[TensorSpec, ...]  # concrete shapes of one sample (batch 1)
    reference_onnx_path: Path  # the original, uncompressed model: the truth the artifact is compared with
    torch_module: Any = None  # the PyTorch module matching onnx_path, when there is one (LiteRT needs it)
    source_sha256: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict)  # empty: not compressed
    # Weights were retrained (fine-tuning, distillation): its logits legitimately drift from the original's
    # (a channel-pruned digits CNN after 1 epoch: cosine 0.886 with top-1 agreement 0.984), so it is judged
    # against the original by the task's score, and the conversion is checked against its own ONNX.
    trained: bool = False

    @property
    def compressed(self) -> bool:
        return bool(self.recipe)


@dataclass(frozen=True)
class SampleSet:
    """Per-sample inputs (batch 1, keyed by model input name) and optional integer labels."""

    inputs: tuple[Mapping[str, np.ndarray], ...]
    labels: np.ndarray | None = None
    origin: str = "synthetic"

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for sample in self.inputs:
            for name in sorted(sample):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(sample[name]).tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class BuildRequest:
    profile: Any  # builder.profiles.DeviceProfile
    runtime: str
    precision: str
    format: str
    options: Mapping[str, Any] = field(default_factory=dict)  # target options (optimization_level, ...)
    task: str | None = None  # --task; None = detected from the reference outputs (task_metrics)
    min_cosine: float | None = None  # --min-cosine: overrides the precision's floor
    min_agreement: float | None = None  # --min-agreement: overrides the task score's floor


@dataclass(frozen=True)
class BuildResult:
    artifact_id: str
    manifest: Manifest
    reused: bool
    report: VerificationReport | None  # None when reused from the cache
    warnings: tuple[str, ...] = ()
    exported_to: Path | None = None
    seconds: float = 0.0
    fallback: str = ""  # why the profile's fallback runtime was built instead of its preferred one


def samples_from_arrays(arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, limit: int,
                        origin: str, batch_axes: Mapping[str, int | None] | None = None) -> SampleSet:
    """Split arrays into batch-1 samples (the first ``limit``), each input on its batch axis
    (``batch_axes``, default 0; None = not batched: every sample gets the whole array)."""
    from builder.compression.data import DataSource

    source = DataSource(dict(arrays), None, origin, dict(batch_axes or {}))
    samples = tuple(source.per_sample(limit))
    return SampleSet(samples, None if labels is None else np.asarray(labels[:len(samples)]), origin)


def synthetic_samples(inputs: Sequence[TensorSpec], count: int = DEFAULT_VERIFY_SAMPLES, seed: int = 0) -> SampleSet:
    """Deterministic inputs when no data is given: floats in [0, 1); token ids in [1000, 2000)
    (ordinary word pieces for BERT-like vocabularies), masks all ones, type ids zero."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for spec in inputs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                sample[spec.name] = rng.random(shape).astype(dtype)
            elif "mask" in spec.name:
                sample[spec.name] = np.ones(shape, dtype=dtype)
            elif "type" in spec.name:
                sample[spec.name] = np.zeros(shape, dtype=dtype)
            elif dtype.kind == "b":
                sample[spec.name] = np.ones(shape, dtype=dtype)
            else:
                sample[spec.name] = rng.integers(1000, 2000, size=shape).astype(dtype)
        samples.append(sample)
    return SampleSet(tuple(samples), None, "synthetic")


def source_fingerprint(source: str, onnx_path: Path, torch_module: Any = None) -> str:
    """sha256 of what the user gave: the file's bytes, or a factory's name plus its weights."""
    path = Path(source)
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    digest.update(source.encode())
    if torch_module is not None:
        for name, tensor in sorted(torch_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
    with open(onnx_path, "rb") as fh:
        digest.update(fh.read())
    return digest.hexdigest()


def cache_key(model: BuildModel, request: BuildRequest, samples: SampleSet, train_data_sha256: str | None = None) -> str:
    """Same source, recipe, profile, runtime/precision/format, options, data (and training data, for a
    recipe that trains) and builder -> same key."""
    doc = {
        "source_sha256": model.source_sha256,
        "recipe": dict(model.recipe),
        "profile": request.profile.name,
        "profile_sha256": hashlib.sha256(canonical_json(request.profile.to_dict() | {"source_path": ""})).hexdigest(),
        "runtime": request.runtime,
        "precision": request.precision,
        "format": request.format,
        "options": {k: v for k, v in request.options.items() if isinstance(v, (str, int, float, bool))},
        "samples": samples.fingerprint(),
        "builder_version": __version__,
    }
    floors = {k: v for k, v in (("task", request.task), ("min_cosine", request.min_cosine),
                                ("min_agreement", request.min_agreement)) if v is not None}
    if floors:  # a build judged by other floors is another build
        doc["verification"] = floors
    if train_data_sha256 is not None:  # absent otherwise, so keys of builds without training stay the same
        doc["train_data"] = train_data_sha256
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def check_ops_or_raise(target: Any, onnx_path: Path, precision: str) -> list[UnsupportedOp]:
    """Blocking unsupported ops stop the build before conversion, all named at once."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = target.check_ops(model, precision)
    blocking = [op for op in found if op.blocking]
    if blocking:
        raise UnsupportedOpError(f"{target.name} cannot run: " + "; ".join(op.describe() for op in blocking))
    return [op for op in found if not op.blocking]


def reference_outputs(reference_onnx: Path, samples: SampleSet, level: str = "basic") -> list[dict[str, np.ndarray]]:
    """The reference model's outputs per sample. Synthetic inputs the model rejects (a sample rate
    that must be 8000 or 16000, token ids past the vocabulary) become one ``DataError`` naming the
    inputs that were generated, instead of an ONNX Runtime traceback."""
    from builder.targets.onnxruntime_target import run_ort

    try:
        return run_ort(reference_onnx, samples.inputs, level=level)
    except Exception as exc:  # ORT raises its own classes; only synthetic inputs are our doing
        if samples.origin != "synthetic":
            raise
        shown = ", ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'} {v.dtype}" for k, v in samples.inputs[0].items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the model rejected the generated inputs ({shown}): {first[:200]}; pass --data with real "
                        "samples (an .npz keyed by input name)") from exc


def verification_tolerance(model: BuildModel, request: BuildRequest, samples: SampleSet,
                           reference: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tolerance, str | None]:
    """The precision's tolerance with the task, the user's floors, and for elementwise (fp32)
    checks ``atol`` widened to ``FP32_SPREAD_FACTOR`` x the spread between ONNX Runtime's own
    optimisation levels (DISABLE_ALL vs ENABLE_ALL) on the reference: a fused kernel's rounding is
    not a conversion error (a recogniser's levels differ by 3.2e-4 against the 1e-4 atol)."""
    tolerance = tolerance_for(request.precision, compressed=model.compressed)
    changes: dict[str, Any] = {"task": request.task}
    if model.trained:
        changes["min_cosine"] = TRAINED_MIN_COSINE
    if request.min_cosine is not None:
        changes["min_cosine"] = request.min_cosine
    if request.min_agreement is not None:
        changes["min_agreement"] = request.min_agreement
    note = None
    if tolerance.elementwise:
        unfused = reference_outputs(model.reference_onnx_path, samples, level="disabled")
        fused = reference_outputs(model.reference_onnx_path, samples, level="all")
        spread = output_spread(unfused, fused)
        if FP32_SPREAD_FACTOR * spread > tolerance.atol:
            changes["atol"] = FP32_SPREAD_FACTOR * spread
            note = (f"fp32 atol {FP32_SPREAD_FACTOR * spread:.3g} = {FP32_SPREAD_FACTOR:g} x the spread of ONNX Runtime's own "
                    f"optimisation levels on the reference ({spread:.3g}; documented atol {tolerance.atol:g})")
    return dataclasses.replace(tolerance, **changes), note


def _check_conversion(target: Any, compiled: CompiledPayloads, model: BuildModel, request: BuildRequest,
                      samples: SampleSet, report: VerificationReport) -> VerificationReport:
    """A retrained model's artifact against the compressed ONNX it was compiled from, at the precision's own
    tolerance: the task floor against the original says the model still works, this says the runtime runs
    *this* model (a relaxed cosine against the original alone would hide a conversion bug)."""
    own = BuildModel(model.name, model.version, model.onnx_path, model.inputs, model.onnx_path)
    own_reference = reference_outputs(model.onnx_path, samples)
    tolerance, _ = verification_tolerance(own, request, samples, own_reference)
    conversion = target.verify(compiled, samples.inputs, own_reference, tolerance)
    if conversion.passed:
        return report
    worst = conversion.worst
    failed = dataclasses.replace(worst, passed=False, reason=f"conversion: against the compressed model itself, "
                                 f"{conversion.summary()}: {worst.reason}")
    return dataclasses.replace(report, checks=report.checks + (failed,))


def manifest_tolerance(report: VerificationReport) -> dict[str, float]:
    """What the device's health check allows: the precision's tolerance, widened to 4x what the
    host measured (a correct device lands near the host; a broken one far away)."""
    tol = report.tolerance
    worst = report.worst
    atol = max(tol.atol if np.isfinite(tol.atol) else 0.0, 4 * worst.max_abs_diff, 1e-5)
    rtol = tol.rtol if np.isfinite(tol.rtol) else 0.0
    min_cos = min(tol.min_cosine, max(0.9, 1 - 4 * (1 - worst.min_cosine)))
    return {"atol": float(atol), "rtol": float(rtol), "min_cosine": float(min_cos)}


def write_sample_file(path: Path, compiled: CompiledPayloads, sample: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray]) -> None:
    """sample.npz: "in:<artifact input>" (cast to the artifact's dtypes) and "out:<artifact output>"
    holding the *reference model's* outputs, matched by position."""
    arrays: dict[str, np.ndarray] = {}
    for spec in compiled.inputs:
        source = compiled.input_sources.get(spec.name, spec.name)
        arrays[f"in:{spec.name}"] = np.asarray(sample[source]).astype(spec.dtype)
    ref_values = list(reference.values())
    for pos, spec in enumerate(compiled.outputs):
        arrays[f"out:{spec.name}"] = np.asarray(ref_values[pos]).astype(spec.dtype)  # the agent checks dtypes too
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **kwds fill allow_pickle: bool


def estimate_device_latency_ms(onnx_path: Path, inputs: Sequence[TensorSpec], profile: Any, precision: str) -> float | None:
    """builder.analysis's roofline estimate for the profile; None when it cannot estimate this graph."""
    try:
        from builder.analysis import analyze_onnx, estimate_latency
    except ImportError:
        return None
    shapes = {s.name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape) for s in inputs}
    try:
        return float(estimate_latency(analyze_onnx(onnx_path, shapes), profile, precision).latency_ms)
    except Exception as exc:  # informative only: an estimate failure must not fail a verified build
        log.warning("device latency estimate failed: %s", exc)
        return None


def accuracy_from(report_outputs: Sequence[Mapping[str, np.ndarray]], labels: np.ndarray) -> float:
    preds = np.array([int(np.asarray(list(o.values())[0]).reshape(-1).argmax()) for o in report_outputs])
    return float(np.mean(preds == labels[:len(preds)]))


def reuse_cached(registry: Any, key: str, out_dir: Path | None = None) -> BuildResult | None:
    """The earlier build with this cache key, exported to ``out_dir`` if asked; None on a miss."""
    start = time.perf_counter()
    cached = registry.lookup_cache(key)
    if cached is None:
        return None
    manifest = registry.manifest(cached.artifact_id)
    exported = registry.export(cached.artifact_id, out_dir) if out_dir else None
    return BuildResult(cached.artifact_id, manifest, True, None, (), exported, time.perf_counter() - start)


def build_artifact(model: BuildModel, request: BuildRequest, samples: SampleSet, *, registry: Any,
                   private_key: Any, workdir: Path | None = None, out_dir: Path | None = None,
                   use_cache: bool = True, key: str | None = None) -> BuildResult:
    """Build, verify, package, sign and register one artifact (or reuse the cached one).

    ``key`` overrides the cache key (a caller that compresses first computes it from the recipe
    before compressing, so a cache hit skips compression too).
    """
    start = time.perf_counter()
    if not samples.inputs:
        raise UsageError("no sample inputs to verify with; pass --data with at least one sample")
    key = key or cache_key(model, request, samples)
    if use_cache:
        cached = reuse_cached(registry, key, out_dir)
        if cached is not None:
            return cached
    target = get_target(request.runtime)
    if request.precision not in target.precisions:
        raise UsageError(f"runtime {request.runtime} builds {', '.join(target.precisions)}, not {request.precision}")
    if request.format not in target.formats:
        raise UsageError(f"runtime {request.runtime} writes {', '.join(target.formats)}, not {request.format}")
    fallback_ops = check_ops_or_raise(target, model.onnx_path, request.precision)
    warnings = [f"{op.op_type} x{op.count}: {op.reason}; {op.alternative}" for op in fallback_ops]
    if samples.origin == "synthetic":
        warnings.append("verified (and any int8 calibration done) on synthetic inputs; pass --data with real samples")
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="edgefleet-build-")) if workdir is None else Path(workdir)
    try:
        options = dict(request.options)
        options.update(format=request.format, torch_module=model.torch_module,
                       example_inputs=samples.inputs[0], calibration_samples=list(samples.inputs))
        if request.runtime == "onnxruntime":
            options.setdefault("execution_providers", request.profile.onnxruntime_providers)
        if request.runtime == "litert":
            options.setdefault("delegates", request.profile.litert_delegates)
        compiled = target.compile(model.onnx_path, model.inputs, request.precision, options, work / "compiled")
        reference = reference_outputs(model.reference_onnx_path, samples)
        tolerance, spread_note = verification_tolerance(model, request, samples, reference)
        if spread_note:
            warnings.append(spread_note)
        report = target.verify(compiled, samples.inputs, reference, tolerance)
        if report.passed and model.trained:
            report = _check_conversion(target, compiled, model, request, samples, report)
        if not report.passed:
            raise VerificationError(f"artifact for {request.profile.name} ({request.runtime}/{request.precision}) failed "
                                    f"verification, not registered: {report.summary()}: {report.worst.reason}"
                                    + ("; it was judged on synthetic inputs (random values: for a text or image "
                                       "model they say little), pass --data with real samples"
                                       if samples.origin == "synthetic" else ""))
        metrics = _metrics(model, request, compiled, report, samples, reference, work)
        sample_path = work / SAMPLE_FILE
        write_sample_file(sample_path, compiled, samples.inputs[0], reference[0])
        payload_files = {f.name: (f.path, f.role) for f in compiled.files}
        payload_files[SAMPLE_FILE] = (sample_path, "sample")
        from builder.artifacts.packaging import package_artifact

        target_info = Target(profile=request.profile.name, runtime=request.runtime,
                             execution_providers=tuple(compiled.execution_providers), precision=request.precision,
                             format=compiled.format, runtime_options=dict(compiled.runtime_options))
        recipe = dict(model.recipe)
        packaged = package_artifact(work / "artifact", payload_files, model_name=model.name, model_version=model.version,
                                    target=target_info, inputs=compiled.inputs, outputs=compiled.outputs,
                                    private_key=private_key, recipe=recipe, metrics=metrics,
                                    verify_tolerance=manifest_tolerance(report))
        record, reused = registry.add_artifact(work / "artifact", source_sha256=model.source_sha256, cache_key=key)
        manifest = registry.manifest(record.artifact_id) if reused else packaged
        exported = registry.export(record.artifact_id, out_dir) if out_dir else None
        return BuildResult(record.artifact_id, manifest, reused, report, tuple(warnings + list(compiled.notes)),
                           exported, time.perf_counter() - start)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def _metrics(model: BuildModel, request: BuildRequest, compiled: CompiledPayloads, report: VerificationReport,
             samples: SampleSet, reference: Sequence[Mapping[str, np.ndarray]], work: Path) -> dict[str, Any]:
    paths = [f.path for f in compiled.files]
    dl, level = download_bytes(paths)
    worst = report.worst
    metrics: dict[str, Any] = {
        "size_bytes": int(sum(p.stat().st_size for p in paths)),
        "download_bytes": int(dl),
        "download_zstd_level": level,
        "host_latency_ms": None if report.host_latency_ms is None else round(report.host_latency_ms, 4),
        "host_latency_note": f"median, 1 thread, batch 1, {report.runtime} on the build host",
        "fidelity": {
            "max_abs_diff": worst.max_abs_diff,
            "mean_abs_diff": worst.mean_abs_diff,
            "min_cosine": worst.min_cosine,
            "mean_cosine": worst.mean_cosine,
            "top1_agreement": worst.top1_agreement,  # classifier outputs only (task_metrics)
            "task": worst.task,
            "task_score": None if worst.task_score is None or worst.task_score != worst.task_score else worst.task_score,
            "samples": report.num_samples,
            "reference": "original model, ONNX Runtime CPU fp32",
        },
        "verification": report.checked,
    }
    if samples.labels is not None:
        metrics["reference_accuracy"] = accuracy_from(reference, samples.labels)
        if report.predictions is not None:
            metrics["accuracy"] = float(np.mean(np.asarray(report.predictions) == samples.labels[:len(report.predictions)]))
    est = estimate_device_latency_ms(model.onnx_path, model.inputs, request.profile, request.precision)
    if est is not None:
        metrics["est_device_latency_ms"] = round(est, 4)
    return metrics
