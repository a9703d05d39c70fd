"""Slices of about equal row counts (sampled boundaries) and leases with fencing tokens."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from backfill import Backfill, IllegalTransition, JobState, update
from backfill.core.catalog import resolve_table
from backfill.core.db import connect
from backfill.core.errors import LeaseLost
from backfill.engine import slicing
from backfill.engine.batch import run_batch
from backfill.engine.keyset import KeyCodec
from backfill.engine.prepare import prepare_stored
from backfill.state import leases, store
from tests.integration.helpers import counter_histogram, make_counter_table, sliced_and_running

INC = {"counter": "counter + 1"}


def _skewed_table(dsn: str, rows: int) -> None:
    """90 % of the rows in ids 1..0.9*rows, the rest spread up to a billion."""
    dense = rows * 9 // 10
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""CREATE TABLE items (id bigint PRIMARY KEY, val int NOT NULL,
                     counter int NOT NULL DEFAULT 0, note text)""")
        c.execute("INSERT INTO items (id, val) SELECT i, 0 FROM generate_series(1, %s) i", (dense,))
        c.execute("""INSERT INTO items (id, val)
                     SELECT 10000000 + 1000000000::bigint * i / %s, 0
                     FROM generate_series(1, %s) i""",
                  (rows - dense, rows - dense))
        c.execute("VACUUM ANALYZE items")


@pytest.mark.parametrize(("rows", "exact"), [(40_000, True), (400_000, False)])
def test_boundaries_balance_rows_on_skewed_keys(dsn: str, rows: int, exact: bool) -> None:
    _skewed_table(dsn, rows)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=4))
    conn = connect(dsn)
    prepared = prepare_stored(conn, store.get_job(conn, job.id), explain=False)
    upper = prepared.keyset.max_key(conn)
    assert upper is not None
    estimate = resolve_table(conn, "items").rows_estimate
    assert (estimate is not None and estimate >= slicing.EXACT_BELOW) != exact
    if not exact:
        # 400k rows are ~2,500 pages: 4 x 500 sampled pages are most of it, not all of it (a
        # 100 % "sample" of a 500M-row table would sort it all before the first batch).
        assert slicing.sample_percent(conn, prepared.keyset, 4, rows) < 100
    cuts = slicing.boundaries(conn, prepared.keyset, upper, 4, estimate)
    assert len(cuts) == 3
    assert cuts == sorted(cuts)
    edges: list[Any] = [None, *cuts, upper]
    counts = []
    for lo, hi in itertools.pairwise(edges):
        row = conn.execute(prepared.keyset.count_query(lower=lo is not None),
                           prepared.keyset.params(lo, hi)).fetchone()
        assert row is not None
        counts.append(row[0])
    conn.close()
    assert sum(counts) == rows
    for n in counts:  # a key-space split would put 90 % of the rows in one slice
        assert abs(n - rows / 4) <= rows * 0.05, counts


@pytest.mark.parametrize("key", ["bigint", "composite", "text"])
def test_parallelism_splits_the_job_and_every_row_is_done_once(dsn: str, key: str) -> None:
    make_counter_table(dsn, 5_000, key=key)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=400))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 5_000}
    slices = bf.slices(job.id)
    assert len(slices) == 3
    assert all(s.done for s in slices)
    assert all(abs(s.rows_scanned - 5_000 / 3) < 5 for s in slices), [s.rows_scanned for s in slices]
    assert slices[0].lower_bound is None
    assert slices[1].lower_bound == slices[0].upper_bound
    snapshot = next(e for e in bf.events(job.id) if e.kind == "snapshot")
    assert "3 slice(s)" in (snapshot.reason or "")
    assert bf.verify(job.id).checked_rows == 5_000


def test_parallelism_is_fixed_once_the_job_started(dsn: str) -> None:
    make_counter_table(dsn, 100)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC))
    bf.tune(job.id, parallelism=2)  # before the start: fine
    assert bf.run(job.id).state == JobState.SUCCEEDED
    other = bf.enqueue(update("items", {"note": "'x'"}, parallelism=2))
    import threading

    stop = threading.Event()
    stop.set()
    assert bf.run(other.id, stop=stop).state == JobState.PAUSED  # sliced, then paused
    with pytest.raises(IllegalTransition, match="before it starts"):
        bf.tune(other.id, parallelism=4)


