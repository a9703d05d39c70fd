"""Distributed execution: real Redis, real Celery worker processes, real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backfill import Backfill, JobState, update
from tests.integration.helpers import ROOT, counter_histogram, make_counter_table, wait_for

INC = {"counter": "counter + 1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("BACKFILL_REQUIRE_PG"):
            pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
        pytest.skip("redis-server is not installed")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="backfill-test-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(ready, timeout=20, what="redis to listen")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)


def _start_workers(dsn: str, broker: str, n: int, tmp: Path) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, BACKFILL_DSN=dsn, BACKFILL_BROKER_URL=broker,
               BACKFILL_SLICE_BUDGET_S="0.5", BACKFILL_LOG_FORMAT="json")
    procs = []
    for i in range(n):
        log = open(tmp / f"worker{i}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
             "-n", f"w{i}@%h", "-Q", "backfill", "--without-gossip", "--without-mingle",
             "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_workers_run_slices_and_pause_gives_slots_back(dsn: str, redis_url: str,
                                                       tmp_path: Path) -> None:
    from workers import app as app_module
    from workers.tasks import dispatch

    app_module.app.conf.broker_url = redis_url
    make_counter_table(dsn, 40_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=4, batch_size=200, min_batch_size=200,
                            max_batch_size=200, pause="20ms"))
    workers = _start_workers(dsn, redis_url, 2, tmp_path)
    try:
        assert sorted(dispatch(dsn, job.id, actor="tester")) == [0, 1, 2, 3]
        wait_for(lambda: bf.progress(job.id).batches >= 20, timeout=60, what="progress")
        bf.pause(job.id, reason="check slots")
        # Paused: every task gives its slot back, leases are released, nothing advances.
        wait_for(lambda: all(s.lease_owner is None for s in bf.slices(job.id)), timeout=30,
                 what="leases released")
        done_at_pause = bf.progress(job.id).rows_scanned
        assert 0 < done_at_pause < 40_000
        bf.resume(job.id)
        assert dispatch(dsn, job.id, actor="tester")  # resume re-dispatches unfinished slices
        final = bf.wait(job.id, timeout=120)
        assert final.state == JobState.SUCCEEDED, final.state_reason
    finally:
        _stop(workers)
    assert counter_histogram(dsn) == {1: 40_000}
    owners = {s.lease_owner for s in bf.slices(job.id)}
    assert owners == {None}
    logs = [p.read_text() for p in sorted(tmp_path.glob("worker*.log"))]
    assert len(logs) == 2
    assert all("backfill.run_slice" in text for text in logs), "both workers took tasks"
    transitions = [(e.from_state, e.to_state) for e in bf.events(job.id) if e.kind == "transition"]
    assert transitions[0] == ("pending", "running")
    assert transitions[-1] == ("running", "succeeded")


def test_tasks_lost_with_redis_are_replaced_by_the_reaper(dsn: str, redis_url: str,
                                                          tmp_path: Path) -> None:
    import redis

    from workers import app as app_module
    from workers.tasks import dispatch

    app_module.app.conf.broker_url = redis_url
    make_counter_table(dsn, 9_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=300))
    assert len(dispatch(dsn, job.id, actor="tester")) == 3  # no worker is running yet
    redis.Redis.from_url(redis_url).flushall()  # the broker loses every task
    workers = _start_workers(dsn, redis_url, 1, tmp_path)
    try:
        env = dict(os.environ, BACKFILL_BROKER_URL=redis_url, BACKFILL_LOG_FORMAT="json")
        reaped = subprocess.run(
            [sys.executable, "-m", "backfill.cli", "--dsn", dsn, "reap"],
            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
        assert reaped.returncode == 0, reaped.stderr
        assert "re-dispatched 3 slice(s)" in reaped.stdout
        final = bf.wait(job.id, timeout=120)
    finally:
        _stop(workers)
    assert final.state == JobState.SUCCEEDED, final.state_reason
    assert counter_histogram(dsn) == {1: 9_000}


def test_a_task_for_an_unknown_job_is_dropped_without_a_write(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.tasks import run_slice

    monkeypatch.setenv("BACKFILL_DSN", dsn)
    assert run_slice.run(999, 0) == "dropped"
