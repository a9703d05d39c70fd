"""Helpers shared by integration tests: tables with per-row counters, polling, subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def make_counter_table(dsn: str, rows: int, *, table: str = "items", key: str = "bigint") -> None:
    """A table whose jobs increment ``counter``: every row must end at exactly 1."""
    with psycopg.connect(dsn, autocommit=True) as c:
        if key == "bigint":
            c.execute(f"""CREATE TABLE {table} (id bigint PRIMARY KEY, val int NOT NULL,
                          counter int NOT NULL DEFAULT 0, note text)""")
            c.execute(f"INSERT INTO {table} (id, val) SELECT i, i %% 100 FROM generate_series(1, %s) i",
                      (rows,))
        elif key == "uuid":
            c.execute(f"""CREATE TABLE {table} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                          val int NOT NULL, counter int NOT NULL DEFAULT 0, note text)""")
            c.execute(f"INSERT INTO {table} (val) SELECT i %% 100 FROM generate_series(1, %s) i", (rows,))
        elif key == "text":
            c.execute(f"""CREATE TABLE {table} (id text PRIMARY KEY, val int NOT NULL,
                          counter int NOT NULL DEFAULT 0, note text)""")
            c.execute(f"""INSERT INTO {table} (id, val) SELECT md5(i::text) || ' x' || i, i %% 100
                          FROM generate_series(1, %s) i""", (rows,))
        elif key == "timestamptz":
            c.execute(f"""CREATE TABLE {table} (id timestamptz PRIMARY KEY, val int NOT NULL,
                          counter int NOT NULL DEFAULT 0, note text)""")
            c.execute(f"""INSERT INTO {table} (id, val)
                          SELECT timestamptz '2024-01-01 00:00:00+00' + i * interval '1.5 second',
                                 i %% 100 FROM generate_series(1, %s) i""", (rows,))
        elif key == "composite":
            c.execute(f"""CREATE TABLE {table} (tenant int NOT NULL, seq bigint NOT NULL,
                          val int NOT NULL, counter int NOT NULL DEFAULT 0, note text,
                          PRIMARY KEY (tenant, seq))""")
            c.execute(f"""INSERT INTO {table} (tenant, seq, val)
                          SELECT i %% 7, i, i %% 100 FROM generate_series(1, %s) i""", (rows,))
        else:
            raise ValueError(key)
        c.execute(f"ANALYZE {table}")


def counter_histogram(dsn: str, table: str = "items") -> dict[int, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return {int(k): int(n) for k, n in c.execute(
            f"SELECT counter, count(*) FROM {table} GROUP BY counter ORDER BY counter").fetchall()}


def scalar(dsn: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(query, params).fetchone()
        return row[0] if row else None


def wait_for(predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BACKFILL_LOG_FORMAT": "json", "BACKFILL_ACTOR": "tester", **extra})
    return env


def cli(dsn: str, *args: str, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process; ``env``: extra environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dsn, *args],
        capture_output=True, text=True, timeout=timeout, env=cli_env(**(env or {})), cwd=ROOT,
        check=False,
    )


def cli_popen(dsn: str, *args: str, output: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dsn, *args],
        stdout=output, stderr=output, text=True, env=cli_env(), cwd=ROOT,
    )


def kill_run_after(dsn: str, job_id: int, batches: int) -> None:
    """Start ``backfill run JOB`` in its own process and SIGKILL it once the job has done
    ``batches`` batches (as a crash would, between or in the middle of batches)."""
    from backfill import Backfill

    bf = Backfill(dsn)
    proc = cli_popen(dsn, "run", str(job_id), "--no-progress", output=subprocess.DEVNULL)
    try:
        wait_for(lambda: bf.progress(job_id).batches >= batches, timeout=60,
                 what=f"{batches} batches")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def sliced_and_running(dsn: str, job_id: int) -> Any:
    """Snapshot a job's slices without running a batch, then mark it running with no runner,
    as a worker would find it; returns an open state-store connection (close it)."""
    import threading

    from backfill import Backfill, JobState
    from backfill.core.db import connect
    from backfill.state import store

    bf = Backfill(dsn)
    stop = threading.Event()
    stop.set()
    assert bf.run(job_id, stop=stop).state == JobState.PAUSED
    bf.resume(job_id)
    conn = connect(dsn)
    store.transition(conn, job_id, JobState.RUNNING, actor="test")
    return conn


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
