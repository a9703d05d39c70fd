"""Queue health of jobs on the workers, exported from the state store: how long work handed to
the workers has waited for one to start it, and how often dispatches went stale. No broker and
no worker here: the tasks are claimed as a dispatcher would, and never started."""

from __future__ import annotations

import psycopg

from backfill import Backfill, JobState, update
from backfill.core.db import connect
from backfill.engine.runner import WORKERS_OWNER, Runner
from backfill.observe.metrics import StateCollector
from backfill.state import leases
from tests.integration.helpers import make_counter_table

INC = {"counter": "counter + 1"}
Samples = dict[str, dict[str, float]]


def collect(dsn: str, stale_after_s: float = 120.0) -> Samples:
    """{sample name: {job_id (or ""): value}} from one scrape."""
    out: Samples = {}
    for family in StateCollector(dsn, dispatch_stale_s=stale_after_s).collect():
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("job_id", "")] = sample.value
    return out


def _age_dispatches(dsn: str, job_id: int, seconds: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE backfill.slices SET dispatched_at = dispatched_at - %s * interval '1s'"
                  " WHERE job_id = %s AND dispatched_at IS NOT NULL", (seconds, job_id))


def test_work_no_worker_starts_ages_and_stale_dispatches_are_counted(dsn: str) -> None:
    make_counter_table(dsn, 4_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=500))
    jid = str(job.id)
    assert jid not in collect(dsn).get("backfill_job_dispatch_oldest_unclaimed_seconds", {}), \
        "an inline job has no queue"

    # Dispatched (as `backfill dispatch` does), and no worker takes the tasks.
    claims = Runner(dsn, job.id, actor="tester", owner=WORKERS_OWNER).start_distributed(gate=None)
    assert len(claims) == 3
    _age_dispatches(dsn, job.id, 600)
    m = collect(dsn, stale_after_s=45)
    assert m["backfill_dispatch_stale_after_seconds"][""] == 45
    assert 600 <= m["backfill_job_dispatch_oldest_unclaimed_seconds"][jid] < 700
    assert m["backfill_job_dispatch_unclaimed_slices"][jid] == 3
    assert m["backfill_job_stale_dispatches_total"][jid] == 0

    # A reaper pass finds them stale and re-sends them: counted once, and the clock restarts.
    conn = connect(dsn)
    try:
        resent = leases.claim_dispatch(conn, job.id, stale_after_s=120, actor="reaper:test")
        assert len(resent) == 3
        m = collect(dsn)
        assert m["backfill_job_stale_dispatches_total"][jid] == 1
        assert m["backfill_job_dispatch_oldest_unclaimed_seconds"][jid] < 60
        # Re-sending by hand what is still queued (not stale) is not counted.
        assert len(leases.claim_dispatch(conn, job.id, stale_after_s=120, actor="tester",
                                        replace_queued=True)) == 3
        assert collect(dsn)["backfill_job_stale_dispatches_total"][jid] == 1

        # A worker starts each task: nothing waits.
        for d in resent:
            lease = leases.acquire_for_task(conn, d.job_id, d.slice_no, d.seq, "worker:test",
                                           60, actor="worker:test")
            assert not isinstance(lease, str), lease
    finally:
        conn.close()
    m = collect(dsn)
    assert m["backfill_job_dispatch_oldest_unclaimed_seconds"][jid] == 0
    assert m["backfill_job_dispatch_unclaimed_slices"][jid] == 0
    assert m["backfill_job_stale_dispatches_total"][jid] == 1


def test_a_pending_job_on_the_workers_waits_from_when_it_became_pending(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC), workers=True)  # no worker: no reaper starts it
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE backfill.jobs SET created_at = now() - interval '20 min' WHERE id = %s",
                  (job.id,))
    m = collect(dsn)
    assert bf.get(job.id).state == JobState.PENDING
    assert 1200 <= m["backfill_job_dispatch_oldest_unclaimed_seconds"][str(job.id)] < 1300
    assert m["backfill_job_dispatch_unclaimed_slices"][str(job.id)] == 0
