"""The recipe search: an optuna multi-objective study over the recipe space.

* Objectives (all minimised): ``1 - quality``, calibrated device latency, download size, energy.
* Constraints (``--max-latency`` …) go to the sampler through ``trial.set_constraint`` (NSGA-II / TPE rank
  feasible points first); a candidate whose quality already misses its floor after the last step
  that could still recover it is stopped mid-run and recorded as PRUNED (no wasted quantization).
* The study lives in optuna's storage (SQLite file in the output folder by default, or any RDB URL
  such as ``postgresql://…``); several processes or machines running the same command with the same
  ``--storage`` and ``--study`` are workers of one search. ``--jobs N`` starts N-1 extra local worker
  processes next to this one. An interrupted search resumes: the finished trials are in the study
  and ``--trials N`` counts the study's total.
* Every evaluation goes through the candidate cache (same model + recipe + context → no re-run).
* ``--measure-on DEVICE`` (``measure.py``): candidates that meet the host-side constraints are
  benchmarked on that device and its p50 becomes their latency objective; the device must answer
  before anything is evaluated, and one that stops answering stops the search.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from builder.errors import BuilderError, DeviceUnavailableError, SearchError, UsageError
from builder.search.cache import CandidateCache, cache_key
from builder.search.evaluate import CandidateEvaluator, EarlyStop, EvaluationSetup
from builder.search.measure import DeviceMeasure, MeasureSetup, latency_source, open_device
from builder.search.objectives import (
    OBJECTIVE_NAMES,
    QUALITY_CONSTRAINTS,
    Baseline,
    Calibration,
    CandidateMetrics,
    ScoredCandidate,
    Targets,
    calibration_from_measurements,
    check_targets_against_data,
    constraint_values,
    objective_values,
    score,
)
from builder.search.space import SearchSpace, build_space, canonical, describe, starting_points

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "tpe")
DEFAULT_EVALUATOR = "builder.search.evaluate:EngineEvaluator"


@dataclass(frozen=True)
class SearchConfig:
    """One search, as plain data (worker processes receive a copy)."""

    setup: EvaluationSetup
    targets: Targets
    out_dir: str
    cache_path: str
    storage: Optional[str] = None  # optuna RDB URL; None -> sqlite:///<out_dir>/study.db
    study_name: Optional[str] = None  # None -> derived from model, context, targets and space
    trials: Optional[int] = None  # total for the study (resume counts finished ones)
    time_budget_s: Optional[float] = None
    jobs: int = 1
    sampler: str = "nsga2"
    population_size: int = 12
    seed: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    evaluator: str = DEFAULT_EVALUATOR  # "module:callable(EvaluationSetup) -> CandidateEvaluator"
    measure: Optional[MeasureSetup] = None  # --measure-on: benchmark candidates on this fleet device
    run_id: str = ""  # marks this run's trials (counters for the report)
    deadline: Optional[float] = None  # epoch seconds; set from time_budget_s when the run starts

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out_dir).resolve() / 'study.db'}"


@dataclass(frozen=True)
class Progress:
    finished: int
    total: Optional[int]
    elapsed_s: float
    best: Optional[str]  # one-line description of the current recommended/closest point


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished search knows: every evaluated candidate, and the counters for the report."""

    study_name: str
    storage: str
    candidates: tuple[ScoredCandidate, ...]
    baseline: Baseline
    calibration: Calibration
    use_accuracy: bool
    task: str
    estimate_source: str
    trials_total: int
    trials_by_state: dict[str, int]
    evaluations_this_run: int
    cache_hits_this_run: int
    pruned: tuple[dict[str, Any], ...]
    failed: tuple[dict[str, Any], ...]
    wall_s: float
    measure_on: Optional[str] = None  # the device candidates were benchmarked on (--measure-on)


def make_evaluator(config: SearchConfig) -> CandidateEvaluator:
    from builder.loading.references import resolve_reference

    return resolve_reference(config.evaluator, SearchError)(config.setup)


