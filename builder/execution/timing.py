"""Latency on the build host: one model's median (``median_run_ms``, any runtime's run callable),
and models timed interleaved so all see the same machine load (``measure_interleaved`` by run
count, ``interleaved_round_times`` by time-boxed rounds) with the statistics over them."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from builder.execution.sessions import make_session, run_session


def median_run_ms(run: Callable[[], Any], runs: int = 20, warmup: int = 1) -> float:
    """Median ms of ``run()`` over ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def measure_latency(session: Any, feed: dict[str, np.ndarray], warmup_runs: int, timed_runs: int) -> tuple[float, float]:
    """(median, p95) milliseconds of ``session.run`` on ``feed`` after ``warmup_runs`` untimed runs."""
    (p50, p95), = measure_interleaved([session], feed, warmup_runs, timed_runs)
    return p50, p95


def measure_interleaved(sessions: Sequence[Any], feed: dict[str, np.ndarray], warmup_runs: int,
                        timed_runs: int) -> list[tuple[float, float]]:
    """(median, p95) ms per session, their runs alternating so all see the same machine load."""
    for session in sessions:
        for _ in range(warmup_runs):
            run_session(session, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(max(timed_runs, 1)):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append((time.perf_counter() - start) * 1000.0)
    return [(float(np.median(t)), float(np.percentile(t, 95))) for t in times]


def interleaved_median_ms(paths: Sequence[Path], feed: dict[str, np.ndarray], threads: int, rounds: int,
                          min_round_s: float) -> list[float]:
    """Median ms of each model at ``paths``; every round runs each model in turn for ``min_round_s``
    (time-boxed rounds, so a tiny and a large model each get enough runs), after 3 warm-up runs."""
    return pooled_medians(interleaved_round_times(paths, feed, threads, rounds, min_round_s))


def paired_ratio(baseline: Path, candidate: Path, feed: dict[str, np.ndarray], threads: int, rounds: int,
                 min_round_s: float) -> float:
    """Candidate / baseline latency, paired per round (see round_paired_ratio)."""
    return round_paired_ratio(interleaved_round_times([baseline, candidate], feed, threads, rounds, min_round_s), 1, 0)


def pooled_medians(times: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """Median ms of each model over all its runs (``times`` as ``interleaved_round_times`` gives them)."""
    return [float(np.median([t for one in model for t in one])) for model in times]


def round_paired_ratio(times: Sequence[Sequence[Sequence[float]]], numerator: int, denominator: int) -> float:
    """Median over rounds of (model ``numerator``'s median / model ``denominator``'s median) in that round.

    A load burst on a shared machine lasts longer than a short round and so lands in few rounds;
    pooling all runs first lets one burst that hit one model's turns decide the ratio (measured in
    CI: a model 0.6x its input read 1.43x slower in one pooled measurement).
    """
    return float(np.median([np.median(n) / max(float(np.median(d)), 1e-9)
                            for n, d in zip(times[numerator], times[denominator])]))


def interleaved_round_times(paths: Sequence[Path], feed: dict[str, np.ndarray], threads: int, rounds: int,
                            min_round_s: float) -> list[list[list[float]]]:
    """ms of every run, as ``[model][round][run]``; rounds alternate the models after 3 warm-up runs."""
    sessions = [make_session(p, threads) for p in paths]
    feeds = [{k: v for k, v in feed.items() if k in {i.name for i in s.get_inputs()}} for s in sessions]
    for session, f in zip(sessions, feeds):
        for _ in range(3):
            session.run(None, f)
    times: list[list[list[float]]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, f, out in zip(sessions, feeds, times):
            run_times: list[float] = []
            start_round = time.perf_counter()
            while True:
                start = time.perf_counter()
                session.run(None, f)
                run_times.append((time.perf_counter() - start) * 1000.0)
                if time.perf_counter() - start_round >= min_round_s:
                    break
            out.append(run_times)
    return times
