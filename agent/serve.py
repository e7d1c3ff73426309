"""Local inference endpoint for applications on the device, bound to 127.0.0.1 only.

    POST /infer   {"inputs": {"<name>": nested lists}}  -> {"outputs": {...}, "latency_ms": ..., "artifact_id": ...}
                  (a LiteRT model's inputs by tensor or signature name; 400 names what is wrong)
    GET  /health  -> 200 {"ok": true, ...} with a model, 503 without
    GET  /model   -> the active manifest's summary

Every /infer is a real request: its latency is the field latency reported in telemetry.
"""
from __future__ import annotations

import errno
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.active import ActiveModel, NoModelError
from agent.errors import AgentError, ConfigError, RequestError
from agent.feeds import prepare_feeds

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 << 20


def _handler_class(active: ActiveModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-agent"

        def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
            log.debug("http: " + fmt, *args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            model = active.model
            if self.path == "/health":
                if model is None:
                    self._send(503, {"ok": False, "reason": "no model active"})
                else:
                    self._send(200, {"ok": True, "artifact_id": model.manifest.artifact_id, "model": model.label,
                                     "backend": model.runtime.backend})
            elif self.path == "/model":
                if model is None:
                    self._send(404, {"error": "no model active"})
                    return
                m = model.manifest
                self._send(200, {"artifact_id": m.artifact_id, "model_name": m.model_name, "model_version": m.model_version,
                                 "runtime": m.target.runtime, "backend": model.runtime.backend, "slot": model.slot,
                                 "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in m.inputs],
                                 "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in m.outputs]})
            else:
                self._send(404, {"error": f"unknown path {self.path}; use /infer, /health or /model"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/infer":
                self._send(404, {"error": f"unknown path {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY_BYTES:
                self._send(400, {"error": "send a JSON body {\"inputs\": {...}} (at most 64 MiB)"})
                return
            model = active.model
            if model is None:
                self._send(503, {"error": "no model active"})
                return
            import numpy as np

            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict) or "inputs" not in body:
                    raise RequestError('send a JSON body {"inputs": {"<input name>": nested lists}}')
                feeds = prepare_feeds(body["inputs"], model.runtime.inputs, model.manifest.target.runtime_options)
            except ValueError as exc:  # json.JSONDecodeError
                self._send(400, {"error": f"bad request: the body is not JSON ({exc})"})
                return
            except RequestError as exc:
                self._send(400, {"error": f"bad request: {exc}"})
                return
            try:
                outputs, latency_ms = active.infer(feeds)
            except NoModelError:
                self._send(503, {"error": "no model active"})
                return
            except AgentError as exc:
                self._send(500, {"error": str(exc)})
                return
            self._send(200, {"outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()},
                             "latency_ms": round(latency_ms, 4), "artifact_id": model.manifest.artifact_id})

    return Handler


class LocalEndpoint:
    def __init__(self, active: ActiveModel, port: int = 8765, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AgentError("the local endpoint binds to loopback only")
        try:
            self._server = ThreadingHTTPServer((host, port), _handler_class(active))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"http_port {port} on {host} is in use (another agent on this host?); set a free "
                                  "http_port in agent.toml (0 = any free port), or `builder fleet add-device --http-port`") from exc
            raise ConfigError(f"cannot open the local endpoint on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
