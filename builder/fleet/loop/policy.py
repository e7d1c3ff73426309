"""What a device must achieve in the field, and how fast the re-compression loop may react.

A policy is TOML, per device or per group (a device's own policy wins over its group's, which wins
over the fleet default ``*``)::

    [objective]
    latency_p95_ms = 20.0      # field p95 must stay at or under this ...
    window_s = 10.0            # ... measured over telemetry windows of this length

    [floor]                    # a rung below any floor is never pushed
    accuracy = 0.95            # optional: task accuracy measured by `builder optimize`
    fidelity = 0.98            # optional: agreement with the uncompressed model

    [budget]                   # optional
    energy_mj = 5.0            # predicted energy per inference
    memory_mb = 64.0           # predicted peak memory

    [pacing]
    violate_windows = 3        # K consecutive violating windows before stepping down
    cooldown_s = 60.0          # no new step for this long after a change
    judge_windows = 2          # windows on the new rung needed to judge a change
    min_improvement = 0.1      # a step down must cut p95 by at least this fraction
    headroom_fraction = 0.6    # p95 under objective x this counts as headroom ...
    headroom_windows = 10      # ... for this many consecutive windows before stepping up
    step_up_margin = 0.8       # a rung is a step-up candidate if predicted <= objective x this
    min_samples = 5            # windows with fewer inferences are ignored

    [search]
    enabled = true             # start `builder optimize` when no rung fits ...
    model = "builder.zoo.digits_cnn:trained"   # ... on this model source (file or package.module:factory)
    data = "digits.npz"        # ... evaluated on this data (--data of builder optimize)
    input_shape = "x=1x1x8x8"  # optional, as for builder optimize
    trials = 20

Policies are stored in the fleet store (table ``loop_policies`` of its schema) so ``builder serve``
and the CLI see the same thing; :func:`load_policy_file` validates before anything is written.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from builder.errors import UsageError

if TYPE_CHECKING:
    from builder.fleet.transport.store import FleetStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_SCOPE = "*"


@dataclass(frozen=True)
class Pacing:
    """How many windows and seconds the loop waits before acting (hysteresis and cooldown)."""

    violate_windows: int = 3
    cooldown_s: float = 60.0
    judge_windows: int = 2
    min_improvement: float = 0.1
    headroom_fraction: float = 0.6
    headroom_windows: int = 10
    step_up_margin: float = 0.8
    min_samples: int = 5


@dataclass(frozen=True)
class Policy:
    """A device's field objective, floors, budgets and pacing. Validated on construction."""

    latency_p95_ms: float
    window_s: float = 10.0
    accuracy_floor: Optional[float] = None
    fidelity_floor: Optional[float] = None
    energy_mj_budget: Optional[float] = None
    memory_mb_budget: Optional[float] = None
    pacing: Pacing = field(default_factory=Pacing)
    search_enabled: bool = True
    search_model: Optional[str] = None
    search_data: Optional[str] = None
    search_input_shape: Optional[str] = None
    search_trials: int = 20

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "policy") -> "Policy":
        """Builds a policy from parsed TOML; unknown sections or keys are refused by name."""
        known = {"objective": {"latency_p95_ms", "window_s"},
                 "floor": {"accuracy", "fidelity"},
                 "budget": {"energy_mj", "memory_mb"},
                 "pacing": set(Pacing.__dataclass_fields__),
                 "search": {"enabled", "model", "data", "input_shape", "trials"}}
        for section, body in raw.items():
            if section not in known:
                raise UsageError(f"{source}: unknown section [{section}]; use one of "
                                 f"{', '.join('[' + k + ']' for k in known)}")
            if not isinstance(body, Mapping):
                raise UsageError(f"{source}: [{section}] must be a table")
            for key in body:
                if key not in known[section]:
                    raise UsageError(f"{source}: unknown key {section}.{key}; use one of "
                                     f"{', '.join(sorted(known[section]))}")
        objective = raw.get("objective", {})
        if "latency_p95_ms" not in objective:
            raise UsageError(f"{source}: missing objective.latency_p95_ms; add e.g. "
                             "[objective] latency_p95_ms = 20")
        floor = raw.get("floor", {})
        budget = raw.get("budget", {})
        pacing_raw = dict(raw.get("pacing", {}))
        search = raw.get("search", {})
        try:
            pacing = Pacing(**{k: _number(v, f"pacing.{k}", source,
                                          integer=isinstance(getattr(Pacing(), k), int))
                               for k, v in pacing_raw.items()})
            enabled = search.get("enabled", True)
            if not isinstance(enabled, bool):
                raise UsageError(f"{source}: search.enabled must be true or false")
            for key in ("model", "data", "input_shape"):
                if key in search and (not isinstance(search[key], str) or not search[key].strip()):
                    raise UsageError(f"{source}: search.{key} must be a non-empty string")
            return cls(
                latency_p95_ms=_number(objective["latency_p95_ms"], "objective.latency_p95_ms", source),
                window_s=_number(objective.get("window_s", 10.0), "objective.window_s", source),
                accuracy_floor=_optional(floor.get("accuracy"), "floor.accuracy", source),
                fidelity_floor=_optional(floor.get("fidelity"), "floor.fidelity", source),
                energy_mj_budget=_optional(budget.get("energy_mj"), "budget.energy_mj", source),
                memory_mb_budget=_optional(budget.get("memory_mb"), "budget.memory_mb", source),
                pacing=pacing,
                search_enabled=enabled,
                search_model=search.get("model"),
                search_data=search.get("data"),
                search_input_shape=search.get("input_shape"),
                search_trials=_number(search.get("trials", 20), "search.trials", source, integer=True),
            )
        except UsageError as exc:
            msg = str(exc)
            raise UsageError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    def to_toml(self) -> str:
        """The policy as TOML that :meth:`from_mapping` reads back unchanged."""
        lines = ["[objective]", f"latency_p95_ms = {self.latency_p95_ms!r}", f"window_s = {self.window_s!r}"]
        floor = [(k, v) for k, v in (("accuracy", self.accuracy_floor), ("fidelity", self.fidelity_floor))
                 if v is not None]
        if floor:
            lines += ["", "[floor]"] + [f"{k} = {v!r}" for k, v in floor]
        budget = [(k, v) for k, v in (("energy_mj", self.energy_mj_budget), ("memory_mb", self.memory_mb_budget))
                  if v is not None]
        if budget:
            lines += ["", "[budget]"] + [f"{k} = {v!r}" for k, v in budget]
        lines += ["", "[pacing]"] + [f"{k} = {v!r}" for k, v in asdict(self.pacing).items()]
        lines += ["", "[search]", f"enabled = {'true' if self.search_enabled else 'false'}"]
        for key, value in (("model", self.search_model), ("data", self.search_data),
                           ("input_shape", self.search_input_shape)):
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append(f"trials = {self.search_trials}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_sections(self) -> dict[str, Any]:
        """The policy as the TOML's sections (what :meth:`from_mapping` and the HTTP API take)."""
        return tomllib.loads(self.to_toml())

    def patched(self, changes: Mapping[str, Any], source: str = "policy") -> "Policy":
        """This policy with some keys of some sections replaced (a dashboard field changes one number
        and must not reset the budgets, floors and pacing the operator set from a TOML file)."""
        sections = self.to_sections()
        for section, body in changes.items():
            if not isinstance(body, Mapping):
                raise UsageError(f"{source}: [{section}] must be a table")
            sections.setdefault(section, {}).update(body)
        return Policy.from_mapping(sections, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        data = dict(data)
        data["pacing"] = Pacing(**data.get("pacing", {}))
        return cls(**data)


def _number(value: Any, name: str, source: str, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{source}: {name} must be a number, got {value!r}")
    if integer:
        if int(value) != value:
            raise UsageError(f"{source}: {name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _optional(value: Any, name: str, source: str) -> Optional[float]:
    return None if value is None else _number(value, name, source)


def _validate(p: Policy) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(p.latency_p95_ms > 0, f"objective.latency_p95_ms must be > 0, got {p.latency_p95_ms}")
    need(p.window_s > 0, f"objective.window_s must be > 0, got {p.window_s}")
    for name, value in (("floor.accuracy", p.accuracy_floor), ("floor.fidelity", p.fidelity_floor)):
        need(value is None or 0.0 <= value <= 1.0, f"{name} must be between 0 and 1, got {value}")
    for name, value in (("budget.energy_mj", p.energy_mj_budget), ("budget.memory_mb", p.memory_mb_budget)):
        need(value is None or value > 0, f"{name} must be > 0, got {value}")
    k = p.pacing
    need(k.violate_windows >= 1, f"pacing.violate_windows must be >= 1, got {k.violate_windows}")
    need(k.judge_windows >= 1, f"pacing.judge_windows must be >= 1, got {k.judge_windows}")
    need(k.headroom_windows >= 1, f"pacing.headroom_windows must be >= 1, got {k.headroom_windows}")
    need(k.cooldown_s >= 0, f"pacing.cooldown_s must be >= 0, got {k.cooldown_s}")
    need(k.min_samples >= 1, f"pacing.min_samples must be >= 1, got {k.min_samples}")
    need(0 <= k.min_improvement < 1, f"pacing.min_improvement must be in [0, 1), got {k.min_improvement}")
    need(0 < k.headroom_fraction < 1,
         f"pacing.headroom_fraction must be in (0, 1), got {k.headroom_fraction}; "
         "it is the share of the objective under which p95 counts as headroom")
    need(0 < k.step_up_margin <= 1, f"pacing.step_up_margin must be in (0, 1], got {k.step_up_margin}")
    need(p.search_trials >= 1, f"search.trials must be >= 1, got {p.search_trials}")
    need(k.headroom_fraction <= k.step_up_margin,
         f"pacing.headroom_fraction ({k.headroom_fraction}) must not exceed pacing.step_up_margin "
         f"({k.step_up_margin}); otherwise a step up lands right back in violation")


def load_policy_file(path: Path) -> Policy:
    """Reads and validates a policy TOML file; every problem is one UsageError line."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"policy file {path} not found; pass an existing TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    return Policy.from_mapping(raw, source=str(path))


# ---------------------------------------------------------------------------------------------
# Storage: one table of the fleet store, keyed by scope ("device:ID", "group:G" or "*").


def scope_for(device_id: Optional[str] = None, group: Optional[str] = None) -> str:
    """The storage key of a policy: a device, a group, or the fleet default."""
    if device_id and group:
        raise UsageError("give --device or --group, not both")
    if device_id:
        return f"device:{device_id}"
    if group:
        return f"group:{group}"
    return DEFAULT_SCOPE


class PolicyStore:
    """The policies of a :class:`~builder.fleet.transport.store.FleetStore`, typed (the store keeps
    them as JSON by scope; serve and the CLI share the file).

    ``resolve`` (the loop asks it for every report) answers from memory: the policies are read
    again only when the store's policy version changed, and that version is looked at no more than
    every ``refresh_s`` (a policy set by another process, e.g. `builder fleet policy set`, applies
    within that time; one set through this object applies at once)."""

    def __init__(self, store: "FleetStore", refresh_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.clock = clock
        self._cache: Optional[dict[str, Policy]] = None
        self._cache_version = -1
        self._checked_at = float("-inf")
        self.reloads = 0

    def set(self, scope: str, policy: Policy, now: float) -> None:
        self.store.set_loop_policy(scope, json.dumps(policy.to_dict(), sort_keys=True), now)
        self._cache = None

    def remove(self, scope: str) -> bool:
        self._cache = None
        return self.store.remove_loop_policy(scope)

    def all(self) -> dict[str, Policy]:
        """Every policy by scope, read from the store now."""
        return {scope: Policy.from_dict(json.loads(text)) for scope, text in self.store.loop_policies().items()}

    def cached(self) -> dict[str, Policy]:
        """Every policy by scope, from memory (see the class doc for when it is read again)."""
        now = self.clock()
        if self._cache is not None and now - self._checked_at < self.refresh_s:
            return self._cache
        self._checked_at = now
        version = self.store.loop_policies_version()
        if self._cache is None or version != self._cache_version:
            self._cache, self._cache_version = self.all(), version
            self.reloads += 1
        return self._cache

    def resolve(self, device_id: str, groups: tuple[str, ...] = ()) -> tuple[Optional[str], Optional[Policy]]:
        """The policy that applies to a device (own > first matching group > default) and its scope."""
        policies = self.cached()
        for scope in [f"device:{device_id}"] + [f"group:{g}" for g in groups] + [DEFAULT_SCOPE]:
            if scope in policies:
                return scope, policies[scope]
        return None, None
