"""Start, restart and stop a real throwaway server (separate from the session's server)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from backfill_dev.localpg import LocalPostgres, find_pg_bindir

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    try:
        find_pg_bindir()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="backfill-test-localpg-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
    finally:
        LocalPostgres(tmp / "data").stop("immediate")
        shutil.rmtree(tmp, ignore_errors=True)


def _select_one(dsn: str) -> object:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        return row[0]


def test_start_connect_restart_stop(workdir: Path) -> None:
    with LocalPostgres(workdir / "data") as pg:
        port = pg.port
        assert pg.is_running()
        assert _select_one(pg.dsn()) == 1
        with psycopg.connect(pg.dsn(), connect_timeout=10) as conn:
            settings = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (["fsync", "wal_level", "max_connections", "listen_addresses"],),
                ).fetchall()
            )
        assert settings == {
            "fsync": "off",
            "wal_level": "replica",
            "max_connections": "200",
            "listen_addresses": "127.0.0.1",
        }

        pg.restart()
        assert pg.is_running()
        assert pg.port == port
        assert _select_one(pg.dsn("template1")) == 1
        # Another handle on the same directory finds the remembered port.
        assert LocalPostgres(workdir / "data").port == port
    assert not pg.is_running()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backfill_dev.localpg", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_cli_start_status_stop(workdir: Path) -> None:
    datadir = str(workdir / "data")
    started = _cli("start", "--dir", datadir)
    assert started.returncode == 0, started.stderr
    lines = started.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("host=127.0.0.1 port=")
    assert _select_one(lines[0]) == 1

    again = _cli("start", "--dir", datadir)
    assert again.returncode == 0, again.stderr
    assert again.stdout == started.stdout

    status = _cli("status", "--dir", datadir)
    assert status.returncode == 0, status.stderr
    assert "running" in status.stdout

    stopped = _cli("stop", "--dir", datadir)
    assert stopped.returncode == 0, stopped.stderr
    assert _cli("status", "--dir", datadir).returncode == 3
