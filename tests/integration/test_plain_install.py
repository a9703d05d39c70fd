"""A plain install runs the distributed mode: ``pip install .`` (no extras, not editable) into a
fresh virtualenv, then Redis, ``backfill worker`` and ``backfill dispatch`` from that venv, with
the working directory outside the repository and no PYTHONPATH, so nothing comes from the
source tree or from the test extra. Everything the workers need at run time must come with
the package's own dependencies (kombu's Redis transport needs ``packaging``, for one)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.integration.helpers import (
    ROOT,
    counter_histogram,
    make_counter_table,
    scalar,
    stop_process,
    wait_for,
)
from tests.integration.servers import RedisServer, clean_env


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict[str, str],
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout, check=False)


def test_the_installed_package_imports_its_broker_transport(plain_venv: Path,
                                                            tmp_path: Path) -> None:
    res = _run(plain_venv, tmp_path, "python", "-c",
               "import kombu.transport.redis, backfill, workers.app; print(backfill.__file__)",
               env=clean_env())
    assert res.returncode == 0, res.stderr
    installed = Path(res.stdout.strip())
    assert plain_venv.parent in installed.parents, f"imported from {installed}, not the venv"


def test_a_plain_install_names_the_extra_a_mysql_command_needs(plain_venv: Path, bare_dsn: str,
                                                               tmp_path: Path) -> None:
    # No `mysql` extra: every MySQL command says which extra to install, in one line.
    env = clean_env(BACKFILL_DSN=bare_dsn)
    source = "mysql://root@127.0.0.1:1/db"
    for args in (("convert-schema", "--source", source), ("mysql", "show", "--source", source)):
        res = _run(plain_venv, tmp_path, "backfill", *args, env=env)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "pip install 'backfill[mysql]'" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_plain_install_runs_a_job_on_its_workers(plain_venv: Path, bare_dsn: str,
                                                   tmp_path: Path) -> None:
    env = clean_env(BACKFILL_DSN=bare_dsn, BACKFILL_LOG_FORMAT="json")
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
        if worker is not None:
            stop_process(worker)
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
    env = clean_env(BACKFILL_DSN=bare_dsn, DEMO_ROWS="5000", BACKFILL_USE_INSTALLED="1",
                     BACKFILL_LOG_FORMAT="json")
    env["PATH"] = f"{plain_venv}{os.pathsep}{env['PATH']}"
    res = subprocess.run(["bash", str(app / "scripts" / "demo.sh")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "backfill migrate complete examples/migrations/" in res.stderr
    assert "==> done" in res.stderr
    assert not (app / ".venv").exists(), "the demo made its own venv instead of using the install"
