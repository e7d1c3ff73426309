"""The model currently served, swapped atomically; every real request is timed (field latency)
and watched for failures and latency regressions that call for an automatic rollback."""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Mapping

from agent.errors import AgentError, RuntimeBackendError
from agent.install import LoadedModel
from agent.load import LoadController
from agent.telemetry import FieldStats

if TYPE_CHECKING:
    import numpy as np


LATENCY_FLOOR_MS = 1.0


class NoModelError(AgentError):
    """No model is active yet."""


class ActiveModel:
    def __init__(self, stats: FieldStats, load: LoadController, *, rollback_after_errors: int = 3,
                 latency_regression_factor: float = 3.0, latency_min_requests: int = 20,
                 on_unhealthy: Callable[[str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self.stats = stats
        self.load = load
        self.rollback_after_errors = rollback_after_errors
        self.latency_regression_factor = latency_regression_factor
        self.latency_min_requests = latency_min_requests
        self.on_unhealthy = on_unhealthy
        self._consecutive_errors = 0
        self._recent_ms: deque[float] = deque(maxlen=max(latency_min_requests, 1))
        self._unhealthy_reported = False

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        with self._lock:
            old, self._model = self._model, model
            self._consecutive_errors = 0
            self._recent_ms.clear()
            self._unhealthy_reported = False
        return old

    def infer(self, feeds: Mapping[str, np.ndarray], record: bool = True) -> tuple[dict[str, np.ndarray], float]:
        """Run the active model; returns (outputs, latency_ms). ``record`` marks a real (field) request."""
        model = self._model
        if model is None:
            raise NoModelError("no model is active yet")
        t0 = time.perf_counter()
        try:
            outputs = model.runtime.run(feeds)
        except RuntimeBackendError as exc:
            if record:
                self.stats.record(None, ok=False)
                self._note_error(model, str(exc))
            raise
        self.load.after_inference(time.perf_counter() - t0, model_key=id(model))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if record:
            self.stats.record(latency_ms)
            self._note_latency(model, latency_ms)
        return outputs, latency_ms

    def _note_error(self, model: LoadedModel, message: str) -> None:
        self._consecutive_errors += 1
        if self.rollback_after_errors and self._consecutive_errors >= self.rollback_after_errors:
            self._unhealthy(model, f"{self._consecutive_errors} consecutive inference failures (last: {message})")

    def _note_latency(self, model: LoadedModel, latency_ms: float) -> None:
        self._consecutive_errors = 0
        if not self.latency_regression_factor or self.load.settings.slowdown_factor > 1.0:
            return  # an artificial slowdown is not a regression of the model
        self._recent_ms.append(latency_ms)
        if len(self._recent_ms) >= self.latency_min_requests:
            p50 = float(statistics.median(self._recent_ms))
            # Below ~1 ms, scheduling noise dominates: a sub-millisecond model is judged against 1 ms.
            bound = self.latency_regression_factor * max(model.health.baseline_p50_ms, LATENCY_FLOOR_MS)
            if p50 > bound:
                self._unhealthy(model, f"field p50 {p50:.2f} ms exceeds {self.latency_regression_factor}x the "
                                       f"install-time p50 {model.health.baseline_p50_ms:.2f} ms")

    def _unhealthy(self, model: LoadedModel, reason: str) -> None:
        with self._lock:
            if self._unhealthy_reported or self._model is not model:
                return
            self._unhealthy_reported = True
        if self.on_unhealthy is not None:
            self.on_unhealthy(reason)
