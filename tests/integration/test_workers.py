"""Distributed execution: real Redis, real Celery worker processes, real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backfill import Backfill, JobState, update
from tests.integration.helpers import ROOT, counter_histogram, make_counter_table, stop_process, wait_for
from tests.integration.servers import RedisServer, Workers, broker, free_port

INC = {"counter": "counter + 1"}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def workers(dsn: str, redis_url: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(dsn, redis_url, tmp_path)
    try:
        with broker(redis_url):  # this process sends tasks too
            yield pool
    finally:
        pool.stop()


def test_workers_run_slices_and_pause_gives_slots_back(dsn: str, workers: Workers) -> None:
    from workers.tasks import dispatch

    make_counter_table(dsn, 40_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=4, batch_size=200, min_batch_size=200,
                            max_batch_size=200, pause="20ms"))
    workers.start(2)
    try:
        assert [d.slice_no for d in dispatch(dsn, job.id, actor="tester")] == [0, 1, 2, 3]
        wait_for(lambda: bf.progress(job.id).batches >= 20, timeout=60, what="progress")
        bf.pause(job.id, reason="check slots")
        # Paused: every task gives its slot back, leases are released, nothing advances.
        wait_for(lambda: all(s.lease_owner is None for s in bf.slices(job.id)), timeout=30,
                 what="leases released")
        done_at_pause = bf.progress(job.id).rows_scanned
        assert 0 < done_at_pause < 40_000
        bf.resume(job.id)  # pending again: the workers' reaper starts it from the checkpoints
        final = bf.wait(job.id, timeout=120)
        assert final.state == JobState.SUCCEEDED, final.state_reason
    finally:
        workers.stop()
    assert counter_histogram(dsn) == {1: 40_000}
    owners = {s.lease_owner for s in bf.slices(job.id)}
    assert owners == {None}
    logs = workers.logs()
    assert len(logs) == 2
    assert all("backfill.run_slice" in text for text in logs), "both workers took tasks"
    transitions = [(e.from_state, e.to_state) for e in bf.events(job.id) if e.kind == "transition"]
    assert transitions[0] == ("pending", "running")
    assert transitions[-1] == ("running", "succeeded")


def test_tasks_lost_with_redis_are_replaced_by_the_reaper(dsn: str, redis_url: str,
                                                          workers: Workers) -> None:
    import redis

    from workers.tasks import dispatch

    make_counter_table(dsn, 9_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=300))
    assert len(dispatch(dsn, job.id, actor="tester")) == 3  # no worker is running yet
    redis.Redis.from_url(redis_url).flushall()  # the broker loses every task
    workers.start(1)
    try:
        final = bf.wait(job.id, timeout=120)  # nobody acts: the workers' reaper re-sends
    finally:
        workers.stop()
    assert final.state == JobState.SUCCEEDED, final.state_reason
    assert counter_histogram(dsn) == {1: 9_000}
    resent = [e for e in bf.events(job.id) if e.kind == "dispatch" and e.actor.startswith("reaper:")]
    assert resent, "the reaper recorded what it re-sent"
    assert resent[0].details is not None
    assert all("never started" in why for why in resent[0].details["slices"].values())


def test_broker_down_at_enqueue_leaves_the_job_pending(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    env = dict(os.environ, BACKFILL_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
               BACKFILL_LOG_FORMAT="json")
    res = subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dsn, "enqueue", "--table", "items",
         "--set", "counter = counter + 1", "--workers", "--parallelism", "2"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "left pending" in res.stderr
    assert "unreachable" in res.stderr
    [job] = Backfill(dsn).list()
    assert job.state == JobState.PENDING
    assert job.runs_on == "workers"
    assert Backfill(dsn).slices(job.id) == []


def test_a_task_for_an_unknown_job_is_dropped_without_a_write(
        dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.tasks import run_slice

    monkeypatch.setenv("BACKFILL_DSN", dsn)
    assert run_slice.run(999, 0, 1) == "dropped"
    # A task for a job that already ended: no write, and no task sent on.
    make_counter_table(dsn, 500)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert run_slice.run(job.id, 0, 0) == "stopped"
    assert counter_histogram(dsn) == {1: 500}


def test_tune_parallelism_up_splits_running_slices(dsn: str, workers: Workers) -> None:
    from workers.tasks import dispatch

    make_counter_table(dsn, 60_000)
    bf = Backfill(dsn)
    # About 5 s of work per slice: the holders see the new parallelism at their next heartbeat.
    job = bf.enqueue(update("items", INC, parallelism=2, batch_size=200, min_batch_size=200,
                            max_batch_size=200, pause="30ms"))
    workers.start(2)
    assert len(dispatch(dsn, job.id, actor="tester")) == 2
    wait_for(lambda: bf.progress(job.id).batches >= 4, timeout=60, what="progress")
    bf.tune(job.id, parallelism=4)
    wait_for(lambda: len(bf.slices(job.id)) >= 4, timeout=60, what="slices split")
    final = bf.wait(job.id, timeout=120)
    assert final.state == JobState.SUCCEEDED, final.state_reason
    assert counter_histogram(dsn) == {1: 60_000}
    splits = [e for e in bf.events(job.id) if e.kind == "rebalance"]
    assert len(splits) >= 2
    assert all("free slot" in (e.reason or "") for e in splits)


def test_worker_refuses_a_mismatched_state_schema(dsn: str, redis_url: str) -> None:
    import psycopg

    from backfill.state.schema import LATEST

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO backfill.schema_version (version, description) VALUES (%s, 'x')",
                  (LATEST + 1,))
    env = dict(os.environ, BACKFILL_DSN=dsn, BACKFILL_BROKER_URL=redis_url,
               BACKFILL_LOG_FORMAT="json")
    res = subprocess.run([sys.executable, "-m", "backfill.cli.main", "worker"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=ROOT, check=False)
    assert res.returncode == 1
    assert "newer than this backfill" in res.stderr
    # Started by Celery directly, bypassing the CLI: the worker_init check still refuses.
    raw = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
         "-Q", "backfill", "--without-gossip", "--without-mingle"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
    assert raw.returncode != 0
    assert "newer than this backfill" in raw.stdout + raw.stderr


def test_worker_refuses_a_broker_client_it_cannot_load(dsn: str) -> None:
    """A plain install once lacked `packaging` (kombu's Redis transport imports it): `backfill
    worker` died with a traceback. It refuses at once and says what is wrong, not
    "unreachable": a module missing from the install, an unknown or malformed broker URL."""
    from tests.unit.test_worker_config import NO_PACKAGING

    worker = ("import sys\nsys.argv = ['backfill', 'worker']\n"
              "from backfill.cli.main import main\nmain()\n")
    cases = [(NO_PACKAGING + worker, f"redis://127.0.0.1:{free_port()}/0",
              "No module named 'packaging"),
             (worker, "nosuchtransport://host/0", "fix BACKFILL_BROKER_URL"),
             (worker, "redis://127.0.0.1:notaport/0", "fix BACKFILL_BROKER_URL")]
    for code, url, want in cases:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "CELERY_"))}
        env.update(PYTHONPATH=str(ROOT), BACKFILL_DSN=dsn, BACKFILL_BROKER_URL=url,
                   BACKFILL_LOG_FORMAT="json")
        # Without the check, Celery starts (packaging is there after the exec) and retries
        # the broker for ever, or dies with a traceback: the timeout fails the test.
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30, env=env, cwd=ROOT, check=False)
        text = " ".join(res.stderr.split())
        assert res.returncode == 1, (url, res.stdout + res.stderr)
        assert want in text, (url, text)
        assert "unreachable" not in text, url
        assert "Traceback" not in res.stdout + res.stderr, url


def test_backfill_worker_consumes_the_queue_a_config_module_names(
        dsn: str, redis_url: str, tmp_path: Path) -> None:
    """BACKFILL_CELERY_CONFIG may rename the queue tasks are sent to (task_default_queue):
    `backfill worker` listens there, not on a hard-coded `backfill`, so the job runs."""
    (tmp_path / "myqueueconf.py").write_text("task_default_queue = 'elsewhere'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "CELERY_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), BACKFILL_DSN=dsn,
               BACKFILL_BROKER_URL=redis_url, BACKFILL_CELERY_CONFIG="myqueueconf",
               BACKFILL_LOG_FORMAT="json", BACKFILL_SLICE_BUDGET_S="0.5")
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=250))
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "backfill.cli.main", "worker", "--concurrency", "1"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        res = subprocess.run([sys.executable, "-m", "backfill.cli.main", "dispatch", str(job.id)],
                             capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
                             check=False)
        assert res.returncode == 0, res.stdout + res.stderr

        def ended() -> bool:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            return bf.get(job.id).state in (JobState.SUCCEEDED, JobState.FAILED)

        wait_for(ended, timeout=60, interval=0.25, what=f"the job to end ({log_path})")
    finally:
        stop_process(worker)
    assert bf.get(job.id).state == JobState.SUCCEEDED, log_path.read_text()[-3000:]
    assert counter_histogram(dsn) == {1: 1_000}
    assert ".> elsewhere" in log_path.read_text()  # Celery's banner lists the queues it reads


def test_a_throttled_job_gives_its_workers_back_and_resumes_from_the_checkpoints(
        dsn: str, workers: Workers) -> None:
    from backfill.core.db import connect
    from backfill.state import store

    make_counter_table(dsn, 30_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=2, batch_size=200, min_batch_size=200,
                            max_batch_size=200, pause="10ms"), workers=True)
    workers.start(2)  # their reaper starts the job: nobody dispatches it
    wait_for(lambda: bf.progress(job.id).batches >= 5, timeout=60, what="progress")
    conn = connect(dsn)
    try:
        # What the controller does when the database is under strain.
        store.transition(conn, job.id, JobState.THROTTLED, actor="controller:test",
                         reason="replica_lag[r1] 12s >= 10s")
        wait_for(lambda: all(s.lease_owner is None for s in bf.slices(job.id)), timeout=30,
                 what="slots given back")
        scanned = bf.progress(job.id).rows_scanned
        assert scanned < 30_000
        store.transition(conn, job.id, JobState.RUNNING, actor="controller:test",
                         reason="every signal below its resume threshold for 10s")
    finally:
        conn.close()
    final = bf.wait(job.id, timeout=120)  # the reaper re-sends the parked slices
    assert final.state == JobState.SUCCEEDED, final.state_reason
    assert counter_histogram(dsn) == {1: 30_000}
