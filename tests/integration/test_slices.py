"""Slices of about equal row counts (sampled boundaries) and leases with fencing tokens."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from backfill import Backfill, IllegalTransition, JobState, slicing, store, update
from backfill.batch import run_batch
from backfill.catalog import resolve_table
from backfill.db import connect
from backfill.errors import LeaseLost
from backfill.keyset import KeyCodec
from backfill.kinds import prepare_stored
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
    upper = codec.decode(store.slices(conn, job.id)[0].upper_bound)
    assert upper is not None
    first = store.acquire_lease(conn, job.id, 0, "worker-a", 60, actor="worker-a")
    assert first is not None
    assert store.acquire_lease(conn, job.id, 0, "worker-b", 60, actor="worker-b") is None
    # worker-a goes silent: its lease runs out (moved into the past rather than waited for).
    conn.execute("UPDATE backfill.slices SET lease_expires_at = now() - interval '1 second'")
    second = store.acquire_lease(conn, job.id, 0, "worker-b", 60, actor="worker-b")
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
    assert not store.renew_lease(conn, first, 60)
    assert store.renew_lease(conn, second, 60)
    takeover = [e for e in store.events(conn, job.id) if e.kind == "lease_takeover"]
    assert len(takeover) == 1
    assert takeover[0].details is not None
    assert takeover[0].details["previous_owner"] == "worker-a"
    conn.close()


def test_expired_slices_lists_what_a_reaper_would_redispatch(dsn: str) -> None:
    make_counter_table(dsn, 200)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, parallelism=2))
    conn = sliced_and_running(dsn, job.id)
    assert store.expired_slices(conn) == [(job.id, 0, None), (job.id, 1, None)]
    lease = store.acquire_lease(conn, job.id, 1, "worker-a", 60, actor="worker-a")
    assert lease is not None
    assert store.expired_slices(conn) == [(job.id, 0, None)]
    conn.close()


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
        assert store.acquire_lease(conn, job.id, slice_no, "runner:elsewhere:1", 60,
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
