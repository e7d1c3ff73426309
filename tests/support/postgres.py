"""A REAL throwaway PostgreSQL server for tests and benchmarks.

    with PostgresServer() as server:
        url = server.new_database()      # "postgresql://edgefleet@127.0.0.1:PORT/t_1a2b…", empty
        server.url("postgres")           # any database by name

``initdb`` into a temp directory, then ``postgres`` on a free loopback port with its socket in that
directory, trust authentication for the ``edgefleet`` superuser, fsync off (a test server: its data
is thrown away). PostgreSQL refuses to run as root, so as root the server runs as the ``postgres``
user (the Debian package makes it; ``nobody`` otherwise) via ``runuser``, in a 0700 directory that
user owns (pytest's tmp_path belongs to root and would be unreadable). The binaries come from the
Debian package (``/usr/lib/postgresql/<major>/bin``, which `.ci/run` installs) or $PATH.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.broker import free_port

USER = "edgefleet"


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (with initdb), if any."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _run_as() -> list[str]:
    """The prefix that runs a command as an unprivileged user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class PostgresServer:
    """One postgres process on 127.0.0.1:port; ``close()`` stops it and removes its directory."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or postgres_bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin_dir = found
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-postgres-"))
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._prefix = _run_as()
        if self._prefix:
            user = pwd.getpwnam(self._prefix[2])
            os.chown(self.workdir, user.pw_uid, user.pw_gid)

    def start(self, timeout_s: float = 30.0) -> "PostgresServer":
        """initdb (the first time), then the server; again after ``stop()``: same data, same port."""
        data = self.workdir / "data"
        if not data.exists():
            subprocess.run([*self._prefix, str(self.bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust",
                            "-E", "UTF8", "--no-sync", "--no-instructions"],
                           check=True, capture_output=True, timeout=120)
        self.port = self.port or free_port()
        log = open(self.workdir / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        self._proc = subprocess.Popen(
            [*self._prefix, str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_tail()}")
            ready = subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER],
                                   capture_output=True)
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready within {timeout_s} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.workdir / "postgres.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database's URL (one per test keeps tests independent)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected) sent to the postmaster itself, whose
        pid postgres writes into its data directory: runuser does not pass SIGINT on."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pid = self._postmaster_pid()
        if pid is not None:
            for signum, wait_s in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0)):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
                if _wait_gone(pid, wait_s):
                    break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.workdir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
