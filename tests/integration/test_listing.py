"""`list`, `watch`, `show` and `progress` on many jobs and on slow or stuck ones: failed jobs are
never hidden behind pending ones, every job is reachable, and rates and ETAs are true."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import psycopg
import pytest

from backfill import Backfill, JobState, update
from tests.integration.helpers import cli, make_counter_table, sliced_and_running, wait_for

FAILED, PENDING = 100, 501


def _many_jobs(dsn: str) -> tuple[list[int], list[int]]:
    """One real job, cloned in SQL into 100 failed jobs (the oldest ids) and 501 pending ones,
    each clone with its own target and its `created` (and `failed`) event. Enqueuing 600 jobs
    one by one takes a minute; this takes a fraction of a second."""
    make_counter_table(dsn, 100)
    bf = Backfill(dsn)
    bf.upgrade()
    template = bf.enqueue(update("items", {"counter": "counter + 1"})).id
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        cols = [r[0] for r in c.execute(
            """SELECT column_name FROM information_schema.columns
               WHERE table_schema = 'backfill' AND table_name = 'jobs'
                 AND column_name NOT IN ('id', 'state', 'state_reason', 'conflict_key', 'name')
                 AND is_generated = 'NEVER'""").fetchall()]
        listed = ", ".join(cols)

        def clone(n: int, state: str) -> list[int]:
            ids = [r[0] for r in c.execute(
                f"""INSERT INTO backfill.jobs (name, state, state_reason, conflict_key, {listed})
                    SELECT name || '-' || i, %s, CASE WHEN %s = 'failed' THEN 'boom' END,
                           conflict_key || '#' || %s || i, {listed}
                    FROM backfill.jobs, generate_series(1, %s) i WHERE id = %s
                    ORDER BY i RETURNING id""",
                (state, state, state, n, template)).fetchall()]
            c.execute("""INSERT INTO backfill.events (job_id, kind, to_state, actor, reason)
                         SELECT id, 'created', 'pending', 'test', 'cloned'
                         FROM unnest(%s::bigint[]) id""", (ids,))
            if state == "failed":
                c.execute("""INSERT INTO backfill.events
                                 (job_id, kind, from_state, to_state, actor, reason)
                             SELECT id, 'transition', 'running', 'failed', 'test', 'boom'
                             FROM unnest(%s::bigint[]) id""", (ids,))
            return ids

        failed = clone(FAILED, "failed")
        pending = clone(PENDING, "pending")
    bf.cancel(template, "a template")
    return failed, pending


def test_failed_jobs_are_listed_first_and_every_job_is_reachable(dsn: str) -> None:
    failed, pending = _many_jobs(dsn)
    listed = cli(dsn, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [ln.split()[0] for ln in listed.stdout.splitlines()[1:] if ln.split()
            and ln.split()[0].isdigit()]
    assert len(rows) == 50
    assert {int(r) for r in rows} <= set(failed)  # the failed ones come first
    assert f"... and {FAILED + PENDING - 50:,} more ({FAILED + PENDING:,} jobs: 100 failed, " \
           "501 pending)" in listed.stdout

    every = json.loads(cli(dsn, "list", "--json").stdout)  # complete: no silent cap
    assert len(every) == FAILED + PENDING
    assert {j["id"] for j in every} == set(failed) | set(pending)
    assert [j["state"] for j in every[:FAILED]] == ["failed"] * FAILED

    page = json.loads(cli(dsn, "list", "--json", "--limit", "60", "--offset", "80").stdout)
    assert (page["total"], page["limit"], page["offset"], page["next_offset"]) == (
        FAILED + PENDING, 60, 80, 140)
    assert page["by_state"] == {"failed": FAILED, "pending": PENDING}
    assert [j["state"] for j in page["jobs"]] == ["failed"] * 20 + ["pending"] * 40

    everything = cli(dsn, "list", "--all", "--limit", "0")
    assert "more" not in everything.stdout
    assert sum(1 for ln in everything.stdout.splitlines() if " pending " in ln) == PENDING

    watched = cli(dsn, "watch", "--once", "--limit", "10")
    assert watched.returncode == 0, watched.stderr
    assert f"... and {FAILED + PENDING - 10:,} more" in watched.stdout
    assert "failed" in watched.stdout
    bf = Backfill(dsn)
    assert len(bf.list()) == FAILED + PENDING
    assert bf.page(limit=5).more == FAILED + PENDING - 5


@pytest.fixture
def slow_job(dsn: str) -> Iterator[tuple[Backfill, int]]:
    """A --rate 5 job on 20,000 rows, running in a thread that sleeps between its batches;
    stopped (paused) at the end."""
    make_counter_table(dsn, 20_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=100,
                            min_batch_size=10, rate=5))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: bf.run(job.id, stop=stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: bf.progress(job.id).batches >= 1, timeout=30, what="a first batch")
        yield bf, job.id
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_rate_limited_job_shows_an_eta_of_hours(slow_job: tuple[Backfill, int]) -> None:
    bf, job_id = slow_job
    prog = bf.progress(job_id)
    # ~19,900 rows left at 5 rows/s: about 66 minutes, whatever the first batch's speed.
    assert prog.recent_rows_per_s is not None
    assert prog.recent_rows_per_s <= 5.0
    assert prog.eta_s is not None
    assert prog.eta_s > 3600
    shown = json.loads(cli(bf.dsn, "show", str(job_id), "--json").stdout)
    assert shown["state"] == "running"
    assert shown["eta_s"] > 3600
    assert shown["stalled_since"] is None
    assert "1h" in cli(bf.dsn, "show", str(job_id)).stdout


def test_a_job_without_a_batch_for_long_shows_stalled_since(dsn: str) -> None:
    make_counter_table(dsn, 20_000)
    bf = Backfill(dsn)
    job_id = bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=800)).id
    sliced_and_running(dsn, job_id).close()  # running, its runner gone (no batch will come)
    # It did 800 rows every 0.5 s until 14 minutes ago: write that history, and move the
    # start back (events are append-only: past the trigger, as fifteen minutes would).
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute("SET LOCAL session_replication_role = replica")
        c.execute("UPDATE backfill.events SET at = at - interval '15 minutes' WHERE job_id = %s",
                  (job_id,))
        c.execute("""INSERT INTO backfill.batches (job_id, slice_no, finished_at, duration_ms,
                                                   batch_size, rows_scanned, rows_affected)
                     SELECT %s, 0, now() - interval '14 minutes' - i * interval '0.5 s', 400,
                            800, 800, 800 FROM generate_series(0, 19) i""", (job_id,))
        c.execute("UPDATE backfill.slices SET rows_scanned = 16000, batches = 20 "
                  "WHERE job_id = %s", (job_id,))
        last = c.execute("SELECT max(finished_at) FROM backfill.batches WHERE job_id = %s",
                         (job_id,)).fetchone()
    assert last is not None
    assert bf.get(job_id).state == JobState.RUNNING
    prog = bf.progress(job_id)
    assert prog.stalled_since == last[0]
    assert prog.eta_s is None  # not 3 minutes
    assert prog.recent_rows_per_s is not None
    assert prog.recent_rows_per_s < 10
    hhmm = f"{last[0].astimezone():%H:%M}"
    shown = cli(dsn, "show", str(job_id))
    assert f"stalled since {hhmm} (no batch for 14m" in shown.stdout, shown.stdout
    assert f"stalled since {hhmm}" in cli(dsn, "list").stdout
    data = json.loads(cli(dsn, "show", str(job_id), "--json").stdout)
    assert data["stalled_since"] is not None
    assert data["eta_s"] is None
