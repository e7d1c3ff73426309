"""Artificial load for tests and demos (the re-compression loop uses it to make a device "slow").

- ``slowdown_factor`` f >= 1: every inference sleeps (f - 1) × the model's typical duration (the
  median of its last ``TYPICAL_WINDOW`` inferences) afterwards, so the field latency becomes f
  times the real one. Not × its own duration: on a loaded host one inference in twenty is
  preempted for a time slice (milliseconds), and multiplying that by f turned scheduling noise into
  the p95 — a ×10 slowdown made a 0.05 ms model read 4.6 ms at p95 and hid the difference
  between rungs the re-compression loop judges.
- ``cpu_burn_threads`` n with ``cpu_burn_duty`` d: n background threads spin d of each 100 ms,
  competing with inference for the CPU (a real, noisy slowdown).
Set in ``[load]`` of agent.toml or at run time with the ``set_load`` command.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Hashable

from agent.config import LoadSettings

TYPICAL_WINDOW = 31  # inferences the typical duration is the median of (per model)
_MAX_MODELS = 8      # typical durations kept (active model, a trial, the ones before)


class LoadController:
    def __init__(self, settings: LoadSettings | None = None) -> None:
        self._lock = threading.Lock()
        self._settings = LoadSettings()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._recent_s: dict[Hashable, deque[float]] = {}
        self.apply(settings or LoadSettings())

    @property
    def settings(self) -> LoadSettings:
        return self._settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self._settings)

    def apply(self, settings: LoadSettings) -> LoadSettings:
        if settings.slowdown_factor < 1.0:
            raise ValueError("slowdown_factor must be >= 1")
        if not 0.0 <= settings.cpu_burn_duty <= 1.0 or not 0 <= settings.cpu_burn_threads <= 64:
            raise ValueError("cpu_burn_duty must be in 0..1 and cpu_burn_threads in 0..64")
        with self._lock:
            self._stop_burners()
            self._settings = settings
            self._stop = threading.Event()
            for i in range(settings.cpu_burn_threads):
                thread = threading.Thread(target=self._burn, args=(self._stop, settings.cpu_burn_duty),
                                          daemon=True, name=f"cpu-burn-{i}")
                thread.start()
                self._threads.append(thread)
        return settings

    def after_inference(self, elapsed_s: float, model_key: Hashable = None) -> None:
        """Sleep the artificial slowdown after one inference of the model ``model_key`` took ``elapsed_s``."""
        delay_s = self.slowdown_delay_s(elapsed_s, model_key)
        if delay_s > 0:
            time.sleep(delay_s)

    def slowdown_delay_s(self, elapsed_s: float, model_key: Hashable = None) -> float:
        """Record one inference and return the sleep it gets: (f - 1) × the model's typical duration."""
        with self._lock:
            recent = self._recent_s.get(model_key)
            if recent is None:
                if len(self._recent_s) >= _MAX_MODELS:
                    self._recent_s.pop(next(iter(self._recent_s)))
                recent = self._recent_s[model_key] = deque(maxlen=TYPICAL_WINDOW)
            recent.append(elapsed_s)
            typical_s = statistics.median(recent)
        return max(0.0, (self._settings.slowdown_factor - 1.0) * typical_s)

    def close(self) -> None:
        with self._lock:
            self._stop_burners()

    def _stop_burners(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1)
        self._threads = []

    @staticmethod
    def _burn(stop: threading.Event, duty: float) -> None:
        period = 0.1
        while not stop.is_set():
            end = time.perf_counter() + period * duty
            while time.perf_counter() < end:
                pass
            stop.wait(period * (1.0 - duty))
