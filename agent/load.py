"""Artificial load for tests and demos (the re-compression loop uses it to make a device "slow").

- ``slowdown_factor`` f >= 1: every inference sleeps (f - 1) × its own duration afterwards, so the
  field latency becomes f times the real one.
- ``cpu_burn_threads`` n with ``cpu_burn_duty`` d: n background threads spin d of each 100 ms,
  competing with inference for the CPU (a real, noisy slowdown).
Set in ``[load]`` of agent.toml or at run time with the ``set_load`` command.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

from agent.config import LoadSettings


class LoadController:
    def __init__(self, settings: LoadSettings | None = None) -> None:
        self._lock = threading.Lock()
        self._settings = LoadSettings()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.apply(settings or LoadSettings())

    @property
    def settings(self) -> LoadSettings:
        return self._settings

    def as_dict(self) -> dict:
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

    def after_inference(self, elapsed_s: float) -> None:
        factor = self._settings.slowdown_factor
        if factor > 1.0:
            time.sleep((factor - 1.0) * elapsed_s)

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