def default_study_name(evaluator: CandidateEvaluator, config: SearchConfig, space: SearchSpace) -> str:
    """Same model, data, device, targets and space → same name, so a rerun resumes the same study."""
    parts = [evaluator.model_hash, evaluator.context_hash, json.dumps(config.targets.to_dict(), sort_keys=True),
             json.dumps([(p.name, list(p.choices)) for p in space.parameters]), config.sampler]
    if config.measure is not None:  # measured and estimated latencies do not mix in one study
        parts.append(f"measured-on:{config.measure.device_id}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return f"optimize-{config.setup.device}-{digest}"


def open_storage(url: str) -> Any:
    """An optuna RDB storage; SQLite gets a long busy timeout (several worker processes share it)."""
    import optuna

    import warnings

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        kwargs["connect_args"] = {"timeout": 120}
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeat is "experimental" in optuna 5; it fails trials of killed workers
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)
        except ImportError as exc:
            raise SearchError(f"storage '{url}' needs a database driver that is not installed ({exc}); "
                              "e.g. pip install psycopg2-binary for postgresql://") from exc
        except Exception as exc:  # sqlalchemy errors: bad URL, unreachable server, creation race
            # Two workers creating the same fresh database race on CREATE TABLE: the loser retries.
            if not any(m in str(exc) for m in ("already exists", "locked", "UNIQUE constraint failed")):
                raise SearchError(f"cannot open the study storage '{url}' ({str(exc).splitlines()[0]}); check --storage") from exc
            last = exc
            time.sleep(0.5 + attempt * 0.5)
    raise SearchError(f"cannot open the study storage '{url}' ({last}); check --storage")


def _sampler(config: SearchConfig, worker_index: int) -> Any:
    """Seeded sampler; constraints reach it through ``trial.set_constraint`` (optuna 5's API, which
    replaces the deprecated ``constraints_func``: NSGA-II uses constrained domination, TPE ranks
    infeasible trials below feasible ones). Each worker gets its own seed so workers diverge."""
    import optuna

    seed = config.seed + worker_index
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=seed)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, config.population_size),
                                          multivariate=True, warn_independent_sampling=False)
    raise UsageError(f"unknown sampler '{config.sampler}'; use one of {', '.join(SAMPLERS)}")


def _load_study(config: SearchConfig, study_name: str, worker_index: int) -> Any:
    import optuna

    storage = open_storage(config.storage_url())
    try:
        return optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                   directions=["minimize"] * len(OBJECTIVE_NAMES),
                                   sampler=_sampler(config, worker_index))
    except ValueError as exc:  # directions differ from an existing study of that name
        raise SearchError(f"study '{study_name}' in {config.storage_url()} is not a recipe search like this one "
                          f"({exc}); pick another --study") from exc


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=states))


def quality_check_for(targets: Targets, baseline: Baseline) -> Callable[[Optional[float], float], Optional[str]]:
    """Reason to stop a candidate whose quality already misses a floor (None = keep going)."""

    def check(accuracy: Optional[float], fidelity: float) -> Optional[str]:
        if targets.min_fidelity is not None and fidelity < targets.min_fidelity:
            return f"fidelity {fidelity:.4f} < min {targets.min_fidelity:g}"
        if (targets.max_accuracy_drop is not None and accuracy is not None and baseline.accuracy is not None
                and baseline.accuracy - accuracy > targets.max_accuracy_drop):
            return (f"accuracy drop {(baseline.accuracy - accuracy) * 100:.2f} pt > "
                    f"max {targets.max_accuracy_drop * 100:g} pt")
        if targets.min_accuracy is not None and accuracy is not None and accuracy < targets.min_accuracy:
            return f"accuracy {accuracy:.4f} < min {targets.min_accuracy:g}"
        return None

    return check


class _Counters:
    def __init__(self) -> None:
        self.evaluations = 0
        self.cache_hits = 0
        self.device_lost: Optional[DeviceUnavailableError] = None  # --measure-on device stopped answering


def meets_host_constraints(metrics: CandidateMetrics, targets: Targets, baseline: Baseline,
                           calibration: Calibration) -> bool:
    """Everything but latency holds: the candidate is worth a device's time."""
    return all(v <= 0 for name, v in constraint_values(metrics, targets, baseline, calibration).items()
               if name != "max-latency")


