"""Targets, objectives and constraints of a recipe search; the device latency model's calibration.

Pure functions over plain data: the optimiser (``optimize.py``) and the Pareto logic
(``pareto.py``) use them, the CLI parses user targets with them. Conventions:

* every objective is *minimised* internally (quality enters as ``1 - quality``) so the Pareto logic
  has one direction;
* a constraint value is ``<= 0`` when met and positive when violated, normalised by its target
  (``0.5`` = 50 % over), which is what optuna's ``constraints_func`` expects;
* quality is the task accuracy when the data has labels, else fidelity to the original model
  (top-1 agreement for classifiers, mean cosine for embedding models).
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from builder.errors import UsageError

OBJECTIVE_NAMES = ("quality_loss", "device_latency_ms", "download_bytes", "energy_mj")
OBJECTIVE_LABELS = {
    "quality_loss": "1 - quality",
    "device_latency_ms": "est. device latency (ms)",
    "download_bytes": "download size (bytes)",
    "energy_mj": "est. energy per inference (mJ)",
}

_LATENCY_UNITS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0}
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 10**3, "m": 10**6, "g": 10**9,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*$")


def _split(text: str, option: str, example: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.match(str(text))
    if not match:
        raise UsageError(f"{option} '{text}' is not a number with a unit; write it like {example}")
    return float(match.group(1)), match.group(2)


def parse_latency_ms(text: str, option: str = "--max-latency") -> float:
    """``"20ms"``, ``"0.02s"``, ``"500us"`` → milliseconds. A bare number is refused (unit needed)."""
    value, unit = _split(text, option, "20ms or 0.5s")
    if not unit:
        raise UsageError(f"{option} '{text}' has no unit; write it like 20ms or 0.5s")
    factor = _LATENCY_UNITS.get(unit.lower() if unit != "µs" else unit)
    if factor is None:
        raise UsageError(f"{option} '{text}': unknown unit '{unit}'; use us, ms or s (e.g. 20ms)")
    result = value * factor
    if result <= 0:
        raise UsageError(f"{option} must be positive; got '{text}'")
    return result


def parse_size_bytes(text: str, option: str = "--max-size") -> int:
    """``"5MB"`` (10^6), ``"5MiB"`` (2^20), ``"800kB"``, ``"1200B"`` → bytes."""
    value, unit = _split(text, option, "5MB, 5MiB or 800kB")
    if not unit:
        raise UsageError(f"{option} '{text}' has no unit; write it like 5MB, 5MiB or 800kB")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise UsageError(f"{option} '{text}': unknown unit '{unit}'; use B, kB, MB, GB, KiB, MiB or GiB")
    result = int(round(value * factor))
    if result <= 0:
        raise UsageError(f"{option} must be positive; got '{text}'")
    return result


def parse_accuracy_drop(text: str, option: str = "--max-accuracy-drop") -> float:
    """``"1%"`` → 0.01 (one percentage point). A bare number must be a fraction below 1 (``0.01``)."""
    value, unit = _split(text, option, "1% or 0.01")
    if unit == "%":
        result = value / 100.0
    elif unit == "":
        if value >= 1:
            raise UsageError(f"{option} '{text}' is ambiguous; write points as a percentage (1%) or a fraction (0.01)")
        result = value
    else:
        raise UsageError(f"{option} '{text}': unknown unit '{unit}'; write it like 1% or 0.01")
    if not 0 <= result < 1:
        raise UsageError(f"{option} must be between 0% and 100%; got '{text}'")
    return result


def parse_fidelity(text: str, option: str = "--min-fidelity") -> float:
    """``"0.99"`` or ``"99%"`` → 0.99 (top-1 agreement for classifiers, cosine for embeddings)."""
    value, unit = _split(text, option, "0.99 or 99%")
    if unit == "%":
        value /= 100.0
    elif unit:
        raise UsageError(f"{option} '{text}': unknown unit '{unit}'; write it like 0.99 or 99%")
    if not 0 < value <= 1:
        raise UsageError(f"{option} must be in (0, 1]; got '{text}'")
    return value


def parse_duration_s(text: str, option: str = "--time-budget") -> float:
    """``"30m"``, ``"1h"``, ``"90s"``, ``"100ms"`` → seconds."""
    value, unit = _split(text, option, "30m, 1h or 90s")
    factors = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    if unit.lower() not in factors:
        raise UsageError(f"{option} '{text}' needs a unit ms, s, m or h (e.g. 30m)")
    result = value * factors[unit.lower()]
    if result <= 0:
        raise UsageError(f"{option} must be positive; got '{text}'")
    return result


@dataclass(frozen=True)
class Targets:
    """What the user asked for; ``None`` means unconstrained."""

    max_latency_ms: Optional[float] = None
    max_download_bytes: Optional[int] = None
    max_accuracy_drop: Optional[float] = None  # fraction: 0.01 = one percentage point
    min_fidelity: Optional[float] = None
    min_accuracy: Optional[float] = None  # absolute floor (the re-compression loop's policy floor)

    @property
    def names(self) -> tuple[str, ...]:
        """The constraints in force, in ``CONSTRAINT_NAMES`` order."""
        return tuple(n for n in CONSTRAINT_NAMES if getattr(self, _CONSTRAINT_FIELD[n]) is not None)

    @property
    def has_quality_target(self) -> bool:
        return self.max_accuracy_drop is not None or self.min_fidelity is not None or self.min_accuracy is not None

    def describe(self) -> str:
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"latency ≤ {self.max_latency_ms:g} ms")
        if self.max_download_bytes is not None:
            parts.append(f"download ≤ {format_bytes(self.max_download_bytes)}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop ≤ {self.max_accuracy_drop * 100:g} pt")
        if self.min_fidelity is not None:
            parts.append(f"fidelity ≥ {self.min_fidelity:g}")
        if self.min_accuracy is not None:
            parts.append(f"accuracy ≥ {self.min_accuracy:g}")
        return ", ".join(parts) or "no targets"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONSTRAINT_NAMES = ("max-latency", "max-size", "max-accuracy-drop", "min-fidelity", "min-accuracy")
QUALITY_CONSTRAINTS = ("max-accuracy-drop", "min-fidelity", "min-accuracy")
_CONSTRAINT_FIELD = {
    "min-accuracy": "min_accuracy",
    "max-latency": "max_latency_ms",
    "max-size": "max_download_bytes",
    "max-accuracy-drop": "max_accuracy_drop",
    "min-fidelity": "min_fidelity",
}


@dataclass(frozen=True)
class CandidateMetrics:
    """What one evaluated recipe measured (device-independent facts plus the device estimate).

    ``device_latency_ms`` and ``energy_mj`` are *uncalibrated* roofline estimates for the search's
    profile; ``calibrated`` applies the per-device factor. ``accuracy`` is None without labels.
    """

    fidelity: float
    download_bytes: int
    file_bytes: int
    host_latency_ms: float
    device_latency_ms: float
    energy_mj: float
    accuracy: Optional[float] = None
    params: Optional[int] = None
    macs: Optional[int] = None
    precision: str = "fp32"
    flags: tuple[str, ...] = ()
    measured_on_device_ms: Optional[float] = None  # p50 of an on-device trial (``--measure-on``)
    measured_p95_ms: Optional[float] = None
    measured_on: Optional[str] = None  # the device id
    trial_artifact_id: Optional[str] = None  # the signed artifact the device ran

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CandidateMetrics":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["flags"] = tuple(values.get("flags", ()))
        return cls(**values)


@dataclass(frozen=True)
class Baseline:
    """The original model measured the same way: the reference for accuracy drop and ratios."""

    accuracy: Optional[float]
    download_bytes: int
    host_latency_ms: float
    device_latency_ms: float
    energy_mj: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """Per-device latency correction: device latency = roofline estimate × ``factor``.

    ``source`` says where the factor came from ("fleet store: 7 benchmarks", "--latency-factor",
    "none: …") so a report never hides an uncalibrated estimate.
    """

    factor: float = 1.0
    samples: int = 0
    source: str = "none: uncalibrated roofline estimate"


def calibration_from_pairs(pairs: Iterable[tuple[float, float]], source: str) -> Calibration:
    """``median(measured / estimated)`` over (measured_ms, estimated_ms) pairs; robust to outliers."""
    ratios = [m / e for m, e in pairs if e and e > 0 and m and m > 0 and math.isfinite(m / e)]
    if not ratios:
        return Calibration(source=f"none: {source} has no usable benchmarks")
    return Calibration(factor=float(statistics.median(ratios)), samples=len(ratios), source=f"{source}: {len(ratios)} benchmarks")


def calibration_from_measurements(metrics: Iterable[CandidateMetrics], fallback: Calibration) -> Calibration:
    """After a ``--measure-on`` search: ``median(measured p50 / roofline estimate)`` of its own trials
    (same device, same estimator) replaces the fleet store's profile-wide factor for the candidates
    that were not measured. An explicit ``--latency-factor`` is kept."""
    if fallback.source.startswith("--latency-factor"):
        return fallback
    measured = [m for m in metrics if m.measured_on_device_ms is not None]
    if not measured:
        return fallback
    devices = sorted({m.measured_on or "?" for m in measured})
    result = calibration_from_pairs(((m.measured_on_device_ms or 0.0, m.device_latency_ms) for m in measured),
                                    f"measured on {', '.join(devices)}")
    return result if result.samples else fallback


def quality_of(metrics: CandidateMetrics, use_accuracy: bool) -> float:
    """The quality the search maximises: accuracy with labels, fidelity without."""
    if use_accuracy and metrics.accuracy is not None:
        return metrics.accuracy
    return metrics.fidelity


def calibrated_latency_ms(metrics: CandidateMetrics, calibration: Calibration) -> float:
    """A real on-device measurement beats the calibrated estimate when there is one."""
    if metrics.measured_on_device_ms is not None:
        return metrics.measured_on_device_ms
    return metrics.device_latency_ms * calibration.factor


def objective_values(metrics: CandidateMetrics, calibration: Calibration, use_accuracy: bool) -> tuple[float, float, float, float]:
    """The four minimised objectives, in ``OBJECTIVE_NAMES`` order."""
    latency = calibrated_latency_ms(metrics, calibration)
    energy = metrics.energy_mj * (latency / metrics.device_latency_ms if metrics.device_latency_ms > 0 else 1.0)
    return (1.0 - quality_of(metrics, use_accuracy), latency, float(metrics.download_bytes), energy)


def check_targets_against_data(targets: Targets, has_labels: bool) -> None:
    """Refuse targets the data cannot measure, before the search spends any time on them."""
    needs = [name for name, value in (("--max-accuracy-drop", targets.max_accuracy_drop),
                                      ("--min-accuracy", targets.min_accuracy)) if value is not None]
    if needs and not has_labels:
        raise UsageError(f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} labels in --data (key 'y'), "
                         "and this data has none; "
                         "use --min-fidelity (agreement with the original model) without labels")


def constraint_values(metrics: CandidateMetrics, targets: Targets, baseline: Baseline,
                      calibration: Calibration) -> dict[str, float]:
    """Normalised violation per active constraint: ``<= 0`` met, ``0.25`` = 25 % beyond the target.

    The accuracy drop is normalised by the allowed drop (or by 1 point when 0 is allowed);
    fidelity by the missing distance to 1.
    """
    out: dict[str, float] = {}
    if targets.max_latency_ms is not None:
        out["max-latency"] = calibrated_latency_ms(metrics, calibration) / targets.max_latency_ms - 1.0
    if targets.max_download_bytes is not None:
        out["max-size"] = metrics.download_bytes / targets.max_download_bytes - 1.0
    if targets.max_accuracy_drop is not None:
        if metrics.accuracy is None or baseline.accuracy is None:
            raise UsageError("--max-accuracy-drop needs labels in --data (key 'y'); use --min-fidelity without labels")
        drop = baseline.accuracy - metrics.accuracy
        out["max-accuracy-drop"] = (drop - targets.max_accuracy_drop) / max(targets.max_accuracy_drop, 0.01)
    if targets.min_fidelity is not None:
        out["min-fidelity"] = (targets.min_fidelity - metrics.fidelity) / max(1.0 - targets.min_fidelity, 0.01)
    if targets.min_accuracy is not None:
        if metrics.accuracy is None:
            raise UsageError("--min-accuracy needs labels in --data (key 'y'); use --min-fidelity without labels")
        out["min-accuracy"] = (targets.min_accuracy - metrics.accuracy) / max(1.0 - targets.min_accuracy, 0.01)
    return out


def violation_text(name: str, metrics: CandidateMetrics, targets: Targets, baseline: Baseline,
                   calibration: Calibration) -> str:
    """Human words for one constraint: actual vs target and the gap (e.g. "31.2 ms > 20 ms by 11.2 ms")."""
    if name == "max-latency":
        v, t = calibrated_latency_ms(metrics, calibration), float(targets.max_latency_ms or 0)
        return f"est. latency {v:.2f} ms vs max {t:g} ms ({'over' if v > t else 'under'} by {abs(v - t):.2f} ms)"
    if name == "max-size":
        v, t = metrics.download_bytes, int(targets.max_download_bytes or 0)
        return f"download {format_bytes(v)} vs max {format_bytes(t)} ({'over' if v > t else 'under'} by {format_bytes(abs(v - t))})"
    if name == "max-accuracy-drop":
        drop = (baseline.accuracy or 0.0) - (metrics.accuracy or 0.0)
        t = float(targets.max_accuracy_drop or 0.0)
        return f"accuracy drop {drop * 100:.2f} pt vs max {t * 100:g} pt ({'over' if drop > t else 'under'} by {abs(drop - t) * 100:.2f} pt)"
    if name == "min-fidelity":
        v, t = metrics.fidelity, float(targets.min_fidelity or 0.0)
        return f"fidelity {v:.4f} vs min {t:g} ({'short' if v < t else 'above'} by {abs(t - v):.4f})"
    if name == "min-accuracy":
        v, t = metrics.accuracy or 0.0, float(targets.min_accuracy or 0.0)
        return f"accuracy {v:.4f} vs min {t:g} ({'short' if v < t else 'above'} by {abs(t - v):.4f})"
    raise ValueError(name)


def format_bytes(n: float) -> str:
    from builder.units import format_bytes as _format

    return _format(n)


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate as the Pareto logic sees it: its recipe key, metrics, objectives, violations."""

    key: str
    steps: tuple[Mapping[str, Any], ...]
    metrics: CandidateMetrics
    objectives: tuple[float, ...]
    violations: Mapping[str, float] = field(default_factory=dict)
    trial_number: Optional[int] = None

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.violations.values())

    @property
    def total_violation(self) -> float:
        return sum(max(0.0, v) for v in self.violations.values())


