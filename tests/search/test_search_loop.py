"""The optuna loop with the analytic evaluator (tests/search/fakes.py): constraints, front, cache,
resume, early pruning, and several processes sharing one SQLite study. Seconds, not minutes."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.search.evaluate import EvaluationSetup
from builder.search.objectives import Targets
from builder.search.optimize import SearchConfig, run_search
from builder.search.pareto import dominates, front_of, recommend
from tests.search.fakes import count_evaluations

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.search.fakes:AnalyticEvaluator"


def _config(tmp_path: Path, out: str = "out", **kw) -> SearchConfig:
    setup = EvaluationSetup(model="analytic", device="raspberry-pi-4", data="-", workdir=str(tmp_path / "work"))
    base = dict(setup=setup, targets=Targets(max_accuracy_drop=0.01), out_dir=str(tmp_path / out),
                cache_path=str(tmp_path / "cache.sqlite"), trials=10, population_size=5, evaluator=FAKE)
    base.update(kw)
    return SearchConfig(**base)


def test_chosen_recipe_meets_targets_and_front_is_non_dominated(tmp_path):
    targets = Targets(max_accuracy_drop=0.01, max_download_bytes=400_000)
    outcome = run_search(_config(tmp_path, targets=targets, trials=16))
    assert outcome.trials_total == 16
    chosen = recommend(outcome.candidates, targets)
    assert chosen is not None
    assert outcome.baseline.accuracy - chosen.metrics.accuracy <= 0.01
    assert chosen.metrics.download_bytes <= 400_000
    front = front_of(outcome.candidates)
    for point in front:
        assert not any(dominates(other.objectives, point.objectives) for other in outcome.candidates)
    # no feasible candidate is faster than the chosen one (quality target => fastest feasible)
    assert all(c.objectives[1] >= chosen.objectives[1] for c in outcome.candidates if c.feasible)


def test_rerun_hits_the_cache_and_evaluates_nothing(tmp_path):
    first = run_search(_config(tmp_path, out="first", trials=6))
    evaluated = count_evaluations(tmp_path / "work")
    assert evaluated == first.evaluations_this_run > 0
    # a fresh study (another out dir) with the same seed proposes the same recipes: all from the cache
    second = run_search(_config(tmp_path, out="second", trials=6))
    assert count_evaluations(tmp_path / "work") == evaluated
    assert second.evaluations_this_run == 0
    assert second.cache_hits_this_run == 6 - len(second.pruned) - len(second.failed) or second.cache_hits_this_run > 0
    assert sorted(c.key for c in second.candidates) == sorted(c.key for c in first.candidates)


def test_interrupted_study_resumes_up_to_the_total(tmp_path):
    run_search(_config(tmp_path, trials=4))
    resumed = run_search(_config(tmp_path, trials=9))
    assert resumed.trials_total == 9  # the same study continued: 4 kept + 5 new
    again = run_search(_config(tmp_path, trials=9))
    assert again.trials_total == 9 and again.evaluations_this_run == 0 and again.cache_hits_this_run == 0


def test_candidates_missing_the_quality_floor_are_pruned_early(tmp_path):
    outcome = run_search(_config(tmp_path, targets=Targets(max_accuracy_drop=0.0005), trials=12))
    assert outcome.pruned, "a floor of 0.05 pt must stop some candidates before their graph steps"
    assert all("accuracy drop" in p["reason"] for p in outcome.pruned)


def test_two_processes_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        # start together (interpreter start-up differs a lot on a loaded machine)
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        (Path(sys.argv[1]) / "ready").write_text("")
        deadline = time.time() + 120
        while not all((Path(sys.argv[1]).parent / f"w{{i}}" / "ready").exists() for i in range(2)):
            assert time.time() < deadline, "the other worker never started"
            time.sleep(0.05)
        from builder.search.evaluate import EvaluationSetup
        from builder.search.objectives import Targets
        from builder.search.optimize import SearchConfig, run_search
        out = Path(sys.argv[1])
        setup = EvaluationSetup(model="analytic", device="raspberry-pi-4", data="-", workdir=str(out / "work"))
        cfg = SearchConfig(setup=setup, targets=Targets(max_accuracy_drop=0.01), out_dir=str(out),
                           cache_path=str(out / "cache.sqlite"), storage="{storage}", study_name="shared",
                           trials=10, population_size=4, evaluator="{FAKE}", seed=int(sys.argv[2]))
        run_search(cfg)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEARCH_FAKE_DELAY_S="0.4")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"w{i}"), str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out.decode()[-2000:]
    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    pids = {t.user_attrs.get("worker_pid") for t in trials}
    assert len(pids) == 2, "both processes ran trials of the one study"
    assert 10 <= len(trials) <= 11  # the total is shared (a trial started just before the other finished may add one)
    assert count_evaluations(tmp_path / "w0" / "work") > 0 and count_evaluations(tmp_path / "w1" / "work") > 0


def test_jobs_spawns_local_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_FAKE_DELAY_S", "0.4")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    outcome = run_search(_config(tmp_path, trials=8, jobs=2))
    assert outcome.trials_total >= 8
    import optuna

    study = optuna.load_study(study_name=outcome.study_name, storage=outcome.storage)
    assert len({t.user_attrs.get("worker_pid") for t in study.get_trials(deepcopy=False)}) == 2


def test_limit_is_required_and_jobs_must_be_positive(tmp_path):
    from builder.errors import UsageError

    with pytest.raises(UsageError, match="--trials N or --time-budget"):
        run_search(_config(tmp_path, trials=None))
    with pytest.raises(UsageError, match="--jobs"):
        run_search(dataclasses.replace(_config(tmp_path), jobs=0))


def test_measure_on_without_a_broker_is_refused_before_any_evaluation(tmp_path):
    from builder.errors import FleetError
    from builder.search.measure import MeasureSetup

    setup = MeasureSetup(device_id="pi-01", data_dir=str(tmp_path / "home"))  # no --broker, no `builder serve`
    with pytest.raises(FleetError, match="--measure-on pi-01: .*pass --broker"):
        run_search(_config(tmp_path, measure=setup))
    assert count_evaluations(tmp_path / "work") == 0


def test_time_budget_stops_the_search(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCH_FAKE_DELAY_S", "0.3")
    outcome = run_search(_config(tmp_path, trials=None, time_budget_s=2.0))
    assert 1 <= outcome.trials_total <= 10  # ~0.3 s a trial: stopped by the clock, not by a count
    assert outcome.wall_s < 10
