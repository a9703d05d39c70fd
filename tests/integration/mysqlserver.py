"""A throwaway MariaDB server for the MySQL-source tests, started like PostgreSQL and Redis.

Its own datadir (``mariadb-install-db``) under a temporary directory, a free loopback port, a
unix socket in that directory, and the binlog on in ROW format with full row images and full
row metadata (column names in the binlog): what ``backfill.mysql`` needs from a source.

The tests connect as ``backfill`` over TCP with a password kept in an option file (as users
must: a password in the DSN is refused), ``MariaDB.option_file``.

``BACKFILL_REQUIRE_PG=1`` (set by ``scripts/test.sh``) turns a missing ``mariadbd`` into a
failure instead of a skip, as for PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_tool
from tests.integration.helpers import wait_for
from tests.integration.servers import free_port

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if found:
            return found
    return None


class MariaDB:
    """``mariadbd`` on 127.0.0.1:<free port>, as root (``--user=root``) or the current user."""

    def __init__(self, base: Path | None = None) -> None:
        server = _binary("mariadbd", "mysqld")
        install = _binary("mariadb-install-db", "mysql_install_db")
        if server is None or install is None:
            missing_tool("mariadb", "MariaDB is not installed (apt-get install -y mariadb-server)")
        self.server_bin = server
        self.install_bin = install
        self.base = base or Path(tempfile.mkdtemp(prefix="backfill-test-mariadb-", dir="/tmp"))
        self.datadir = self.base / "data"
        self.socket = self.base / "mysqld.sock"
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.option_file = self.base / "client.cnf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.base / "server.log"

    #: Memory and connections; the benchmark's source holds its whole table in memory.
    sizing: tuple[str, ...] = ("--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M")

    def _user_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def init(self) -> None:
        res = subprocess.run(
            [self.install_bin, "--no-defaults", f"--datadir={self.datadir}",
             "--auth-root-authentication-method=socket", "--skip-test-db",
             "--skip-name-resolve", *self._user_args()],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [self.server_bin, "--no-defaults", f"--datadir={self.datadir}",
             f"--socket={self.socket}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--pid-file={self.base / 'mysqld.pid'}", "--skip-name-resolve",
             "--log-bin=binlog", "--binlog-format=ROW", "--binlog-row-image=FULL",
             "--binlog-row-metadata=FULL", "--server-id=1", "--skip-log-error",
             "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0",
             "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
             *self.sizing, *self._user_args()],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._ready, timeout=START_TIMEOUT_S, interval=0.1, what="MariaDB to accept")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mariadbd exited {self.proc.returncode}:\n"
                                 + self.log.read_text(errors="replace")[-3000:])
        res = subprocess.run(self._client_cmd("SELECT 1"), capture_output=True, timeout=10,
                             check=False)
        return res.returncode == 0

    def _client_cmd(self, query: str) -> list[str]:
        client = _binary("mariadb", "mysql") or "mariadb"
        return [client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B",
                "--connect-timeout=5", "-e", query]

    def root_sql(self, query: str) -> str:
        """Run ``query`` as root over the socket (setup only: no user text goes here)."""
        res = subprocess.run(self._client_cmd(query), capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def create_user(self) -> None:
        """``backfill``@127.0.0.1 with the rights a copy and a binlog reader need."""
        self.root_sql(
            f"CREATE USER IF NOT EXISTS 'backfill'@'127.0.0.1' IDENTIFIED BY '{self.password}';"
            "GRANT ALL ON *.* TO 'backfill'@'127.0.0.1';"
            "GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR"
            " ON *.* TO 'backfill'@'127.0.0.1'"
        )
        self.option_file.write_text(f"[client]\nuser=backfill\npassword={self.password}\n")
        self.option_file.chmod(0o600)

    def dsn(self, database: str) -> str:
        """A source DSN without a password, naming the option file that holds it."""
        return (f"mysql://backfill@127.0.0.1:{self.port}/{database}"
                f"?read_default_file={self.option_file}")

    def connect(self, database: str | None = None, **kw: Any) -> Any:
        """A PyMySQL connection as ``backfill`` (test setup and checks), autocommit."""
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.port, user="backfill",
                               password=self.password, database=database, autocommit=True,
                               charset="utf8mb4", connect_timeout=10, read_timeout=60,
                               write_timeout=60, init_command="SET time_zone = '+00:00'", **kw)

    def create_database(self, name: str) -> None:
        self.root_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def drop_database(self, name: str) -> None:
        self.root_sql(f"DROP DATABASE IF EXISTS `{name}`")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.proc = None

    def restart(self) -> None:
        """SIGKILL and start again on the same port and datadir (crash recovery)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_mariadb() -> MariaDB:
    """A running MariaDB with the ``backfill`` user; call ``cleanup()`` when done."""
    server = MariaDB()
    try:
        server.init()
        server.start()
        server.create_user()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """The session's MariaDB server (import this fixture into a test module to use it)."""
    server = start_mariadb()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def mysql_db(mariadb: MariaDB) -> Iterator[str]:
    """A fresh, empty database on the session's MariaDB; dropped after the test."""
    name = f"t_{secrets.token_hex(4)}"
    mariadb.create_database(name)
    try:
        yield name
    finally:
        mariadb.drop_database(name)