def test_lease_fencing_token_refuses_a_previous_holders_checkpoint(dsn: str) -> None:
    make_counter_table(dsn, 300)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100))
    conn = sliced_and_running(dsn, job.id)
    rec = store.get_job(conn, job.id)
    prepared = prepare_stored(conn, rec, explain=False)
    codec = KeyCodec(prepared.key_types)
    upper = codec.decode(leases.slices(conn, job.id)[0].upper_bound)
    assert upper is not None
    first = leases.acquire_lease(conn, job.id, 0, "worker-a", 60, actor="worker-a")
    assert first is not None
    assert leases.acquire_lease(conn, job.id, 0, "worker-b", 60, actor="worker-b") is None
    # worker-a goes silent: its lease runs out (moved into the past rather than waited for).
    conn.execute("UPDATE backfill.slices SET lease_expires_at = now() - interval '1 second'")
    second = leases.acquire_lease(conn, job.id, 0, "worker-b", 60, actor="worker-b")
    assert second is not None
    assert second.token == first.token + 1
    kwargs: dict[str, Any] = {"job_id": job.id, "slice_no": 0, "cursor": None,
                              "slice_upper": upper, "size": 100,
                              "options": rec.options, "codec": codec}
    with pytest.raises(LeaseLost):
        run_batch(conn, prepared, lease_token=first.token, **kwargs)  # the late worker-a
    assert counter_histogram(dsn) == {0: 300}
    run_batch(conn, prepared, lease_token=second.token, **kwargs)
    assert counter_histogram(dsn) == {0: 200, 1: 100}
    assert not leases.renew_lease(conn, first, 60)
    assert leases.renew_lease(conn, second, 60)
    takeover = [e for e in store.events(conn, job.id) if e.kind == "lease_takeover"]
    assert len(takeover) == 1
    assert takeover[0].details is not None
    assert takeover[0].details["previous_owner"] == "worker-a"
    conn.close()


def test_dispatch_claims_respect_parallelism_and_fence_leftover_tasks(dsn: str) -> None:
    make_counter_table(dsn, 3_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=100))
    conn = sliced_and_running(dsn, job.id)
    leases.set_runs_on(conn, job.id, "workers")
    bf.tune(job.id, parallelism=2)  # allowed any time for a job on the workers

    first = leases.claim_dispatch(conn, job.id, stale_after_s=60, actor="t")
    assert [(d.slice_no, d.seq) for d in first] == [(0, 0), (1, 0)]
    assert leases.claim_dispatch(conn, job.id, stale_after_s=60, actor="t") == []  # queued
    # The broker lost them: dispatching again re-sends (a slice that never had a task first).
    again = leases.claim_dispatch(conn, job.id, stale_after_s=60, actor="t", replace_queued=True)
    assert [(d.slice_no, d.seq) for d in again] == [(0, 0), (2, 0)]
    assert leases.acquire_for_task(conn, job.id, 0, 7, "w1", 60, actor="w1") == "stale"
    lease0 = leases.acquire_for_task(conn, job.id, 0, 0, "w1", 60, actor="w1")
    assert isinstance(lease0, leases.Lease)
    assert leases.acquire_for_task(conn, job.id, 0, 0, "w2", 60, actor="w2") == "busy"
    lease1 = leases.acquire_for_task(conn, job.id, 1, 0, "w2", 60, actor="w2")
    assert isinstance(lease1, leases.Lease)
    # Two slices leased, parallelism 2: slice 2 gets no task, and its task is parked.
    assert leases.claim_dispatch(conn, job.id, stale_after_s=0, actor="t") == []
    assert leases.acquire_for_task(conn, job.id, 2, 0, "w3", 60, actor="w3") == "full"
    assert leases.get_slice(conn, job.id, 2).dispatched_at is None
    # Slice 0 gives its slot back for its next task, under a new token: the duplicate sent
    # above (seq 0), arriving late, is dropped.
    assert leases.requeue(conn, lease0) == 1
    leases.release_lease(conn, lease0)
    assert leases.acquire_for_task(conn, job.id, 0, 0, "w9", 60, actor="w9") == "stale"
    assert leases.claim_dispatch(conn, job.id, stale_after_s=60, actor="t") == []
    # w2 dies: its lease runs out (moved into the past rather than waited for).
    conn.execute("UPDATE backfill.slices SET lease_expires_at = now() - interval '1 second'"
                 " WHERE slice_no = 1")
    reclaimed = leases.claim_dispatch(conn, job.id, stale_after_s=60, actor="reaper")
    assert [(d.slice_no, d.seq) for d in reclaimed] == [(1, 0)]
    events = [e for e in store.events(conn, job.id) if e.kind == "dispatch"]
    assert events[-1].details is not None
    assert events[-1].details["slices"] == {"1": events[-1].details["slices"]["1"]}
    assert "lease of w2 expired" in events[-1].details["slices"]["1"]
    taken = leases.acquire_for_task(conn, job.id, 1, 0, "w4", 60, actor="w4")
    assert isinstance(taken, leases.Lease)
    assert taken.previous_owner == "w2"
    assert any(e.kind == "lease_takeover" and "w2" in (e.reason or "")
               for e in store.events(conn, job.id))
    conn.close()


