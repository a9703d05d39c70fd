"""A job writes only the relations it was bound to: a table dropped and recreated (same name,
same rows) while the job runs gets no write, inline or on the workers, for the source (in this
database or another), the destination of a copy or move, and the undo log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backfill import Backfill, JobState, copy, move, update
from backfill.job.spec import JobSpec
from tests.conftest import _create_db, _db_dsn, _drop_db
from tests.integration.helpers import counter_histogram, make_counter_table, scalar, wait_for
from tests.integration.servers import RedisServer, Workers, broker

INC = {"counter": "counter + 1"}
FIXED = {"batch_size": 200, "min_batch_size": 200, "max_batch_size": 200}


def _recreate(dsn: str, table: str = "items", rows: int = 5_000, val: str = "i %% 100") -> None:
    """DROP and CREATE the same table with the same rows, in one transaction."""
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute(f"DROP TABLE {table}")
        c.execute(f"""CREATE TABLE {table} (id bigint PRIMARY KEY, val int NOT NULL,
                      counter int NOT NULL DEFAULT 0, note text)""")
        c.execute(f"INSERT INTO {table} (id, val) SELECT i, {val} FROM generate_series(1, %s) i",
                  (rows,))


def _run_in_thread(bf: Backfill, job_id: int) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def target() -> None:
        try:
            out.append(bf.run(job_id, skip_preflight=True))
        except Exception as exc:  # reported by the test's assertions
            out.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _assert_failed_naming_the_change(bf: Backfill, job_id: int) -> None:
    job = bf.get(job_id)
    assert job.state == JobState.FAILED, (job.state, job.state_reason)
    # The batch's own proof (TableChanged) or, for a task that starts after the change, the
    # binding check of its preparation: either way before any write.
    assert "table public.items was dropped and recreated" in (job.state_reason or ""), \
        job.state_reason


def test_source_recreated_mid_run_inline_gets_no_write(dsn: str) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, rate=1000, **FIXED))
    t, out = _run_in_thread(bf, job.id)
    wait_for(lambda: bf.progress(job.id).batches >= 3, timeout=30, what="three batches")
    _recreate(dsn)
    t.join(timeout=60)
    assert not t.is_alive()
    assert [getattr(r, "state", r) for r in out] == [JobState.FAILED], "run returns the job"
    _assert_failed_naming_the_change(bf, job.id)
    assert counter_histogram(dsn) == {0: 5_000}, "the new table got no write"
    assert bf.progress(job.id).rows_scanned < 5_000


@pytest.mark.parametrize("kind", [copy, move], ids=["copy", "move"])
def test_destination_recreated_mid_run_gets_no_write(dsn: str, kind: Any) -> None:
    make_counter_table(dsn, 5_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items_copy (LIKE items INCLUDING ALL)")
    bf = Backfill(dsn)
    job = bf.enqueue(kind("items", "items_copy", rate=1000, **FIXED))
    t, out = _run_in_thread(bf, job.id)
    wait_for(lambda: bf.progress(job.id).batches >= 3, timeout=30, what="three batches")
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute("DROP TABLE items_copy")
        c.execute("CREATE TABLE items_copy (LIKE items INCLUDING ALL)")
    t.join(timeout=60)
    assert not t.is_alive()
    assert [getattr(r, "state", r) for r in out] == [JobState.FAILED], "run returns the job"
    failed = bf.get(job.id)
    assert failed.state == JobState.FAILED, failed.state_reason
    assert "destination table public.items_copy was dropped and recreated" in (
        failed.state_reason or ""), failed.state_reason
    assert scalar(dsn, "SELECT count(*) FROM items_copy") == 0
    # A copy leaves the source whole; a move took from it only the rows of the batches that
    # committed into the old destination.
    taken = bf.progress(job.id).rows_scanned if kind is move else 0
    assert scalar(dsn, "SELECT count(*) FROM items") == 5_000 - taken


@pytest.fixture
def source(admin_dsn: str) -> Iterator[str]:
    """Another database on the same server, holding ``items`` (5,000 rows)."""
    name = _create_db(admin_dsn, "template0")
    src = _db_dsn(admin_dsn, name)
    make_counter_table(src, 5_000)
    try:
        yield src
    finally:
        _drop_db(admin_dsn, name)


def test_cross_database_source_recreated_mid_run_gives_no_row_of_it(dsn: str,
                                                                     source: str) -> None:
    """The source is proven on the source's connection, in the transaction that read it."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""CREATE TABLE items (id bigint PRIMARY KEY, val int NOT NULL,
                     counter int NOT NULL DEFAULT 0, note text)""")
    bf = Backfill(dsn)
    job = bf.enqueue(JobSpec("copy", "items", dest="items", source_dsn=source).with_options(
        rate=1000, **FIXED))
    t, out = _run_in_thread(bf, job.id)
    wait_for(lambda: bf.progress(job.id).batches >= 3, timeout=30, what="three batches")
    _recreate(source, val="-1")   # the new table's rows are told apart by val = -1
    t.join(timeout=60)
    assert not t.is_alive()
    assert [getattr(r, "state", r) for r in out] == [JobState.FAILED], "run returns the job"
    _assert_failed_naming_the_change(bf, job.id)
    assert scalar(dsn, "SELECT count(*) FROM items WHERE val = -1") == 0
    assert scalar(dsn, "SELECT count(*) FROM items") == bf.progress(job.id).rows_scanned < 5_000


def test_undo_log_recreated_mid_run_fails_the_job(dsn: str) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, rate=1000, **FIXED))
    t, out = _run_in_thread(bf, job.id)
    wait_for(lambda: bf.progress(job.id).batches >= 3, timeout=30, what="three batches")
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute(f"CREATE TABLE backfill.tmp_undo AS TABLE backfill.undo_{job.id}")
        c.execute(f"DROP TABLE backfill.undo_{job.id}")
        c.execute(f"ALTER TABLE backfill.tmp_undo RENAME TO undo_{job.id}")
    t.join(timeout=60)
    assert not t.is_alive()
    assert [getattr(r, "state", r) for r in out] == [JobState.FAILED], "run returns the job"
    failed = bf.get(job.id)
    assert failed.state == JobState.FAILED
    assert f"undo log table backfill.undo_{job.id}" in (failed.state_reason or "")
    done = bf.progress(job.id).rows_scanned
    # Every row the job counts as done has exactly one undo row, in the new log or the old.
    assert counter_histogram(dsn) == {0: 5_000 - done, 1: done}
    assert scalar(dsn, f"SELECT count(*) FROM backfill.undo_{job.id}") == done


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[Workers]:
    redis = RedisServer()
    redis.start()
    pool = Workers(dsn, redis.url, tmp_path)
    try:
        with broker(redis.url):
            yield pool
    finally:
        pool.stop()
        redis.stop()


def test_source_recreated_mid_run_on_the_workers_gets_no_write(dsn: str,
                                                               workers: Workers) -> None:
    from workers.tasks import dispatch

    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, rate=1000, **FIXED))
    workers.start(1)
    dispatch(dsn, job.id, actor="tester")
    wait_for(lambda: bf.progress(job.id).batches >= 3, timeout=60, what="three batches")
    _recreate(dsn)
    wait_for(lambda: bf.get(job.id).state in (JobState.FAILED, JobState.SUCCEEDED),
             timeout=60, what="the job to end")
    _assert_failed_naming_the_change(bf, job.id)
    assert counter_histogram(dsn) == {0: 5_000}


def test_a_write_that_went_to_another_table_is_caught_even_if_the_names_swap_back(
        dsn: str) -> None:
    """A schema renamed and renamed back around a batch's statement takes no lock on the
    tables inside it: the name check alone would pass. The batch must hold a row-writing lock
    on the bound oid itself. Here the renames happen inside the batch (a trigger on the
    impostor table swaps the schemas back right after the write), deterministically."""
    from backfill.core.errors import TableChanged
    from backfill.engine.batch import run_batch
    from backfill.engine.keyset import KeyCodec
    from backfill.engine.prepare import prepare_stored
    from backfill.state import leases, store
    from tests.integration.helpers import sliced_and_running

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE SCHEMA s")
        c.execute("CREATE TABLE s.t (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0)")
        c.execute("INSERT INTO s.t (id) SELECT generate_series(1, 100)")
    bf = Backfill(dsn)
    job = bf.enqueue(update("s.t", INC, batch_size=10, min_batch_size=10, max_batch_size=10))
    conn = sliced_and_running(dsn, job.id)
    prepared = prepare_stored(conn, store.get_job(conn, job.id), explain=False)
    with psycopg.connect(dsn, autocommit=True) as c:
        # The impostor: s.t is now another table; after any write to it, the names go back.
        c.execute("ALTER SCHEMA s RENAME TO s_bound")
        c.execute("CREATE SCHEMA s")
        # Its counters are NULL, so that the batch's first statement writes it on every
        # server (before 18 a batch over values first tries the fill of NULLs, which writes
        # no row there, and the trigger would swap the names back before the write).
        c.execute("CREATE TABLE s.t (id bigint PRIMARY KEY, counter int)")
        c.execute("INSERT INTO s.t (id) SELECT generate_series(1, 100)")
        c.execute("""CREATE FUNCTION s.swap_back() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                       ALTER SCHEMA s RENAME TO s_impostor;
                       ALTER SCHEMA s_bound RENAME TO s;
                       RETURN NULL;
                     END $$""")
        c.execute("CREATE TRIGGER swap AFTER UPDATE ON s.t FOR EACH STATEMENT "
                  "EXECUTE FUNCTION s.swap_back()")
    codec = KeyCodec(prepared.key_types)
    lease = leases.acquire_lease(conn, job.id, 0, "test", 60, actor="test")
    assert lease is not None
    with pytest.raises(TableChanged, match=r"did not go to the source table s\.t"):
        run_batch(conn, prepared, job_id=job.id, slice_no=0, cursor=None,
                  slice_upper=(100,), size=10, options=prepared.spec.options, codec=codec,
                  lease_token=lease.token)
    conn.close()
    # Rolled back whole: the renames too, and neither table counted anything.
    assert scalar(dsn, "SELECT count(*) FROM s_bound.t WHERE counter > 0") == 0
    assert scalar(dsn, "SELECT count(*) FROM s.t WHERE counter > 0") == 0