def _objective(config: SearchConfig, evaluator: CandidateEvaluator, space: SearchSpace, cache: CandidateCache,
               counters: _Counters, measure: Optional[DeviceMeasure]) -> Callable[[Any], tuple[float, ...]]:
    import optuna

    targets = config.targets
    names = targets.names
    check = quality_check_for(targets, evaluator.baseline) if targets.has_quality_target else None
    # Measurements belong to one device: cached metrics of another device (or none) must not answer.
    context_hash = evaluator.context_hash + (f"|measured-on:{config.measure.device_id}" if config.measure else "")

    def objective(trial: Any) -> tuple[float, ...]:
        values = space.sample(trial)
        steps = space.steps(values)
        try:
            return evaluate_trial(trial, steps)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as exc:  # every failed trial keeps its reason (report.json "failed", the console)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            trial.set_user_attr("error", f"{type(exc).__name__}: {message}")
            log.warning("trial %d failed (%s): %s", trial.number, describe(steps), message)
            if isinstance(exc, DeviceUnavailableError):
                counters.device_lost = exc
                trial.study.stop()  # every later trial would wait for it too
            if isinstance(exc, BuilderError):
                raise
            raise SearchError(f"trial {trial.number} failed: {type(exc).__name__}: {message}") from exc

    def evaluate_trial(trial: Any, steps: tuple[dict[str, Any], ...]) -> tuple[float, ...]:
        recipe_text = canonical(steps)
        key = cache_key(evaluator.model_hash, context_hash, recipe_text)
        trial.set_user_attr("steps", [dict(s) for s in steps])
        trial.set_user_attr("recipe_key", key)
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("run_id", config.run_id)
        metrics = cache.get(key)
        stopped = cache.get_stopped(key) if metrics is None and check is not None else None
        if stopped is not None and check is not None and check(stopped[0], stopped[1]) is not None:
            counters.cache_hits += 1
            _prune(trial, names, f"{check(stopped[0], stopped[1])} (cached: {stopped[2]})", cache_hit=True)
        if metrics is not None:
            counters.cache_hits += 1
            trial.set_user_attr("cache_hit", True)
        else:
            started = time.perf_counter()
            try:
                if measure is None:
                    metrics = evaluator.evaluate(steps, check)
                else:
                    def on_model(path: Path, found: CandidateMetrics) -> CandidateMetrics:
                        if not meets_host_constraints(found, targets, evaluator.baseline, config.calibration):
                            return found  # misses quality or size already: the estimate is enough
                        return measure.measure(path, steps, found)

                    metrics = evaluator.evaluate(steps, check, on_model=on_model)  # type: ignore[call-arg]
            except EarlyStop as stop:
                counters.evaluations += 1
                cache.put_stopped(key, stop.accuracy, stop.fidelity, stop.reason)
                _prune(trial, names, stop.reason, cache_hit=False)
            seconds = time.perf_counter() - started
            counters.evaluations += 1
            cache.put(key, evaluator.model_hash, recipe_text, metrics, seconds)
            trial.set_user_attr("cache_hit", False)
            trial.set_user_attr("seconds", round(seconds, 3))
        violations = constraint_values(metrics, targets, evaluator.baseline, config.calibration)
        trial.set_user_attr("metrics", metrics.to_dict())
        trial.set_user_attr("latency_source", latency_source(metrics))
        for name in names:
            trial.set_constraint(name, violations[name])
        return objective_values(metrics, config.calibration, evaluator.use_accuracy)

    return objective


def _prune(trial: Any, names: Sequence[str], reason: str, cache_hit: bool) -> NoReturn:
    """Record a candidate that misses its quality floor and stop the trial (optuna PRUNED)."""
    import optuna

    for name in names:  # the quality floor is missed; the rest is unknown (0 = not held against it)
        trial.set_constraint(name, 1.0 if name in QUALITY_CONSTRAINTS else 0.0)
    trial.set_user_attr("pruned_reason", reason)
    trial.set_user_attr("cache_hit", cache_hit)
    log.info("trial %d pruned: %s", trial.number, reason)
    raise optuna.TrialPruned(reason)


