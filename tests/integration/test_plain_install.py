"""A plain install runs the distributed mode: ``pip install .`` (no extras, not editable) into a
fresh virtualenv, then Redis, ``backfill worker`` and ``backfill dispatch`` from that venv, with
the working directory outside the repository and no PYTHONPATH, so nothing comes from the
source tree or from the test extra. Everything the workers need at run time must come with
the package's own dependencies (kombu's Redis transport needs ``packaging``, for one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, counter_histogram, make_counter_table, scalar, wait_for
from tests.integration.servers import RedisServer

#: What ``pip install .`` needs from the repository (the Dockerfile copies the same).
PACKAGE_FILES = ("pyproject.toml", "README.md", "backfill", "workers", "jobs")
INSTALL_TIMEOUT_S = 300


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, no venv of ours, no BACKFILL_*."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
           and not k.startswith(("BACKFILL_", "CELERY_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding ``pip install <copy of the repository>``; returns its bin/."""
    base = tmp_path_factory.mktemp("plain-install")
    src = base / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    venv = base / "venv"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, cwd=base,
                   timeout=120)
    started = time.monotonic()
    # Like a user: no extras, not editable, pip's own build isolation (and its cache).
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, env=env, cwd=base,
                         timeout=INSTALL_TIMEOUT_S, check=False)
    took = time.monotonic() - started
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"pip install . took {took:.1f}s")
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict[str, str],
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout, check=False)


def test_the_installed_package_imports_its_broker_transport(plain_venv: Path,
                                                            tmp_path: Path) -> None:
    res = _run(plain_venv, tmp_path, "python", "-c",
               "import kombu.transport.redis, backfill, workers.app; print(backfill.__file__)",
               env=_clean_env())
    assert res.returncode == 0, res.stderr
    installed = Path(res.stdout.strip())
    assert plain_venv.parent in installed.parents, f"imported from {installed}, not the venv"


def test_a_plain_install_runs_a_job_on_its_workers(plain_venv: Path, bare_dsn: str,
                                                   tmp_path: Path) -> None:
    env = _clean_env(BACKFILL_DSN=bare_dsn, BACKFILL_LOG_FORMAT="json")
    res = _run(plain_venv, tmp_path, "backfill", "db", "upgrade", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    make_counter_table(bare_dsn, 3_000)
    res = _run(plain_venv, tmp_path, "backfill", "enqueue", "--table", "items", "--set",
               "counter = counter + 1", "--parallelism", "2", "--batch-size", "500", "--quiet",
               env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout

    redis = RedisServer()
    redis.start()
    env.update(BACKFILL_BROKER_URL=redis.url, BACKFILL_SLICE_BUDGET_S="0.5",
               BACKFILL_REAP_EVERY_S="1", BACKFILL_DISPATCH_STALE_S="5")
    log_path = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [str(plain_venv / "backfill"), "worker", "--concurrency", "1"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        res = _run(plain_venv, tmp_path, "backfill", "dispatch", job_id, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "sent" in res.stdout

        def finished() -> bool:
            assert worker is not None
            assert worker.poll() is None, log_path.read_text()[-3000:]
            state = scalar(bare_dsn, "SELECT state FROM backfill.jobs WHERE id = %s",
                           (int(job_id),))
            return state in ("succeeded", "failed", "cancelled")

        wait_for(finished, timeout=120, interval=0.25, what="the job to end on the plain-install worker")
        state = scalar(bare_dsn, "SELECT state FROM backfill.jobs WHERE id = %s", (int(job_id),))
        assert state == "succeeded", log_path.read_text()[-3000:]
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)
        redis.stop()
    assert counter_histogram(bare_dsn) == {1: 3_000}
    assert "backfill.run_slice" in log_path.read_text()


#: What the Docker image holds besides the installed package: the demo and what it reads.
DEMO_FILES = ("scripts", "examples")


def test_the_demo_runs_from_the_images_layout(plain_venv: Path, bare_dsn: str,
                                              tmp_path: Path) -> None:
    """The compose ``demo`` service: scripts/demo.sh in /app next to examples/, the package
    installed in a venv on PATH and BACKFILL_USE_INSTALLED=1, no source tree (Dockerfile)."""
    app = tmp_path / "app"
    app.mkdir()
    for name in DEMO_FILES:
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = _clean_env(BACKFILL_DSN=bare_dsn, DEMO_ROWS="5000", BACKFILL_USE_INSTALLED="1",
                     BACKFILL_LOG_FORMAT="json")
    env["PATH"] = f"{plain_venv}{os.pathsep}{env['PATH']}"
    res = subprocess.run(["bash", str(app / "scripts" / "demo.sh")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "backfill migrate complete examples/migrations/" in res.stderr
    assert "==> done" in res.stderr
    assert not (app / ".venv").exists(), "the demo made its own venv instead of using the install"
