"""Real Redis servers and real Celery worker processes for the distributed tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import missing_tool
from tests.integration.helpers import ROOT, wait_for

#: What ``pip install .`` needs from the repository (the Dockerfile copies the same).
PACKAGE_FILES = ("pyproject.toml", "README.md", "backfill", "workers", "jobs")
INSTALL_TIMEOUT_S = 300


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, no venv of ours, no BACKFILL_*."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
           and not k.startswith(("BACKFILL_", "CELERY_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    env.update(extra)
    return env


def build_plain_venv(base: Path) -> Path:
    """A virtualenv in ``base`` holding ``pip install <copy of the repository>`` as a user
    makes it: no extras, not editable, pip's own build isolation (and its cache). Returns its
    bin/."""
    src = base / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    venv = base / "venv"
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, cwd=base,
                   timeout=120)
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, env=env, cwd=base,
                         timeout=INSTALL_TIMEOUT_S, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return venv / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def broker(url: str) -> Iterator[None]:
    """Point this process's Celery app (which sends tasks too) at ``url``, and back afterwards.
    The app keeps a producer pool per broker it has used: it is dropped both ways, so a test
    never sends to a Redis that an earlier test stopped."""
    from workers import app as app_module

    app = app_module.app
    before = app.conf.broker_url

    def reset(to: str) -> None:
        app.conf.broker_url = to
        app._pool = None
        app.amqp._producer_pool = None

    reset(url)
    try:
        yield
    finally:
        reset(before)


class RedisServer:
    """A redis-server on a free loopback port, without persistence: a restart loses all."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_tool("redis", "redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="backfill-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _listening(self.port), timeout=20, what="redis to listen")

    def kill(self) -> None:
        """SIGKILL: everything in memory (queued and unacked tasks) is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=20)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class Workers:
    """Celery worker processes (solo pool: one process is one worker, killed as a whole)."""

    def __init__(self, dsn: str, broker: str, logdir: Path, *, installed: Path | None = None,
                 **env: str) -> None:
        """``installed``: the bin/ of a plain install (:func:`build_plain_venv`) to run the
        workers from, outside the repository and with a user's environment; else this
        interpreter in the source tree."""
        self.python = str(installed / "python") if installed else sys.executable
        self.cwd = logdir if installed else ROOT
        self.env = (clean_env() if installed else dict(os.environ))
        self.env.update(BACKFILL_DSN=dsn, BACKFILL_BROKER_URL=broker,
                        BACKFILL_SLICE_BUDGET_S="0.5", BACKFILL_LOG_FORMAT="json",
                        BACKFILL_REAP_EVERY_S="1", BACKFILL_DISPATCH_STALE_S="5",
                        BACKFILL_LEASE_TTL_S="10")
        self.env.update(env)
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            i = self.started
            self.started += 1
            log = open(self.logdir / f"worker{i}.log", "wb")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen(
                [self.python, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
                 "-n", f"w{i}@%h", "-Q", "backfill", "--without-gossip", "--without-mingle",
                 "--loglevel", "INFO"],
                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            ))

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)

    def logs(self) -> list[str]:
        return [p.read_text() for p in sorted(self.logdir.glob("worker*.log"))]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)
