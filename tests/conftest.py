"""Shared fixtures: one throwaway PostgreSQL server per test session, one database per test.

- ``BACKFILL_TEST_DSN``: use that server (a DSN with CREATEDB rights) instead of starting one.
- ``BACKFILL_REQUIRE_PG=1``: fail instead of skip when no PostgreSQL binaries are found
  (``scripts/test.sh`` sets it, after installing them if needed), and likewise for Redis,
  MariaDB, Prometheus and promtool, except those named in ``BACKFILL_SKIP_MISSING`` (what
  ``scripts/test.sh`` could not install on this machine; never in CI): see :func:`missing_tool`.

Each test database is a copy of ``bf_template``, which carries the state schema created once per
session by ``backfill.state.schema.upgrade``; copying a template is much faster than re-running the
migrations for every test.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from backfill_dev.localpg import LocalPostgres, find_pg_bindir

TEMPLATE_DB = "bf_template"
_CONNECT_TIMEOUT = 10


def missing_tool(tool: str, message: str) -> NoReturn:
    """A server or tool the test needs is not installed: fail under ``scripts/test.sh``
    (``BACKFILL_REQUIRE_PG=1``), which installs it, unless it could not and said so by naming
    ``tool`` in ``BACKFILL_SKIP_MISSING``; skip otherwise."""
    caller = sys._getframe(1).f_code.co_filename   # where the skip is reported from: the test's
    message = f"{message} ({Path(caller).name})"   # helper, not this function
    if (os.environ.get("BACKFILL_REQUIRE_PG") == "1"
            and tool not in os.environ.get("BACKFILL_SKIP_MISSING", "").split()):
        pytest.fail(f"{message} (scripts/test.sh installs it)")
    pytest.skip(message)


def _admin_connect(admin_dsn: str) -> psycopg.Connection[TupleRow]:
    return psycopg.connect(admin_dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT)


def _db_dsn(admin_dsn: str, dbname: str) -> str:
    return make_conninfo(admin_dsn, dbname=dbname)


def _create_db(admin_dsn: str, template: str) -> str:
    name = f"test_{uuid.uuid4().hex[:8]}"
    with _admin_connect(admin_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return name


def _drop_db(admin_dsn: str, name: str) -> None:
    with _admin_connect(admin_dsn) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[LocalPostgres | None]:
    """The session's LocalPostgres, or None when BACKFILL_TEST_DSN names an external server."""
    if os.environ.get("BACKFILL_TEST_DSN"):
        yield None
        return
    try:
        find_pg_bindir()
    except RuntimeError as exc:
        if os.environ.get("BACKFILL_REQUIRE_PG") == "1":
            pytest.fail(str(exc))
        pytest.skip(f"no PostgreSQL server binaries and no BACKFILL_TEST_DSN: {exc}")
    tmp = Path(tempfile.mkdtemp(prefix="backfill-test-pg-", dir="/tmp"))
    tmp.chmod(0o755)
    server = LocalPostgres(tmp / "data")
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_dsn(pg_server: LocalPostgres | None) -> str:
    """DSN of the maintenance database (``postgres``) on the test server."""
    if pg_server is None:
        return os.environ["BACKFILL_TEST_DSN"]
    return pg_server.dsn("postgres")


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> str:
    """Create ``bf_template`` holding the current state schema; return its name."""
    from backfill.state.schema import upgrade

    name = sql.Identifier(TEMPLATE_DB)
    with _admin_connect(admin_dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE_DB,)).fetchone():
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(name))
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
    upgrade(_db_dsn(admin_dsn, TEMPLATE_DB))
    with _admin_connect(admin_dsn) as conn:
        # A template must have no sessions when it is copied; make sure none linger or appear.
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(name)
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (TEMPLATE_DB,),
        )
    return TEMPLATE_DB


@pytest.fixture
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with the state schema installed; dropped after the test."""
    name = _create_db(admin_dsn, template_db)
    try:
        yield _db_dsn(admin_dsn, name)
    finally:
        _drop_db(admin_dsn, name)


@pytest.fixture
def bare_dsn(admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh, empty database (no state schema); dropped after the test."""
    name = _create_db(admin_dsn, "template0")
    try:
        yield _db_dsn(admin_dsn, name)
    finally:
        _drop_db(admin_dsn, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection to the test database."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as connection:
        yield connection


@pytest.fixture(scope="session")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding ``pip install .`` as a user makes it (no extras, not editable),
    built once per session; returns its bin/. The plain-install tests and the chaos test run
    from it."""
    from tests.integration.servers import build_plain_venv

    return build_plain_venv(tmp_path_factory.mktemp("plain-install"))
