"""A fast, deterministic evaluator for the search machinery's tests (no model, no ORT).

Metrics are analytic functions of the recipe (sparsity/clusters/int8 shrink the download and the
latency and cost quality), so the search, the cache, the constraints and the multi-worker path can
be tested in seconds. Every real evaluation appends one line to ``<setup.workdir>/evaluations.log``
so tests can count evaluations across processes. The engine-backed evaluator is tested separately.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from builder.search.evaluate import EarlyStop, EvaluationSetup, QualityCheck
from builder.search.objectives import Baseline, CandidateMetrics
from builder.search.space import SpaceOptions

BASE_ACCURACY = 0.97
BASE_BYTES = 1_000_000
BASE_LATENCY_MS = 10.0


class AnalyticEvaluator:
    model_hash = "analytic-model"
    context_hash = "analytic-context"
    use_accuracy = True
    task = "classify"
    estimate_source = "analytic test model"

    def __init__(self, setup: EvaluationSetup) -> None:
        self.setup = setup
        self.log = Path(setup.workdir or ".") / "evaluations.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.delay_s = float(os.environ.get("SEARCH_FAKE_DELAY_S", "0"))
        self.baseline = Baseline(accuracy=BASE_ACCURACY, download_bytes=BASE_BYTES, host_latency_ms=1.0,
                                 device_latency_ms=BASE_LATENCY_MS, energy_mj=BASE_LATENCY_MS * 4)
        self.space_options = SpaceOptions(
            torch_available=True, has_train_data=False,
            available_steps=frozenset({"prune", "prune_channels", "cluster", "fold", "quantize"}))

    def evaluate(self, steps: Sequence[Mapping[str, Any]], quality_check: Optional[QualityCheck] = None) -> CandidateMetrics:
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps([dict(s) for s in steps], sort_keys=True) + "\n")
        if self.delay_s:
            time.sleep(self.delay_s)
        quality, size, latency = BASE_ACCURACY, float(BASE_BYTES), BASE_LATENCY_MS
        for index, step in enumerate(steps, start=1):
            kind = step["type"]
            if kind == "prune_channels":
                quality -= 0.08 * step["ratio"] ** 2
                size *= (1 - step["ratio"]) ** 2
                latency *= (1 - step["ratio"]) ** 2
            elif kind == "prune":
                quality -= 0.03 * step["final_sparsity"] ** 3
                size *= 1 - 0.8 * step["final_sparsity"]
            elif kind == "cluster":
                quality -= 0.02 * 8 / step["clusters"]
                size *= 0.5
            elif kind == "quantize":
                quality -= {"dynamic": 0.006, "static": 0.004, "fp16": 0.0005}[step["mode"]] / (1 + step.get("max_kept", 0))
                size *= 0.5 if step["mode"] == "fp16" else 0.27
                latency *= 0.8 if step["mode"] == "fp16" else 0.45 + 0.02 * step.get("max_kept", 0)
            if quality_check is not None and all(s["type"] in ("fold", "quantize") for s in steps[index:]):
                reason = quality_check(quality, quality / BASE_ACCURACY)
                if reason:
                    raise EarlyStop(reason, index, quality, quality / BASE_ACCURACY)
        return CandidateMetrics(fidelity=quality / BASE_ACCURACY, download_bytes=int(size), file_bytes=int(size * 1.1),
                                host_latency_ms=latency / 10, device_latency_ms=latency, energy_mj=latency * 4,
                                accuracy=quality, precision="int8" if any(s["type"] == "quantize" for s in steps) else "fp32")

    def close(self) -> None:
        pass


def count_evaluations(workdir: Path) -> int:
    path = Path(workdir) / "evaluations.log"
    return len(path.read_text().splitlines()) if path.exists() else 0