def score(key: str, steps: Sequence[Mapping[str, Any]], metrics: CandidateMetrics, targets: Targets,
          baseline: Baseline, calibration: Calibration, use_accuracy: bool,
          trial_number: Optional[int] = None) -> ScoredCandidate:
    return ScoredCandidate(
        key=key,
        steps=tuple(steps),
        metrics=metrics,
        objectives=objective_values(metrics, calibration, use_accuracy),
        violations=constraint_values(metrics, targets, baseline, calibration),
        trial_number=trial_number,
    )


def fleet_calibration(data_dir: Any, profile: str, store_url: str | None = None) -> Calibration:
    """Learn the device factor from agent benchmarks in the fleet store: ``median(measured p50 /
    the artifact's roofline estimate)`` over every (device of ``profile``, artifact of ``profile``)
    pair that has a benchmark. The estimate comes from the artifact's signed manifest
    (``est_device_latency_ms``, written by ``builder build``)."""
    from pathlib import Path

    from builder.fleet.transport.store import fleet_store_path, open_store

    data_dir = Path(data_dir)
    store_path = fleet_store_path(data_dir)
    if store_url is None and not store_path.is_file():
        return Calibration(source=f"none: no fleet store at {store_path} (uncalibrated roofline estimate)")
    from builder.artifacts.registry import Registry

    registry = Registry(data_dir)
    estimates: dict[str, float] = {}
    for record in registry.records(profile=profile):
        estimate = registry.manifest(record.artifact_id).metrics.get("est_device_latency_ms")
        if isinstance(estimate, (int, float)) and estimate > 0:
            estimates[record.artifact_id] = float(estimate)
    pairs: list[tuple[float, float]] = []
    with open_store(data_dir, store_url) as store:
        for device in store.devices():
            if device.profile != profile:
                continue
            for artifact_id, estimate in estimates.items():
                bench = store.latest_benchmark(device.device_id, artifact_id)
                if bench is not None and bench.p50_ms:
                    pairs.append((float(bench.p50_ms), estimate))
    return calibration_from_pairs(pairs, f"fleet store {store_path} ({profile} devices)")
