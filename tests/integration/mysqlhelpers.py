"""Helpers of the MySQL-source tests: setup SQL on the test MariaDB, and the CLI with the
MySQL commands loaded. (Kept apart from ``mysqlserver``, which test modules load as a pytest
plugin and so must not import.)"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, Any

from tests.integration.helpers import ROOT, cli_env

if TYPE_CHECKING:
    from tests.integration.mysqlserver import MariaDB


def mysql_exec(server: MariaDB, database: str, *statements: str, params: Any = None) -> None:
    """Run test setup statements (fixed SQL of the test's own) on ``database``."""
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            for stmt in statements:
                cur.execute(stmt, params)
    finally:
        conn.close()


def mysql_rows(server: MariaDB, database: str, query: str) -> list[tuple[Any, ...]]:
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return list(cur.fetchall())
    finally:
        conn.close()


def mysql_cli(dest_dsn: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``backfill`` with the MySQL commands loaded, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dest_dsn, *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
        env=cli_env(BACKFILL_CLI_PLUGINS="backfill.cli.mysql"))


def mysql_cli_popen(dest_dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dest_dsn, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=cli_env(BACKFILL_CLI_PLUGINS="backfill.cli.mysql"))
