"""What the dashboard shows, as JSON-ready dicts read from the fleet store and the artifact registry.

No HTTP here: ``api.py`` turns these into responses. The fleet table reuses `builder fleet status`'s
rows (:func:`builder.fleet.rollout.status.collect_status`), so the page and the CLI never disagree.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import UsageError
from builder.fleet.loop.policy import Policy, PolicyStore
from builder.fleet.loop.service import EVENT_PREFIX
from builder.fleet.rollout.status import DeviceStatusRow, collect_status, status_rows
from builder.fleet.transport.store import TELEMETRY_EVENT_PREFIX, DeploymentEvent, FleetStore, TelemetryRow

STATES = ("online", "offline", "unregistered")
SORT_KEYS = ("device_id", "state", "profile", "group", "model", "p50_ms", "p95_ms", "objective_p95_ms", "power_w",
             "temperature_c", "last_seen")
MAX_PER_PAGE = 500


@dataclass(frozen=True)
class DeviceQuery:
    """Filter, order and page of the fleet table (``GET /api/devices``)."""

    group: str | None = None
    state: str | None = None
    search: str | None = None  # substring of the device id
    sort: str = "device_id"
    descending: bool = False
    page: int = 1
    per_page: int = 50

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise UsageError(f"state must be one of {', '.join(STATES)}, not {self.state!r}")
        if self.sort not in SORT_KEYS:
            raise UsageError(f"sort must be one of {', '.join(SORT_KEYS)}, not {self.sort!r}")
        if self.page < 1 or not 1 <= self.per_page <= MAX_PER_PAGE:
            raise UsageError(f"page must be >= 1 and per_page in 1..{MAX_PER_PAGE}")


def device_state(row: DeviceStatusRow) -> str:
    if not row.registered:
        return "unregistered"
    return "online" if row.online else "offline"


class _Objectives(PolicyStore):
    """The loop's policies read once per request (``resolve`` asks ``all`` for every device)."""

    def __init__(self, store: FleetStore) -> None:
        super().__init__(store)
        self._policies = super().all()

    def all(self) -> dict[str, Policy]:
        return self._policies

    def objective(self, row: DeviceStatusRow) -> dict[str, Any]:
        scope, policy = self.resolve(row.device_id, (row.group,) if row.group else ())
        target = policy.latency_p95_ms if policy is not None else None
        return {"objective_p95_ms": target, "policy_scope": scope,
                "over_objective": (target is not None and row.field_p95_ms is not None and row.field_p95_ms > target)}


def device_json(row: DeviceStatusRow, now: float, objectives: _Objectives | None = None) -> dict[str, Any]:
    """One fleet-table row. Power carries its source; ``power_estimated`` marks a profile estimate;
    ``objective_p95_ms``: the field p95 the loop's policy for the device asks for (None: no policy)."""
    objective = objectives.objective(row) if objectives is not None else {}
    return {**objective,
        "device_id": row.device_id, "state": device_state(row), "profile": row.profile, "group": row.group,
        "model": row.model, "artifact_id": row.artifact_id, "p50_ms": row.field_p50_ms, "p95_ms": row.field_p95_ms,
        "requests": row.requests, "power_w": row.power_w, "power_source": row.power_source,
        "power_estimated": row.power_w is not None and row.power_source.lower().startswith("estimate"),
        "temperature_c": row.temperature_c, "last_seen": row.last_seen,
        "last_seen_age_s": (max(0.0, now - row.last_seen) if row.last_seen is not None else None),
        "telemetry_missing": row.telemetry_missing,
    }