def _open_measure_device(config: SearchConfig) -> Any:
    """``--measure-on``: connect and require the device to answer (an open ``DeviceTrials``), or None."""
    if config.measure is None:
        return None
    from builder.profiles import get_profile

    setup = config.setup
    profile = get_profile(setup.device, [Path(setup.profiles_dir)] if setup.profiles_dir else None)
    return open_device(config.measure, profile)


def run_worker(config: SearchConfig, worker_index: int = 0,
               on_trial: Optional[Callable[[Any, Any], None]] = None,
               evaluator: Optional[CandidateEvaluator] = None, device: Any = None) -> _Counters:
    """Run trials of the study until the study has ``config.trials`` finished trials or the time is up.

    ``device``: the ``--measure-on`` connection ``run_search`` opened (a spawned worker opens its own);
    this function closes it. ``DeviceUnavailableError`` when that device stopped answering.
    """
    import optuna

    if config.study_name is None:
        raise SearchError("internal: run_worker needs a resolved study name")
    # optuna would log each failed trial with a traceback; failures are one line here and in the report
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    own_evaluator = evaluator is None
    evaluator = evaluator or make_evaluator(config)
    space = build_space(evaluator.space_options)
    cache = CandidateCache(Path(config.cache_path))
    counters = _Counters()
    measure: Optional[DeviceMeasure] = None
    try:
        study = _load_study(config, config.study_name, worker_index)
        if config.measure is not None:
            device = device or _open_measure_device(config)
            measure = DeviceMeasure.for_evaluator(config.measure, device, evaluator,
                                                  Path(config.setup.workdir) if config.setup.workdir else None)
        callbacks: list[Callable[[Any, Any], None]] = []
        if config.trials is not None:
            callbacks.append(optuna.study.MaxTrialsCallback(
                config.trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                       optuna.trial.TrialState.FAIL)))
            if _finished(study) >= config.trials:
                return counters
        if on_trial is not None:
            callbacks.append(on_trial)
        timeout = config.time_budget_s
        if config.deadline is not None:  # spawned workers start late (model load): share one deadline
            timeout = config.deadline - time.time()
            if timeout <= 0:
                return counters
        study.optimize(_objective(config, evaluator, space, cache, counters, measure),
                       timeout=timeout, callbacks=callbacks, catch=(BuilderError,))
        if counters.device_lost is not None:
            raise counters.device_lost
        return counters
    finally:
        cache.close()
        if measure is not None:
            measure.close()
        elif device is not None:
            device.close()
        if own_evaluator and hasattr(evaluator, "close"):
            evaluator.close()


def _worker_process(config: SearchConfig, worker_index: int) -> None:
    """Entry point of a ``--jobs`` worker process (spawned: a fresh interpreter, no shared state)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        run_worker(config, worker_index)
    except KeyboardInterrupt:
        pass


def scored_candidates(study: Any, targets: Targets, baseline: Baseline, calibration: Calibration,
                      use_accuracy: bool) -> list[ScoredCandidate]:
    """Every COMPLETE trial of the study, re-scored with this run's calibration and baseline."""
    import optuna

    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "metrics" not in trial.user_attrs:
            continue
        metrics = CandidateMetrics.from_dict(trial.user_attrs["metrics"])
        out.append(score(trial.user_attrs.get("recipe_key", str(trial.number)), trial.user_attrs.get("steps", []),
                         metrics, targets, baseline, calibration, use_accuracy, trial_number=trial.number))
    return out


