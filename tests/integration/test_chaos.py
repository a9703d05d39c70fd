"""The chaos test: a job on real Celery workers survives SIGKILLed workers, a Redis restart that
loses every task, and a PostgreSQL fast restart during a batch, while a writer keeps inserting,
updating and deleting rows of the same table. Nobody acts: the reaper and the retries finish the
job, and every row in the snapshot ends with its counter at exactly 1. The workers run from a
plain ``pip install .`` of the package (no extras, outside the source tree), as users deploy it.

The kill schedule comes from a seed, printed at the start (and in every failure message);
replay a run with ``BACKFILL_CHAOS_SEED=<seed> pytest tests/integration/test_chaos.py``.
``BACKFILL_CHAOS_ROWS`` changes the table size (default 1,000,000).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from backfill import Backfill, JobState, update
from backfill_dev.localpg import LocalPostgres
from tests.integration.helpers import make_counter_table
from tests.integration.servers import RedisServer, Workers, broker

T = TypeVar("T")
SEED = int(os.environ.get("BACKFILL_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
ROWS = int(os.environ.get("BACKFILL_CHAOS_ROWS", "1000000"))
KILLS = 5
REPLAY = f"chaos seed {SEED}: replay with BACKFILL_CHAOS_SEED={SEED}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        with broker(server.url):   # this process sends tasks too
            yield server
    finally:
        server.stop()


def _patiently(fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Call ``fn``, riding out the database restart the test itself causes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not _patiently(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} ({REPLAY})")
        time.sleep(0.05)


class Writer(threading.Thread):
    """The application: inserts past the job's snapshot, updates and deletes rows in it."""

    def __init__(self, dsn: str, seed: int) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.ops: Counter[str] = Counter()
        self.next_id = ROWS + 1

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                op = self.rng.choice(("insert", "update", "update", "delete"))
                if op == "insert":
                    conn.execute("INSERT INTO items (id, val) VALUES (%s, 1)", (self.next_id,))
                    self.next_id += 1
                elif op == "update":
                    conn.execute("UPDATE items SET val = val + 1, note = 'app' WHERE id = %s",
                                 (self.rng.randint(1, ROWS),))
                else:
                    conn.execute("DELETE FROM items WHERE id = %s", (self.rng.randint(1, ROWS),))
                self.ops[op] += 1
            except psycopg.OperationalError:
                self.ops["reconnect"] += 1
                conn = None
                self.stop.wait(0.2)
            self.stop.wait(0.002)
        if conn is not None:
            conn.close()


def _batch_in_flight(dsn: str, job_id: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            """SELECT count(*) FROM pg_stat_activity
               WHERE application_name = %s AND state = 'active'
                 -- the batch's write to the table, whatever its shape (plain, or logging
                 -- the undo rows around it; not the checkpoint's UPDATE of the state)
                 AND query LIKE '%%UPDATE "public"."items"%%'""",
            (f"backfill job {job_id}",),
        ).fetchone()
        return bool(row and row[0])