def fleet_page(store: FleetStore, query: DeviceQuery, now: float | None = None) -> dict[str, Any]:
    """The fleet table: filtered, sorted, one page of it, with the totals and the groups for the filters."""
    now = time.time() if now is None else now
    objectives = _Objectives(store)
    everyone = [device_json(r, now, objectives) for r in collect_status(store, now)]
    counts = {state: sum(1 for d in everyone if d["state"] == state) for state in STATES}
    groups = sorted({d["group"] for d in everyone if d["group"]})
    chosen = [d for d in everyone
              if (query.group is None or d["group"] == query.group)
              and (query.state is None or d["state"] == query.state)
              and (not query.search or query.search.lower() in d["device_id"].lower())]
    present = [d for d in chosen if d.get(query.sort) is not None]
    missing = [d for d in chosen if d.get(query.sort) is None]  # last, in both orders
    present.sort(key=lambda d: d[query.sort], reverse=query.descending)
    ordered = present + missing
    start = (query.page - 1) * query.per_page
    return {"total": len(ordered), "page": query.page, "per_page": query.per_page,
            "pages": max(1, -(-len(ordered) // query.per_page)), "sort": query.sort, "descending": query.descending,
            "counts": counts, "groups": groups, "devices": ordered[start:start + query.per_page]}


def telemetry_json(row: TelemetryRow) -> dict[str, Any]:
    return {"seq": row.seq, "ts": row.ts, "event": row.event, "artifact_id": row.model_id, "requests": row.requests,
            "errors": row.errors, "p50_ms": row.p50_ms, "p95_ms": row.p95_ms, "power_w": row.power_w,
            "power_source": row.power_source, "temperature_c": row.temperature_c, "cpu_percent": row.cpu_percent}


def telemetry_series(store: FleetStore, device_id: str, since: float | None = None, limit: int = 500) -> list[dict[str, Any]]:
    store.device(device_id)
    return [telemetry_json(r) for r in store.telemetry(device_id, since=since, limit=limit)]


def telemetry_after(store: FleetStore, device_id: str, after_ts: float, after_seq: int) -> list[dict[str, Any]]:
    """Reports newer than (ts, seq), oldest first: what the live stream sends next."""
    rows = store.telemetry(device_id, since=after_ts, limit=200)
    return [telemetry_json(r) for r in rows if (r.ts, r.seq) > (after_ts, after_seq)]


def event_json(event: DeploymentEvent) -> dict[str, Any]:
    return {"ts": event.ts, "kind": event.kind, "deployment_id": event.deployment_id,
            "artifact_id": event.artifact_id, "detail": dict(event.detail)}


def device_detail(store: FleetStore, registry: Any, device_id: str, now: float | None = None) -> dict[str, Any]:
    """One device: its table row, its slots, its deployments (with the on-device benchmark of each
    artifact against the one before) and the loop's events with their reasons."""
    now = time.time() if now is None else now
    record = store.device(device_id)
    (row,) = status_rows([record], {device_id: store.latest_field_telemetry_for(device_id, record.active_artifact_id)},
                         {device_id: store.latest_telemetry(device_id)},
                         {device_id: store.requests_served(device_id, record.active_artifact_id)}, now,
                         store.telemetry_missing(device_id))
    events = store.events(device_id)
    deployments = [event_json(e) for e in events if not e.kind.startswith((EVENT_PREFIX, TELEMETRY_EVENT_PREFIX))]
    loop = [event_json(e) for e in events if e.kind.startswith(EVENT_PREFIX)]
    telemetry_events = [event_json(e) for e in events if e.kind.startswith(TELEMETRY_EVENT_PREFIX)][-50:]
    benchmarks = {}
    for artifact_id in {record.active_artifact_id, record.previous_artifact_id} - {None}:
        bench = store.latest_benchmark(device_id, artifact_id)
        if bench is not None:
            benchmarks[artifact_id] = {"ts": bench.ts, "p50_ms": bench.p50_ms, "p95_ms": bench.p95_ms,
                                       "mean_ms": bench.mean_ms, "power_w": bench.power_w,
                                       "power_source": bench.power_source, "energy_mj": bench.energy_mj}
    return {**device_json(row, now, _Objectives(store)), "agent_version": record.agent_version, "machine": record.machine,
            "runtimes": list(record.runtimes), "telemetry_events": telemetry_events,
            "slots": {"active": _slot(registry, record.active_artifact_id, record.active_model),
                      "previous": _slot(registry, record.previous_artifact_id, None)},
            "benchmarks": benchmarks, "deployments": deployments, "loop_events": loop}


def _slot(registry: Any, artifact_id: str | None, model: str | None) -> dict[str, Any] | None:
    if artifact_id is None:
        return None
    if model is None and registry is not None:
        try:
            rec = registry.get(artifact_id)
            model = f"{rec.model_name}@{rec.model_version}"
        except Exception:  # noqa: BLE001 - an artifact the registry no longer has still names the slot
            model = None
    return {"artifact_id": artifact_id, "model": model}


def signing_key_id(registry: Any, artifact_id: str) -> str | None:
    """The key id the manifest's signature names (``manifest.sig``), None when unreadable."""
    from agent.manifest import SIGNATURE_FILE

    try:
        return json.loads((registry.manifest_dir(artifact_id) / SIGNATURE_FILE).read_text(encoding="utf-8")).get("key_id")
    except (OSError, ValueError):
        return None


def artifacts_json(registry: Any, model: str | None = None) -> list[dict[str, Any]]:
    """Registered artifacts, newest first, with their verification figures, size and signing key id."""
    records: Sequence[Any] = registry.records(model_name=model)
    out = []
    for rec in sorted(records, key=lambda r: r.created_at, reverse=True):
        out.append({"artifact_id": rec.artifact_id, "model": f"{rec.model_name}@{rec.model_version}",
                    "model_name": rec.model_name, "model_version": rec.model_version, "profile": rec.profile,
                    "runtime": rec.runtime, "precision": rec.precision, "format": rec.format,
                    "size_bytes": rec.size_bytes, "created_at": rec.created_at,
                    "verification": dict(rec.metrics), "key_id": signing_key_id(registry, rec.artifact_id)})
    return out


def pushes_json(store: FleetStore, limit: int = 50) -> list[dict[str, Any]]:
    return [{"push_id": p.push_id, "created_at": p.created_at, "target": p.target, "state": p.state,
             "reason": p.reason, "finished_at": p.finished_at, "plan": dict(p.plan)} for p in store.pushes(limit)]


# Where a deployment stands, as the stages a device reports (agent.protocol.TRANSFER_STATES) after
# the host published it ("desired"); the page draws a bar per device from ``stage / len - 1``.
DEPLOYMENT_STAGES = ("desired", "downloading", "verifying", "installing", "active")
FINAL_KINDS = ("active", "failed", "rejected", "rolled_back", "cancelled")


def deployments_in_flight(store: FleetStore, include_finished_s: float = 300.0, now: float | None = None,
                          transfers: Mapping[tuple[str, str], tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Per device, its latest desired deployment that is not final yet (or ended in the last
    ``include_finished_s``): its stage, the fraction done, and its state. ``transfers``: serve's live
    byte counts, which move the bar through the download stage byte by byte."""
    now = time.time() if now is None else now
    out = []
    for device_id, desired in sorted(store.latest_desired().items()):
        events = [e for e in store.events(device_id, since=desired.ts) if e.deployment_id == desired.deployment_id]
        last = events[-1] if events else desired
        final = last.kind in FINAL_KINDS
        if final and now - last.ts > include_finished_s:
            continue
        stage = max((DEPLOYMENT_STAGES.index(e.kind) for e in events if e.kind in DEPLOYMENT_STAGES), default=0)
        done_bytes, total_bytes = (transfers or {}).get((device_id, desired.deployment_id or ""), (0, 0))
        progress = stage / (len(DEPLOYMENT_STAGES) - 1)
        if DEPLOYMENT_STAGES[stage] == "downloading" and total_bytes > 0:
            progress = (stage + min(1.0, done_bytes / total_bytes)) / (len(DEPLOYMENT_STAGES) - 1)
        out.append({"device_id": device_id, "deployment_id": desired.deployment_id, "artifact_id": desired.artifact_id,
                    "started": desired.ts, "updated": last.ts, "state": last.kind, "final": final,
                    "stage": DEPLOYMENT_STAGES[stage], "progress": progress,
                    "bytes_done": done_bytes if transfers else None, "bytes_total": total_bytes if transfers else None,
                    "error": last.detail.get("error")})
    return out


# -- builder optimize runs: the report.json files under the folders `serve --http-reports` names ------
REPORT_FILE = "report.json"
_CANDIDATE_FIELDS = ("trial", "recipe", "quality", "accuracy", "fidelity", "device_latency_ms", "latency_source",
                     "download_bytes", "energy_mj", "precision", "feasible")


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "front" in report and "candidates" in report else None


def optimize_runs(reports_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Every `builder optimize` report under the folders, newest first; ``id`` names it for
    :func:`optimize_run` (its index among the folders and its path inside that folder)."""
    runs = []
    for index, root in enumerate(reports_dirs):
        for path in sorted(Path(root).rglob(REPORT_FILE)):
            report = _read_report(path)
            if report is None:
                continue
            chosen = report.get("chosen") or {}
            runs.append({"id": f"{index}/{path.parent.relative_to(root).as_posix()}", "path": str(path),
                         "modified": path.stat().st_mtime, "study": (report.get("study") or {}).get("name"),
                         "trials": (report.get("study") or {}).get("trials"), "quality": report.get("quality"),
                         "front_size": len(report["front"]), "chosen": chosen.get("recipe")})
    return sorted(runs, key=lambda r: r["modified"], reverse=True)


def optimize_run(reports_dirs: Sequence[Path], run_id: str) -> dict[str, Any]:
    """One run's candidates (the front marked) and its choice, for the Pareto chart."""
    index, _, rel = run_id.partition("/")
    if not index.isdigit() or int(index) >= len(reports_dirs):
        raise UsageError(f"no optimize run {run_id!r}")
    root = Path(reports_dirs[int(index)]).resolve()
    path = (root / rel / REPORT_FILE).resolve()
    if root not in path.parents:
        raise UsageError(f"no optimize run {run_id!r}")
    report = _read_report(path)
    if report is None:
        raise UsageError(f"no optimize run {run_id!r}")

    def point(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: c.get(k) for k in _CANDIDATE_FIELDS} | {"on_front": bool(c.get("on_front"))}

    return {"id": run_id, "path": str(path), "quality_is": report.get("quality"), "targets": report.get("targets"),
            "chosen": point(report["chosen"]) if report.get("chosen") else None,
            "candidates": [point(c) for c in report["candidates"]]}
