"""The dashboard's HTTP side: a Starlette app with the JSON API under ``/api`` and the page.

Reads are open when the server listens on loopback (``reads_open``); every action (push, rollback)
needs ``Authorization: Bearer <token>``. Live telemetry is a server-sent event stream that polls the
fleet store (the store is the one source: `builder serve` writes it, the page reads it).
Endpoints are listed in docs/api.md.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from builder.errors import BuilderError, FleetError, UsageError
from builder.fleet.dashboard import queries
from builder.fleet.transport.store import FleetStore

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STREAM_POLL_S = 0.5

# (device_id, artifact_id or None for a rollback) -> the outcome as a dict; raises BuilderError.
Action = Callable[[str, "str | None"], dict[str, Any]]


@dataclass(frozen=True)
class DashboardConfig:
    token: str
    reads_open: bool = True  # loopback: reads need no token (actions always do)
    stream_poll_s: float = STREAM_POLL_S
    stopping: threading.Event = field(default_factory=threading.Event)  # set: live streams end (server stops)
    reports_dirs: tuple[Path, ...] = ()  # folders of `builder optimize` outputs (report.json) to show
    # serve's live byte counts per (device, deployment) (FleetServer.transfer_bytes); None: stages only
    transfers: Callable[[], Mapping[tuple[str, str], tuple[int, int]]] | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def _param(request: Request, name: str, kind: type, default: Any) -> Any:
    """Query parameter ``name`` as ``kind`` (int or float); ``default`` when absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise UsageError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from exc


def _int(request: Request, name: str, default: int) -> int:
    return int(_param(request, name, int, default))


def _float(request: Request, name: str) -> float | None:
    value = _param(request, name, float, None)
    return None if value is None else float(value)


