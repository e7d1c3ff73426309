"""``--measure-on DEVICE``: candidates benchmarked on a real device of the fleet during the search.

A candidate that meets every host-side constraint (quality, size) is built for the search's profile
as a signed artifact from exactly the ONNX file the search evaluated (the pipeline's compile,
verify, package, sign and register, with the user's keys), sent to the device as a benchmark-only
trial (``builder.fleet.rollout.trial``), and its latency objective becomes the measured p50. Candidates
that fail a host-side constraint are not worth a device's time: they keep the calibrated estimate,
and the report says which is which (``latency_source``).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from builder.errors import BuilderError, SearchError, TargetError
from builder.search.objectives import CandidateMetrics

log = logging.getLogger(__name__)

TRIAL_VERSION = "trial"  # registry version of trial artifacts (model name: the searched model's)
ESTIMATE = "estimate"


@dataclass(frozen=True)
class MeasureSetup:
    """Where and how to measure (plain data: search worker processes get a copy)."""

    device_id: str
    data_dir: str  # registry, signing keys and fleet store
    store_url: str | None = None  # the fleet store elsewhere: postgresql://… (--store)
    broker: Optional[str] = None  # None: the broker of this data dir's running `builder serve`
    runs: int = 50
    warmup: int = 5
    timeout_s: float = 300.0
    status_timeout_s: float = 10.0


def latency_source(metrics: CandidateMetrics) -> str:
    """What a report says about a candidate's latency objective."""
    if metrics.measured_on_device_ms is not None:
        return f"measured on {metrics.measured_on or 'a device'}"
    return ESTIMATE


def trial_target(profile: Any, precision: Optional[str]) -> Any:
    """The BuildRequest for trial artifacts: the profile's runtime and format (as its ladder would be
    built), ONNX Runtime where the profile prefers LiteRT (a candidate is an ONNX graph), at the
    precision the candidate already has (no second quantization)."""
    from builder.targets.pipeline import BuildRequest
    from builder.targets.profile_build import DEFAULT_FORMAT, choose_target

    choice = choose_target(profile, None, None, None, has_recipe=True)
    runtime, fmt = choice.runtime, choice.format
    if not runtime.startswith("onnxruntime"):
        if "onnxruntime" not in profile.runtimes:
            raise TargetError(f"profile {profile.name} runs {', '.join(profile.runtimes)} but no ONNX Runtime; on-device "
                              "trials ship the search's ONNX candidates: measure on a device with onnxruntime")
        runtime, fmt = "onnxruntime", DEFAULT_FORMAT["onnxruntime"]
    return BuildRequest(profile, runtime, precision or choice.precision, fmt)


def open_device(setup: MeasureSetup, profile: Any) -> Any:
    """Connect and require the device to answer, before the search loads anything: an unknown or
    offline device is a one-line error naming it and the fix (``DeviceUnavailableError``)."""
    from builder.fleet.rollout.trial import DeviceTrials, TrialSettings
    from builder.fleet.transport.link import resolve_endpoint

    trial_target(profile, None)  # a profile without ONNX Runtime cannot run the candidates
    home = Path(setup.data_dir)
    try:
        endpoint = resolve_endpoint(home, setup.broker)
    except BuilderError as exc:
        raise type(exc)(f"--measure-on {setup.device_id}: {exc}") from exc
    settings = TrialSettings(runs=setup.runs, warmup=setup.warmup, timeout_s=setup.timeout_s,
                             status_timeout_s=setup.status_timeout_s)
    trials = DeviceTrials(endpoint, home, setup.device_id, settings, store_url=setup.store_url).open()
    device_profile = trials.device_status.get("profile")
    if device_profile and device_profile != profile.name:
        log.warning("%s is a %s device but the search estimates %s: its measurements are %s's, not the profile's",
                    setup.device_id, device_profile, profile.name, setup.device_id)
    return trials


class DeviceMeasure:
    """``measure(onnx_path, steps, metrics) -> metrics`` with the device's measurement filled in.
    Owns ``trials`` (an open ``DeviceTrials``) and closes it."""

    def __init__(self, setup: MeasureSetup, trials: Any, *, profile: Any, model_name: str, inputs: Sequence[Any],
                 data: Any, workdir: Optional[Path] = None) -> None:
        from agent.manifest import TensorSpec
        from builder.artifacts.registry import Registry
        from builder.artifacts.signing import key_paths, load_private_key
        from builder.targets.pipeline import samples_from_arrays
        from builder.targets.profile_build import default_key_dir

        self.setup = setup
        self.trials = trials
        self.profile = profile
        self.model_name = model_name
        self.inputs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in inputs)
        home = Path(setup.data_dir)
        self.registry = Registry(home)
        self.private_key = load_private_key(key_paths(default_key_dir(home)).private)
        self.samples = samples_from_arrays(data.inputs, data.labels, 16, data.origin, data.batch_axes)
        self.workdir = Path(tempfile.mkdtemp(prefix="measure-", dir=workdir))

    @classmethod
    def for_evaluator(cls, setup: MeasureSetup, trials: Any, evaluator: Any, workdir: Optional[Path] = None) -> "DeviceMeasure":
        """From the search's evaluator: its profile, model inputs and evaluation data (the build's
        verification samples)."""
        model, data, profile = (getattr(evaluator, name, None) for name in ("model", "data", "profile"))
        if model is None or data is None or profile is None:
            raise SearchError(f"--measure-on needs an evaluator with a model, data and profile; "
                              f"{type(evaluator).__name__} has none")
        return cls(setup, trials, profile=profile, model_name=model.name, inputs=model.inputs, data=data, workdir=workdir)

    def close(self) -> None:
        self.trials.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def build(self, onnx_path: Path, steps: Sequence[Mapping[str, Any]], precision: Optional[str]) -> Any:
        """Compile, verify (against the candidate itself: the device must run what was evaluated),
        package, sign and register the candidate; an identical earlier build is reused."""
        from builder.search.evaluate import hash_file
        from builder.search.space import recipe_from_steps
        from builder.targets.pipeline import BuildModel, build_artifact

        request = trial_target(self.profile, precision)
        recipe = recipe_from_steps(steps).to_dict() if steps else {}
        model = BuildModel(name=self.model_name, version=TRIAL_VERSION, onnx_path=Path(onnx_path), inputs=self.inputs,
                           reference_onnx_path=Path(onnx_path), source_sha256=hash_file(Path(onnx_path)), recipe=recipe)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=self.workdir))
        try:
            return build_artifact(model, request, self.samples, registry=self.registry, private_key=self.private_key,
                                  workdir=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def measure(self, onnx_path: Path, steps: Sequence[Mapping[str, Any]], metrics: CandidateMetrics) -> CandidateMetrics:
        """Build, run the trial, return the metrics with the measured latency. Errors propagate: a
        candidate the device cannot run fails its trial; ``DeviceUnavailableError`` stops the search."""
        built = self.build(onnx_path, steps, metrics.precision)
        measurement = self.trials.measure(built.artifact_id)
        log.info("%s on %s: p50 %.3f ms (roofline estimate %.3f ms)", built.artifact_id[:12], self.setup.device_id,
                 measurement.p50_ms, metrics.device_latency_ms)
        return dataclasses.replace(metrics, measured_on_device_ms=measurement.p50_ms, measured_p95_ms=measurement.p95_ms,
                                   measured_on=self.setup.device_id, trial_artifact_id=built.artifact_id)
