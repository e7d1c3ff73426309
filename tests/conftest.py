"""Fixtures every test folder may use: the fleet store on each engine it supports."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from tests.support.postgres import PostgresServer, postgres_bin_dir

if TYPE_CHECKING:  # builder is imported only by the tests that use these fixtures
    from builder.fleet.transport.store import FleetStore


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session (~1 s to start); tests take a fresh
    database each (``new_database``). Skipped where PostgreSQL is not installed (`.ci/run` installs it)."""
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """The ``url`` argument of ``open_store`` for each engine: None (the data dir's SQLite file)
    or a fresh PostgreSQL database. Parity tests take it and run once per engine."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def open_fleet_store(store_url: str | None) -> Callable[[Path], "FleetStore"]:
    """``open_store`` bound to this test's engine."""
    from builder.fleet.transport.store import open_store

    return lambda data_dir: open_store(data_dir, store_url)