def test_chaos_kills_restarts_and_a_concurrent_writer(
        dsn: str, pg_server: LocalPostgres | None, redis_server: RedisServer,
        tmp_path: Path, plain_venv: Path) -> None:
    if pg_server is None:
        pytest.skip("needs the test session's own server to restart it")
    print(REPLAY)
    rng = random.Random(SEED)
    make_counter_table(dsn, ROWS)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"counter": "counter + 1"}, parallelism=4,
                            batch_size=1_000, min_batch_size=500, max_batch_size=2_000,
                            pause="25ms", statement_timeout="3s"), workers=True)
    # Slices are given back every 2 s; a killed worker's lease runs out after 16 s (twice the
    # statement timeout plus 10 s); a task that has not started 4 s after it was sent is lost.
    # The workers run from a plain `pip install .` (no extras, outside the source tree): what
    # users deploy is what survives the chaos.
    workers = Workers(dsn, redis_server.url, tmp_path, installed=plain_venv,
                      BACKFILL_SLICE_BUDGET_S="2", BACKFILL_DISPATCH_STALE_S="4",
                      BACKFILL_LEASE_TTL_S="5")
    writer = Writer(dsn, SEED + 1)
    chaos = ["kill"] * KILLS + ["redis", "postgres"]
    rng.shuffle(chaos)
    at = sorted(rng.uniform(0.03, 0.7) for _ in chaos)
    done_log: list[str] = []
    workers.start(2)
    try:
        # Nobody dispatches: the job was enqueued for the workers, and their reaper starts it.
        _until(lambda: bf.slices(job.id), 60, "the reaper to start the job")
        writer.start()
        t0 = time.monotonic()
        for what, fraction in zip(chaos, at, strict=True):
            _until(lambda f=fraction: bf.progress(job.id).rows_scanned >= f * ROWS, 300,
                   f"{fraction:.0%} progress")
            time.sleep(rng.uniform(0, 0.5))
            state = _patiently(lambda: bf.get(job.id).state)
            assert state == JobState.RUNNING, f"{state} before all chaos was done ({REPLAY})"
            if what == "kill":
                victim = rng.choice(workers.live())
                workers.kill(victim)
                workers.start(1)  # the supervisor brings a worker back
            elif what == "redis":
                redis_server.restart()
            else:
                _until(lambda: _batch_in_flight(dsn, job.id), 30, "a batch in flight")
                pg_server.restart(mode="fast")
            scanned = _patiently(lambda: bf.progress(job.id).rows_scanned)
            done_log.append(f"{time.monotonic() - t0:6.1f}s {what:<8} at {scanned:>9,} rows")
        print("\n".join(done_log))
        _until(lambda: bf.get(job.id).state in (JobState.SUCCEEDED, JobState.FAILED), 600,
               "the job to finish")
    finally:
        writer.stop.set()
        workers.stop()
        writer.join(timeout=30)
    final = bf.get(job.id)
    assert final.state == JobState.SUCCEEDED, f"{final.state_reason} ({REPLAY})"
    print("writer:", dict(writer.ops))
    with psycopg.connect(dsn, autocommit=True) as c:
        in_snapshot = dict(c.execute(
            "SELECT counter, count(*) FROM items WHERE id <= %s GROUP BY counter", (ROWS,)
        ).fetchall())
        after = dict(c.execute(
            "SELECT counter, count(*) FROM items WHERE id > %s GROUP BY counter", (ROWS,)
        ).fetchall())
    skipped, twice = in_snapshot.get(0, 0), sum(n for k, n in in_snapshot.items() if k > 1)
    assert (skipped, twice) == (0, 0), f"{skipped} rows skipped, {twice} applied twice ({REPLAY})"
    assert set(after) <= {0}, f"rows inserted after the snapshot were touched ({REPLAY})"
    assert writer.ops["delete"] > 0
    assert writer.ops["insert"] > 0

    events = bf.events(job.id)
    print("events:", dict(Counter(e.kind for e in events)))
    for e in events:
        if e.kind in ("lease_takeover", "retry", "dispatch", "rebalance", "transition"):
            print(f"  {e.at:%H:%M:%S.%f} {e.kind:<15} {e.actor:<30} {e.reason}")
    takeovers = [e for e in events if e.kind == "lease_takeover"]
    assert takeovers, f"a killed worker's slice was never taken over ({REPLAY})"
    assert all(e.reason and "expired" in e.reason and e.details and e.details["previous_owner"]
               for e in takeovers)
    retries = [e for e in events if e.kind == "retry"]
    assert retries, f"the database restart cost no recorded retry ({REPLAY})"
    assert all(e.reason for e in retries)
    resent = [e for e in events if e.kind == "dispatch" and e.actor.startswith("reaper:")]
    assert resent, f"the reaper re-sent nothing ({REPLAY})"
    transitions = [(e.from_state, e.to_state) for e in events if e.kind == "transition"]
    assert transitions == [("pending", "running"), ("running", "succeeded")], transitions