def build_app(store: FleetStore, registry: Any, config: DashboardConfig, act: Action | None = None) -> Starlette:
    """The ASGI app. ``act`` performs push/rollback (``builder serve`` gives one over its broker);
    without it actions answer 503."""

    def authorised(request: Request) -> bool:
        given = _bearer(request)
        return given is not None and hmac.compare_digest(given.encode(), config.token.encode())

    def may_read(request: Request) -> bool:
        if config.reads_open or authorised(request):
            return True
        given = request.query_params.get("access_token")  # EventSource cannot send headers
        return given is not None and hmac.compare_digest(given.encode(), config.token.encode())

    def known_device(device_id: str) -> None:
        if store.find_device(device_id) is None:
            raise HTTPException(404, f"unknown device {device_id!r}")

    def read(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not may_read(request):
                return _error(401, "this dashboard is not on loopback: reads need the token too")
            try:
                return JSONResponse(await run_in_threadpool(handler, request))
            except HTTPException as exc:
                return _error(exc.status_code, str(exc.detail))
            except UsageError as exc:
                return _error(400, str(exc))
            except BuilderError as exc:
                return _error(500, str(exc))
        return endpoint

    def health(request: Request) -> dict[str, Any]:
        return {"ok": True, "reads_open": config.reads_open, "actions": act is not None, "time": time.time()}

    def devices(request: Request) -> dict[str, Any]:
        q = request.query_params
        query = queries.DeviceQuery(group=q.get("group") or None, state=q.get("state") or None,
                                    search=q.get("search") or None, sort=q.get("sort") or "device_id",
                                    descending=q.get("order", "asc") == "desc",
                                    page=_int(request, "page", 1), per_page=_int(request, "per_page", 50))
        return queries.fleet_page(store, query)

    def device(request: Request) -> dict[str, Any]:
        device_id = request.path_params["device_id"]
        known_device(device_id)
        return queries.device_detail(store, registry, device_id)

    def telemetry(request: Request) -> dict[str, Any]:
        device_id = request.path_params["device_id"]
        known_device(device_id)
        limit = min(max(_int(request, "limit", 300), 1), 5000)
        return {"device_id": device_id,
                "telemetry": queries.telemetry_series(store, device_id, since=_float(request, "since"), limit=limit)}

    def deployments(request: Request) -> dict[str, Any]:
        device_id = request.path_params["device_id"]
        known_device(device_id)
        detail = queries.device_detail(store, registry, device_id)
        return {"device_id": device_id, "deployments": detail["deployments"], "benchmarks": detail["benchmarks"]}

    def loop_events(request: Request) -> dict[str, Any]:
        device_id = request.path_params["device_id"]
        known_device(device_id)
        return {"device_id": device_id, "loop_events": queries.device_detail(store, registry, device_id)["loop_events"]}

    def artifacts(request: Request) -> dict[str, Any]:
        return {"artifacts": queries.artifacts_json(registry, model=request.query_params.get("model") or None)}

    def pushes(request: Request) -> dict[str, Any]:
        return {"pushes": queries.pushes_json(store, limit=min(max(_int(request, "limit", 50), 1), 500)),
                "deployments": queries.deployments_in_flight(
                    store, transfers=config.transfers() if config.transfers else None)}

    def optimize_runs(request: Request) -> dict[str, Any]:
        return {"runs": queries.optimize_runs(config.reports_dirs)}

    def optimize_run(request: Request) -> dict[str, Any]:
        try:
            return queries.optimize_run(config.reports_dirs, request.path_params["run_id"])
        except UsageError as exc:
            raise HTTPException(404, str(exc)) from exc

    async def stream(request: Request) -> Response:
        """``text/event-stream``: one ``telemetry`` event per new report (``limit``: end after N, for scripts)."""
        from sse_starlette import EventSourceResponse

        if not may_read(request):
            return _error(401, "this dashboard is not on loopback: reads need the token too")
        device_id = request.path_params["device_id"]
        if await run_in_threadpool(store.find_device, device_id) is None:
            return _error(404, f"unknown device {device_id!r}")
        try:
            after_ts = _float(request, "after_ts")
            after_seq = _int(request, "after_seq", -1)
            limit = _int(request, "limit", 0)
        except UsageError as exc:
            return _error(400, str(exc))
        if after_ts is None:
            latest = await run_in_threadpool(store.latest_telemetry, device_id)
            after_ts, after_seq = (latest.ts, latest.seq) if latest else (float("-inf"), -1)

        async def events() -> AsyncIterator[dict[str, str]]:
            last, sent = (after_ts, after_seq), 0
            while not config.stopping.is_set():
                for row in await run_in_threadpool(queries.telemetry_after, store, device_id, *last):
                    last = (row["ts"], row["seq"])
                    yield {"event": "telemetry", "id": f"{row['ts']}:{row['seq']}", "data": json.dumps(row)}
                    sent += 1
                    if limit and sent >= limit:
                        return
                await asyncio.sleep(config.stream_poll_s)

        return EventSourceResponse(events(), ping=15)

    async def action(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "actions need the dashboard token: Authorization: Bearer <token>")
        if act is None:
            return _error(503, "this dashboard has no broker connection, so it cannot act on devices")
        device_id = request.path_params["device_id"]
        artifact_id = None
        if request.url.path.endswith("/push"):
            try:
                body = await request.json()
            except ValueError:
                return _error(400, 'push needs a JSON body {"artifact_id": "..."}')
            artifact_id = body.get("artifact_id") if isinstance(body, dict) else None
            if not isinstance(artifact_id, str) or not artifact_id:
                return _error(400, 'push needs a JSON body {"artifact_id": "..."}')
        if await run_in_threadpool(store.find_device, device_id) is None:
            return _error(404, f"unknown device {device_id!r}")
        try:
            outcome = await run_in_threadpool(act, device_id, artifact_id)
        except UsageError as exc:
            return _error(400, str(exc))
        except FleetError as exc:
            return _error(409, str(exc))
        except BuilderError as exc:
            return _error(500, str(exc))
        log.info("dashboard: %s of %s: %s", "push" if artifact_id else "rollback", device_id, outcome.get("state"))
        if not outcome.get("ok", True):
            return JSONResponse({**outcome, "error": f"{outcome.get('state')}: {outcome.get('error') or 'see the device'}"},
                                status_code=409)
        return JSONResponse(outcome)

    def policies(request: Request) -> dict[str, Any]:
        from builder.fleet.loop.policy import PolicyStore

        return {"policies": {scope: p.to_dict() for scope, p in PolicyStore(store).all().items()}}

    async def policy_change(request: Request) -> Response:
        """PUT: set the loop policy of a scope (``device:ID``, ``group:G``, ``*``) from the TOML's
        sections as JSON; PATCH: change some keys of the policy that applies there now (the scope's own,
        else for a device the group's or default one it resolves to), kept as the scope's own; DELETE:
        remove it. Needs the token."""
        from builder.fleet.loop.policy import DEFAULT_SCOPE, Policy, PolicyStore

        if not authorised(request):
            return _error(401, "policy changes need the dashboard token: Authorization: Bearer <token>")
        scope = request.path_params["scope"]
        kind, _, name = scope.partition(":")
        if scope != DEFAULT_SCOPE and (kind not in ("device", "group") or not name):
            return _error(400, f"scope must be device:ID, group:NAME or {DEFAULT_SCOPE}, not {scope!r}")
        policy_store = PolicyStore(store)
        if request.method == "DELETE":
            removed = await run_in_threadpool(policy_store.remove, scope)
            return JSONResponse({"scope": scope, "removed": removed}, status_code=200 if removed else 404)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'a policy is JSON: {"objective": {"latency_p95_ms": 20}, ...} (the TOML\'s sections)')
        try:
            if not isinstance(body, dict):
                raise UsageError("a policy is a JSON object of the TOML's sections")
            source = f"policy for {scope}"
            if request.method == "PATCH":
                base = await run_in_threadpool(_current_policy, policy_store, scope)
                policy = base.patched(body, source) if base is not None else Policy.from_mapping(body, source)
            else:
                policy = Policy.from_mapping(body, source=source)
            await run_in_threadpool(policy_store.set, scope, policy, time.time())
        except UsageError as exc:
            return _error(400, str(exc))
        log.info("dashboard: loop policy of %s set (p95 objective %s ms)", scope, policy.latency_p95_ms)
        return JSONResponse({"scope": scope, "policy": policy.to_dict()})

    def _current_policy(policy_store: Any, scope: str) -> Any:
        """The policy a scope has now: its own, else (a device) the one it resolves to, else None."""
        own = policy_store.all().get(scope)
        kind, _, name = scope.partition(":")
        if own is not None or kind != "device":
            return own
        device = store.find_device(name)
        groups = (device.group,) if device is not None and device.group else ()
        return policy_store.resolve(name, groups)[1]

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def api_unknown(request: Request) -> Response:
        return _error(404, f"no such endpoint {request.url.path}")

    routes = [
        Route("/", index),
        Route("/api/health", read(health)),
        Route("/api/devices", read(devices)),
        Route("/api/devices/{device_id}", read(device)),
        Route("/api/devices/{device_id}/telemetry", read(telemetry)),
        Route("/api/devices/{device_id}/telemetry/stream", stream),
        Route("/api/devices/{device_id}/deployments", read(deployments)),
        Route("/api/devices/{device_id}/loop-events", read(loop_events)),
        Route("/api/devices/{device_id}/rollback", action, methods=["POST"]),
        Route("/api/devices/{device_id}/push", action, methods=["POST"]),
        Route("/api/artifacts", read(artifacts)),
        Route("/api/pushes", read(pushes)),
        Route("/api/policies", read(policies)),
        Route("/api/policies/{scope:path}", policy_change, methods=["PUT", "PATCH", "DELETE"]),
        Route("/api/optimize-runs", read(optimize_runs)),
        Route("/api/optimize-runs/{run_id:path}", read(optimize_run)),
        Route("/api/{rest:path}", api_unknown),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes)