def run_search(config: SearchConfig, on_progress: Optional[Callable[[Progress], None]] = None,
               evaluator: Optional[CandidateEvaluator] = None) -> SearchOutcome:
    """Run (or resume, or join) the search; returns every candidate the study holds.

    This process is worker 0; ``config.jobs - 1`` more are spawned and joined. KeyboardInterrupt
    stops the extra workers and propagates (the study keeps every finished trial).
    """
    import optuna

    from builder.search.pareto import recommend

    if config.trials is None and config.time_budget_s is None:
        raise UsageError("give the search a limit: --trials N or --time-budget 30m")
    if config.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if not config.run_id:
        config = dataclasses.replace(config, run_id=f"{os.getpid()}-{time.time_ns()}")
    if config.time_budget_s is not None and config.deadline is None:
        config = dataclasses.replace(config, deadline=time.time() + config.time_budget_s)
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    own_evaluator = evaluator is None
    device = _open_measure_device(config)  # an unknown or offline --measure-on device: refused before any work
    try:
        evaluator = evaluator or make_evaluator(config)
    except BaseException:
        if device is not None:
            device.close()
        raise
    try:
        check_targets_against_data(config.targets, evaluator.use_accuracy)  # before any trial, not inside each
        space = build_space(evaluator.space_options)
        if not space.parameters:
            raise SearchError("nothing to search: no compression step applies to this model "
                              f"(engine steps: {sorted(evaluator.space_options.available_steps)})")
        if config.study_name is None:
            config = dataclasses.replace(config, study_name=default_study_name(evaluator, config, space))
        assert config.study_name is not None
        study = _load_study(config, config.study_name, 0)
        if not study.get_trials(deepcopy=False):  # a new study (not a resumed or joined one)
            for point in starting_points(space):
                study.enqueue_trial(point, skip_if_exists=True)
        baseline = evaluator.baseline

        def on_trial(study: Any, _trial: Any) -> None:
            if on_progress is None:
                return
            candidates = scored_candidates(study, config.targets, baseline, config.calibration, evaluator.use_accuracy)
            chosen = recommend(candidates, config.targets)
            best = describe(chosen.steps) if chosen is not None else None
            on_progress(Progress(_finished(study), config.trials, time.perf_counter() - started, best))

        if on_progress is not None:
            on_progress(Progress(_finished(study), config.trials, 0.0, None))
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_worker_process, args=(config, index), daemon=False)
                   for index in range(1, config.jobs)]
        for worker in workers:
            worker.start()
        try:
            run_worker(config, 0, on_trial=on_trial, evaluator=evaluator, device=device)
            for worker in workers:
                worker.join()
        except BaseException:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join(timeout=10)
            raise
        study = _load_study(config, config.study_name, 0)
        trials = study.get_trials(deepcopy=False)
        by_state: dict[str, int] = {}
        for trial in trials:
            by_state[trial.state.name] = by_state.get(trial.state.name, 0) + 1
        pruned = tuple({"trial": t.number, "steps": t.user_attrs.get("steps"), "reason": t.user_attrs.get("pruned_reason")}
                       for t in trials if t.state == optuna.trial.TrialState.PRUNED)
        this_run = [t for t in trials if t.user_attrs.get("run_id") == config.run_id]
        evaluations = sum(1 for t in this_run if t.user_attrs.get("cache_hit") is False)
        cache_hits = sum(1 for t in this_run if t.user_attrs.get("cache_hit") is True)
        failed = tuple({"trial": t.number, "steps": t.user_attrs.get("steps"), "error": t.user_attrs.get("error")}
                       for t in trials if t.state == optuna.trial.TrialState.FAIL)
        candidates = scored_candidates(study, config.targets, baseline, config.calibration, evaluator.use_accuracy)
        calibration = config.calibration
        if config.measure is not None:  # the device's own trials calibrate the candidates it did not run
            calibration = calibration_from_measurements([c.metrics for c in candidates], config.calibration)
            if calibration != config.calibration:
                candidates = scored_candidates(study, config.targets, baseline, calibration, evaluator.use_accuracy)
        return SearchOutcome(
            study_name=config.study_name, storage=config.storage_url(),
            candidates=tuple(candidates),
            baseline=baseline, calibration=calibration, use_accuracy=evaluator.use_accuracy,
            task=getattr(evaluator, "task", "classify" if evaluator.use_accuracy else "embed"),
            estimate_source=getattr(evaluator, "estimate_source", "unknown"),
            trials_total=len(trials), trials_by_state=by_state, evaluations_this_run=evaluations,
            cache_hits_this_run=cache_hits, pruned=pruned, failed=failed,
            wall_s=time.perf_counter() - started,
            measure_on=config.measure.device_id if config.measure is not None else None)
    finally:
        if device is not None:
            device.close()
        if own_evaluator and hasattr(evaluator, "close"):
            evaluator.close()