def test_a_split_slice_covers_its_range_exactly_once(dsn: str) -> None:
    make_counter_table(dsn, 30_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=2, batch_size=1_000))
    conn = sliced_and_running(dsn, job.id)
    leases.set_runs_on(conn, job.id, "workers")
    rec = store.get_job(conn, job.id)
    prepared = prepare_stored(conn, rec, explain=False)
    codec = KeyCodec(prepared.key_types)
    # Slice 1 finishes early (by hand): a slot is free, and slice 0 holds the most rows.
    conn.execute("UPDATE backfill.slices SET done = true WHERE job_id = %s AND slice_no = 1",
                 (job.id,))
    lease = leases.acquire_lease(conn, job.id, 0, "w1", 60, actor="w1")
    assert lease is not None
    left = leases.split_candidate(conn, job.id, 0, min_rows=1_000)
    assert left == 15_000
    slc = leases.get_slice(conn, job.id, 0)
    upper = codec.decode(slc.upper_bound)
    assert upper is not None
    cut = slicing.split_point(conn, prepared.keyset, None, upper, left)
    assert cut is not None
    assert abs(int(cut[0]) - 7_500) <= 1
    bound = codec.encode(upper) or []
    assert leases.split_slice(conn, lease, cursor=[0], upper=bound, cut=codec.encode(cut) or [],
                             rows_left=left, actor="w1") is None  # the cursor is not [0]
    new_no = leases.split_slice(conn, lease, cursor=None, upper=bound,
                               cut=codec.encode(cut) or [], rows_left=left, actor="w1")
    assert new_no == 2
    # Retried after a lost COMMIT: the bound moved, so it cannot cut twice.
    assert leases.split_slice(conn, lease, cursor=None, upper=bound, cut=[5_000],
                             rows_left=left, actor="w1") is None
    assert leases.split_candidate(conn, job.id, 0, min_rows=1_000) is None  # 2 open, 2 slots
    leases.release_lease(conn, lease)
    conn.execute("UPDATE backfill.slices SET done = false WHERE job_id = %s AND slice_no = 1",
                 (job.id,))
    bf.pause(job.id)
    conn.close()
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 30_000}
    assert [s.rows_scanned for s in bf.slices(job.id)] == [7_500, 15_000, 7_500]
    assert any(e.kind == "rebalance" for e in bf.events(job.id))


def test_run_after_a_paused_runner_was_killed_takes_its_leases(dsn: str) -> None:
    """A runner SIGKILLed after a pause leaves live slice leases; resume + run must not skip
    those slices and leave the job running with nobody."""
    import threading

    make_counter_table(dsn, 3_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=3, batch_size=100, min_batch_size=100,
                            max_batch_size=100))
    stop = threading.Event()
    stop.set()
    bf.run(job.id, stop=stop)
    bf.resume(job.id)
    conn = connect(dsn)
    # What a killed runner leaves behind: slice leases still live for a minute.
    for slice_no in (0, 1, 2):
        assert leases.acquire_lease(conn, job.id, slice_no, "runner:elsewhere:1", 60,
                                   actor="runner:elsewhere:1") is not None
    conn.close()
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 3_000}
    takeovers = [e for e in bf.events(job.id) if e.kind == "lease_takeover"]
    assert len(takeovers) == 3


def test_sampled_boundaries_with_composite_keys(dsn: str) -> None:
    make_counter_table(dsn, 250_000, key="composite")
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=4, max_batch_size=50_000,
                            batch_size=50_000))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 250_000}
    sizes = [s.rows_scanned for s in bf.slices(job.id)]
    assert len(sizes) == 4
    assert all(abs(n - 62_500) <= 250_000 * 0.05 for n in sizes), sizes


def test_inline_run_refuses_a_job_running_on_the_workers(dsn: str) -> None:
    from backfill.core.errors import JobConflict
    from backfill.engine.runner import WORKERS_OWNER, Runner

    make_counter_table(dsn, 500)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=2), workers=True)
    assert job.runs_on == "workers"
    claims = Runner(dsn, job.id, actor="t", owner=WORKERS_OWNER).start_distributed(gate=None)
    assert [c.slice_no for c in claims] == [0, 1]
    with pytest.raises(JobConflict, match="on the workers; pause it first"):
        bf.run(job.id)
    bf.pause(job.id)
    bf.resume(job.id)
    assert bf.run(job.id).state == JobState.SUCCEEDED  # taken back inline, from the checkpoints
    assert bf.get(job.id).runs_on == "inline"
    assert counter_histogram(dsn) == {1: 500}


def test_the_sample_is_sized_by_the_table_and_its_partitions(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE big (id bigint PRIMARY KEY, pad text)")
        c.execute("INSERT INTO big SELECT i, repeat('x', 200) FROM generate_series(1, 200000) i")
        c.execute("""CREATE TABLE parted (id bigint PRIMARY KEY, pad text)
                     PARTITION BY RANGE (id)""")
        c.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100001)")
        c.execute("CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100001) TO (300000)")
        c.execute("INSERT INTO parted SELECT i, repeat('x', 200) FROM generate_series(1, 200000) i")
        c.execute("ANALYZE big, parted")
    from psycopg import sql

    from backfill.engine.keyset import Keyset

    conn = connect(dsn)
    try:
        # ~6,900 pages each: 2 x 500 pages is about 14 %.
        for table in ("big", "parted"):
            keyset = Keyset(sql.Identifier("public", table), ("id",))
            percent = slicing.sample_percent(conn, keyset, 2, 200_000)
            assert 10 < percent < 20, (table, percent)
    finally:
        conn.close()
