"""Running the dashboard beside `builder serve`: uvicorn in its own thread, its own fleet store
connection, and actions (push, rollback) through the rollout code over a broker link of its own."""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from builder.errors import FleetError, UsageError

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard-token"  # in the data dir, 0600: made when no token is given


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError as exc:
        raise UsageError(f"--http address {host!r} is not an IP address (or localhost)") from exc


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; a bare ``PORT`` means 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError as exc:
        raise UsageError(f"--http wants HOST:PORT, e.g. 127.0.0.1:8080, not {text!r}") from exc
    if not 0 <= number <= 65535:
        raise UsageError(f"--http port must be in 0..65535, not {number}")
    is_loopback(host)
    return host, number


@dataclass(frozen=True)
class DashboardToken:
    token: str
    source: str  # "--http-token", the file it was read from, or the file it was written to
    reads_open: bool  # loopback: reads without the token


def resolve_token(data_dir: Path, host: str, token: str | None, token_file: Path | None) -> DashboardToken:
    """The actions' bearer token. On loopback, without one, a random token is written to
    ``<data_dir>/dashboard-token`` (0600). Elsewhere a token is required and reads need it too."""
    loopback = is_loopback(host)
    if token and token_file:
        raise UsageError("give --http-token or --http-token-file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read --http-token-file {token_file}: {exc.strerror}") from exc
        if not token:
            raise UsageError(f"--http-token-file {token_file} is empty")
        return DashboardToken(token, str(token_file), loopback)
    if token:
        return DashboardToken(token, "--http-token", loopback)
    if not loopback:
        raise UsageError(f"--http {host} is not loopback: the dashboard's actions reach every device, so give "
                         "--http-token or --http-token-file (reads then need the token too)")
    path = Path(data_dir) / TOKEN_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return DashboardToken(path.read_text(encoding="utf-8").strip(), str(path), True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_urlsafe(24)
    fd = os.open(str(path) + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(fresh + "\n")
    os.replace(str(path) + ".tmp", path)
    return DashboardToken(fresh, str(path), True)


class RolloutActions:
    """Push and rollback from the dashboard: the same ``Pusher`` `builder push` and `builder fleet
    rollback` use, over a broker link opened per action (actions are rare; serve's link is its own)."""

    def __init__(self, data_dir: Path, endpoint: Any, store: Any, registry: Any) -> None:
        self.data_dir = Path(data_dir)
        self.endpoint = endpoint
        self.store = store
        self.registry = registry
        self._lock = threading.Lock()  # one action at a time: two pushes to one device would race

    def __call__(self, device_id: str, artifact_id: str | None) -> dict[str, Any]:
        from builder.fleet.rollout.push import Pusher
        from builder.fleet.transport.link import FleetLink

        with self._lock, FleetLink(self.endpoint).connect() as link:
            pusher = Pusher(link, self.store, self.registry, self.data_dir)
            if artifact_id is None:
                outcome = pusher.rollback(device_id, reason="dashboard rollback")
                ok = outcome.state == "rolled_back"
            else:
                outcome = pusher.push(device_id, artifact_id)
                ok = outcome.state == "active"
        return {**json.loads(json.dumps(dataclasses.asdict(outcome), default=str)), "ok": ok}


class DashboardServer:
    """uvicorn serving :func:`builder.fleet.dashboard.api.build_app` in a daemon thread."""

    def __init__(self, data_dir: Path, host: str, port: int, token: DashboardToken,
                 reports_dirs: tuple[Path, ...] = (), store_url: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.store_url = store_url  # None: the data dir's SQLite file
        self.reports_dirs = reports_dirs
        self.host, self.port = host, port
        self.token = token
        self.endpoint: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._config: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, endpoint: Any = None, timeout_s: float = 10.0,
              transfers: Callable[[], Mapping[tuple[str, str], tuple[int, int]]] | None = None) -> DashboardServer:
        """Listen and serve. ``endpoint``: the broker `builder serve` uses (actions go through it);
        None: a read-only dashboard (actions answer 503)."""
        self.endpoint = endpoint
        try:
            import uvicorn
        except ImportError as exc:
            raise UsageError("the dashboard needs its extra: pip install 'edgefleet[dashboard]'") from exc
        from builder.artifacts.registry import Registry
        from builder.fleet.dashboard.api import DashboardConfig, build_app
        from builder.fleet.transport.store import open_store

        self._store = open_store(self.data_dir, self.store_url)
        registry = Registry(self.data_dir)
        act = RolloutActions(self.data_dir, self.endpoint, self._store, registry) if self.endpoint is not None else None
        self._config = DashboardConfig(self.token.token, reads_open=self.token.reads_open,
                                       reports_dirs=self.reports_dirs, transfers=transfers)
        app = build_app(self._store, registry, self._config, act)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise FleetError(f"the dashboard cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="dashboard",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise FleetError(f"the dashboard did not start on {self.url}")
            time.sleep(0.02)
        log.info("dashboard on %s", self.url)
        return self

    def banner(self) -> str:
        """What `builder serve` prints: the URL, where the token is, and a warning off loopback."""
        where = f"token in {self.token.source}" if self.token.source != "--http-token" else "token from --http-token"
        text = f"dashboard: [bold]{self.url}[/] (reads open on loopback; actions need the bearer token, {where})"
        if not self.token.reads_open:
            text = (f"[bold yellow]warning:[/] the dashboard listens on {self.host}, not loopback: anyone who can reach "
                    f"it and holds the token can push to and roll back every device (plain HTTP: put TLS in front).\n"
                    f"dashboard: [bold]{self.url}[/] (reads and actions need the bearer token, {where})")
        return text

    def stop(self) -> None:
        if self._config is not None:
            self._config.stopping.set()  # event streams end first, so the shutdown cancels nothing
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        if self._store is not None:
            self._store.close()
            self._store = None


def prepare_dashboard(data_dir: Path, address: str, *, token: str | None = None, token_file: Path | None = None,
                      reports_dirs: tuple[Path, ...] = (), store_url: str | None = None) -> DashboardServer:
    """`builder serve --http HOST:PORT`: the address and token checked (a ``UsageError`` before the
    fleet server starts); ``start(endpoint)`` once it is up."""
    host, port = parse_http_address(address)
    for folder in reports_dirs:
        if not Path(folder).is_dir():
            raise UsageError(f"--http-reports {folder} is not a folder")
    return DashboardServer(data_dir, host, port, resolve_token(data_dir, host, token, token_file),
                           tuple(Path(f) for f in reports_dirs), store_url=store_url)
