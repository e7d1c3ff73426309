"""Evaluate one candidate recipe: run it with the compression engine, measure, estimate on the device.

The search talks to an evaluator through ``CandidateEvaluator`` (recipe steps in, ``CandidateMetrics``
out), so tests and other backends can swap it. ``EngineEvaluator`` is the real one:
``builder.compression.engine.run_recipe`` per candidate (accuracy, fidelity, size, zstd download size,
host latency after every step), then the device profile's roofline estimate of the final graph.

Worker processes rebuild their evaluator from an ``EvaluationSetup`` (plain, picklable data), so
``--jobs N`` and several machines share nothing but the optuna storage and the candidate cache.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from builder.compression.base import CompressionStep
from builder.errors import BuilderError, SearchError
from builder.search.device import estimate_on_profile
from builder.search.objectives import Baseline, CandidateMetrics
from builder.search.space import SpaceOptions, recipe_from_steps

log = logging.getLogger(__name__)

# A quality check the search hands to the evaluator: (accuracy or None, fidelity) -> reason to stop or None.
QualityCheck = Callable[[Optional[float], float], Optional[str]]
# Called with the candidate's final ONNX file while it still exists (``--measure-on`` builds and
# benchmarks it on a device) and the metrics so far; returns the metrics to keep.
ModelHook = Callable[[Path, CandidateMetrics], CandidateMetrics]


class EarlyStop(Exception):
    """Raised inside an evaluation when the candidate can no longer meet a quality constraint."""

    def __init__(self, reason: str, after_step: int, accuracy: Optional[float] = None, fidelity: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after_step = after_step
        self.accuracy = accuracy  # the quality that was measured when it stopped (cached, re-checked on reruns)
        self.fidelity = fidelity


class CandidateEvaluator(Protocol):
    """What the search needs from an evaluator."""

    model_hash: str
    context_hash: str  # data, train data, device profile, evaluation settings
    baseline: Baseline
    space_options: SpaceOptions
    use_accuracy: bool

    def evaluate(self, steps: Sequence[Mapping[str, Any]], quality_check: Optional[QualityCheck] = None) -> CandidateMetrics: ...
    # Evaluators that support ``--measure-on`` also take ``on_model: Optional[ModelHook] = None``.


@dataclass(frozen=True)
class EvaluationSetup:
    """Everything a worker needs to build its own evaluator (picklable, no live objects)."""

    model: str
    device: str
    data: str
    input_shapes: Optional[str] = None
    train_data: Optional[str] = None
    profiles_dir: Optional[str] = None
    threads: int = 1
    seed: int = 0
    max_eval_samples: Optional[int] = None  # cap evaluation data (speed); None = all of --data
    latency_runs: int = 30
    workdir: Optional[str] = None


def fidelity_value(task: str, agreement: float, cosine_mean: float) -> float:
    """One fidelity number: top-1 agreement for classifiers, mean cosine for embedding models."""
    return float(agreement) if task == "classify" else float(cosine_mean)


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_model(loaded: Any) -> str:
    """Stable identity of the model: its PyTorch weights (export bytes may vary) or the ONNX file."""
    if getattr(loaded, "torch_module", None) is not None:
        digest = hashlib.sha256(f"{loaded.source}|{[(i.name, i.shape, i.dtype) for i in loaded.inputs]}".encode())
        for name, tensor in sorted(loaded.torch_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
    return hash_file(Path(loaded.onnx_path))


def hash_data(source: Any) -> str:
    digest = hashlib.sha256()
    for name in sorted(source.inputs):
        digest.update(name.encode())
        digest.update(source.inputs[name].tobytes())
    if source.labels is not None:
        digest.update(source.labels.tobytes())
    return digest.hexdigest()


def load_for_search(setup: EvaluationSetup, workdir: Path) -> Any:
    """The model as a ``LoadedModel`` (ONNX file plus the PyTorch module when there is one)."""
    from builder.compression.data import load_model_with_data

    return load_model_with_data(setup.model, setup.input_shapes, setup.data, workdir=workdir)


class EngineEvaluator:
    """Runs candidates through the compression engine on this machine (one per worker process)."""

    def __init__(self, setup: EvaluationSetup) -> None:
        from builder.compression.data import DataSource
        from builder.compression.evaluate import EvalConfig, baseline_evaluation
        from builder.compression.int8_auto import detect_model_class
        from builder.compression.steps import STEPS
        from builder.profiles import get_profile

        import torch

        torch.set_num_threads(setup.threads)  # one worker per core: oversubscribed torch threads crawl
        self.setup = setup
        self.profile = get_profile(setup.device, [Path(setup.profiles_dir)] if setup.profiles_dir else None)
        root = Path(setup.workdir) if setup.workdir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="search-", dir=root))
        self.model = load_for_search(setup, self._tmp)
        self.data = DataSource.from_arg(setup.data, self.model.inputs)
        if setup.max_eval_samples:
            self.data = self.data.take(setup.max_eval_samples)
        self.train_data = DataSource.from_arg(setup.train_data, self.model.inputs) if setup.train_data else None
        self.config = EvalConfig(threads=setup.threads, warmup_runs=5, timed_runs=setup.latency_runs)
        self.model_hash = hash_model(self.model)
        context = [hash_data(self.data), hash_data(self.train_data) if self.train_data else "-",
                   self.profile.name, repr(sorted(self.profile.to_dict().items())), str(setup.seed),
                   str(setup.max_eval_samples)]
        self.context_hash = hashlib.sha256("|".join(context).encode()).hexdigest()
        evaluation, self.reference = baseline_evaluation(self.model.onnx_path, self.data, self.model.inputs, self.config)
        self.task = evaluation.task
        self.use_accuracy = evaluation.accuracy is not None
        device = estimate_on_profile(self.model.onnx_path, self.model.inputs, self.profile)
        self.estimate_source = device.source
        self.baseline = Baseline(accuracy=evaluation.accuracy, download_bytes=evaluation.download_bytes,
                                 host_latency_ms=evaluation.latency_p50_ms, device_latency_ms=device.latency_ms,
                                 energy_mj=device.energy_mj)
        self.baseline_fidelity = fidelity_value(self.task, evaluation.fidelity.agreement, evaluation.fidelity.cosine_mean)
        self.space_options = SpaceOptions(
            torch_available=self.model.torch_module is not None,
            has_train_data=self.train_data is not None,
            available_steps=frozenset(STEPS),
            has_matmul=_has_matmul(self.model.onnx_path),
            training_steps=_training_steps(STEPS),
            conv_heavy=detect_model_class(self.model.onnx_path).kind == "cnn",
            target_cpu={"arch": self.profile.arch, "dot_product": self.profile.dot_product},
        )

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def evaluate(self, steps: Sequence[Mapping[str, Any]], quality_check: Optional[QualityCheck] = None,
                 on_model: Optional[ModelHook] = None) -> CandidateMetrics:
        from builder.compression.base import ModelForm
        from builder.compression.engine import run_recipe

        if not steps:  # the original model is a candidate too
            baseline = self._baseline_metrics()
            return on_model(Path(self.model.onnx_path), baseline) if on_model is not None else baseline
        recipe = recipe_from_steps(steps)
        built = recipe.validate(torch_available=self.model.torch_module is not None, has_data=True,
                                has_train_data=self.train_data is not None)
        forms = [s.form for s in built]

        def on_report(report: Any) -> None:
            if quality_check is None or report.index == 0:
                return
            if any(form is ModelForm.TORCH for form in forms[report.index:]):
                return  # a later training step could still recover quality
            ev = report.evaluation
            fid = fidelity_value(self.task, ev.fidelity.agreement, ev.fidelity.cosine_mean)
            reason = quality_check(ev.accuracy, fid)
            if reason is not None:
                raise EarlyStop(f"after step {report.index} ({report.step}): {reason}", report.index, ev.accuracy, fid)

        out_dir = Path(tempfile.mkdtemp(prefix="candidate-", dir=self._tmp))
        try:
            result = run_recipe(self.model, recipe, data=self.data, train_data=self.train_data, out_dir=out_dir,
                                threads=self.setup.threads, eval_config=self.config, on_report=on_report,
                                seed=self.setup.seed)
            final = result.final
            device = estimate_on_profile(result.model_path, self.model.inputs, self.profile)
            metrics = CandidateMetrics(
                fidelity=fidelity_value(self.task, final.fidelity.agreement, final.fidelity.cosine_mean),
                download_bytes=int(final.download_bytes), file_bytes=int(final.file_bytes),
                host_latency_ms=float(final.latency_p50_ms), device_latency_ms=device.latency_ms,
                energy_mj=device.energy_mj, accuracy=final.accuracy, params=int(final.nonzero_params),
                macs=int(final.macs) if final.macs is not None else None,
                precision=result.final_state.precision, flags=tuple(final.flags))
            return on_model(Path(result.model_path), metrics) if on_model is not None else metrics
        except (EarlyStop, BuilderError):
            raise
        except Exception as exc:  # noqa: BLE001 - a library failure inside the engine, keep the cause
            raise SearchError(f"evaluating {recipe.to_dict()['step']} failed: {exc}") from exc
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def _baseline_metrics(self) -> CandidateMetrics:
        return CandidateMetrics(fidelity=self.baseline_fidelity, download_bytes=self.baseline.download_bytes,
                                file_bytes=int(Path(self.model.onnx_path).stat().st_size),
                                host_latency_ms=self.baseline.host_latency_ms,
                                device_latency_ms=self.baseline.device_latency_ms, energy_mj=self.baseline.energy_mj,
                                accuracy=self.baseline.accuracy, precision="fp32")


def _has_matmul(onnx_path: Path) -> bool:
    import onnx

    return any(n.op_type == "MatMul" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def _training_steps(steps: Mapping[str, type[CompressionStep]]) -> frozenset[str]:
    """Steps whose default parameters train (``requires_train_data()``): they need --train-data."""
    out = set()
    for name, cls in steps.items():
        try:
            instance = cls()
        except Exception:  # noqa: BLE001 - a step with required parameters: treat as training to be safe
            out.add(name)
            continue
        if instance.requires_train_data():
            out.add(name)
    return frozenset(out)
