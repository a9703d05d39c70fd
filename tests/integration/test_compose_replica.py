"""The compose replica's start script, run for real: no Docker here, so the script from
docker-compose.yml runs against a local primary started with the compose primary's settings,
as the compose replica does (as the ``postgres`` user, with ``PGDATA``), then the replica it
made is started and must stream through the physical slot ``replica``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from backfill_dev.localpg import PG_OS_USER, PORT_FILE, LocalPostgres, find_pg_bindir
from tests.integration.helpers import ROOT, scalar, wait_for


def _compose_services() -> dict[str, dict[str, object]]:
    services: dict[str, dict[str, object]] = yaml.safe_load(
        (ROOT / "docker-compose.yml").read_text())["services"]
    return services


def _primary_settings() -> dict[str, str]:
    """The compose primary's ``-c name=value`` flags, as postgresql.conf settings."""
    command = _compose_services()["primary"]["command"]
    assert isinstance(command, list)
    flags = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    return {name: f"'{value}'" for name, value in (f.split("=", 1) for f in flags)}


def _local_script(primary_port: int) -> str:
    """The replica's script with the compose-only parts made local: compose's ``$$`` escape,
    the ``primary`` host name, and the final ``exec postgres`` (the test starts the server)."""
    command = _compose_services()["replica"]["command"]
    assert isinstance(command, list)
    script = str(command[0])
    for compose, local in (("$$", "$"), ("-h primary", f"-h 127.0.0.1 -p {primary_port}"),
                           ("exec postgres", "exit 0")):
        assert compose in script, compose
        script = script.replace(compose, local)
    return script


@pytest.fixture
def base() -> Iterator[Path]:
    if os.environ.get("BACKFILL_TEST_DSN"):
        pytest.skip("needs local server binaries to build a primary and a replica")
    try:
        find_pg_bindir()
    except RuntimeError as exc:
        if os.environ.get("BACKFILL_REQUIRE_PG") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    path = Path(tempfile.mkdtemp(prefix="backfill-test-compose-repl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run_as_postgres(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", "-c", script]
    if os.geteuid() == 0:  # the compose replica runs as `user: postgres`, like PostgreSQL must
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        cmd = [runuser, "-u", PG_OS_USER, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_the_compose_replica_streams_through_a_physical_slot(base: Path) -> None:
    primary = LocalPostgres(base / "primary", settings=_primary_settings())
    replica: LocalPostgres | None = None
    try:
        primary.init()
        primary.start()
        parent = base / "replica"
        parent.mkdir()
        if os.geteuid() == 0:
            shutil.chown(parent, PG_OS_USER, PG_OS_USER)
        pgdata = parent / "pgdata"
        env = dict(os.environ, PGDATA=str(pgdata), PGPASSWORD="unused",
                   PATH=f"{find_pg_bindir()}{os.pathsep}{os.environ.get('PATH', '')}")
        script = _local_script(primary.port)
        for attempt in ("first start", "restart (slot and data exist)"):
            res = _run_as_postgres(script, env)
            assert res.returncode == 0, f"{attempt}: {res.stdout}{res.stderr}"
        auto_conf = (pgdata / "postgresql.auto.conf").read_text()
        assert auto_conf.count("primary_slot_name = 'replica'") == 1, auto_conf
        assert "primary_conninfo" in auto_conf

        (pgdata / PORT_FILE).unlink(missing_ok=True)  # the primary's, copied by the backup
        replica = LocalPostgres(pgdata)
        replica.start()
        admin = primary.dsn()
        wait_for(lambda: scalar(admin, "SELECT active FROM pg_replication_slots"
                                       " WHERE slot_name = 'replica' AND slot_type = 'physical'"),
                 timeout=30, interval=0.2, what="the replica to stream through its slot")
        assert scalar(admin, "SELECT count(*) FROM pg_stat_replication") == 1
        assert scalar(admin, "SHOW max_slot_wal_keep_size") == "2GB"
        assert scalar(replica.dsn(), "SELECT pg_is_in_recovery()") is True
    finally:
        for server in (replica, primary):
            if server is not None:
                with contextlib.suppress(RuntimeError):
                    server.stop()
