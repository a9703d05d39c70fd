"""Each job kind on real data, with per-row counters: every row processed exactly once."""

from __future__ import annotations

import psycopg
import pytest

from backfill import Backfill, JobState, copy, delete, move, sql_job, transform, update
from tests.integration.helpers import counter_histogram, make_counter_table, scalar


@pytest.mark.parametrize("key", ["bigint", "uuid", "text", "timestamptz", "composite"])
def test_update_touches_every_row_once_for_each_key_type(dsn: str, key: str) -> None:
    make_counter_table(dsn, 2_500, key=key)
    bf = Backfill(dsn, actor="tester")
    job = bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=100))
    done = bf.run(job.id)
    assert done.state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 2_500}
    prog = bf.progress(job.id)
    assert prog.rows_scanned == 2_500
    assert prog.rows_affected == 2_500
    kinds = [(e.kind, e.to_state) for e in bf.events(job.id)]
    assert kinds[0] == ("created", "pending")
    assert ("transition", "running") in kinds
    assert kinds[-1] == ("transition", "succeeded")


def test_update_with_extra_where_and_verify(dsn: str) -> None:
    make_counter_table(dsn, 3_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'v' || val"}, where="val < 50", batch_size=250))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 1_500
    assert scalar(dsn, "SELECT count(*) FROM items WHERE val >= 50 AND note IS NOT NULL") == 0
    report = bf.verify(job.id, chunk=700)
    assert report.ok, report.to_json()
    assert report.checked_chunks == 5
    # Verify reports the range that differs after someone undoes part of the work.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE items SET note = NULL WHERE id BETWEEN 1401 AND 1410 AND val < 50")
    report = bf.verify(job.id, chunk=700)
    assert not report.ok
    assert len(report.diffs) == 1
    assert report.diffs[0].lower == (1400,)
    assert "10 rows" in report.diffs[0].detail


def test_rows_inserted_after_start_are_not_chased(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=100))
    inserted = []

    def on_tick(_: object) -> None:
        if not inserted:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("INSERT INTO items (id, val) SELECT i, 0 FROM generate_series(1001, 1100) i")
            inserted.append(True)

    assert bf.run(job.id, on_tick=on_tick).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM items WHERE id <= 1000 AND counter = 1") == 1_000
    assert scalar(dsn, "SELECT count(*) FROM items WHERE id > 1000 AND counter = 0") == 100


@pytest.mark.parametrize("key", ["bigint", "composite"])
def test_sql_job_gets_inclusive_bounds(dsn: str, key: str) -> None:
    make_counter_table(dsn, 2_000, key=key)
    bf = Backfill(dsn)
    if key == "bigint":
        stmt = "UPDATE items SET counter = counter + 1 WHERE id BETWEEN %(lower)s AND %(upper)s"
    else:
        stmt = ("UPDATE items SET counter = counter + 1 WHERE (tenant, seq) "
                ">= (%(lower_tenant)s, %(lower_seq)s) AND (tenant, seq) "
                "<= (%(upper_tenant)s, %(upper_seq)s)")
    job = bf.enqueue(sql_job("items", stmt, batch_size=150))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 2_000}
    assert bf.verify(job.id).unverifiable


@pytest.mark.parametrize("conflict", ["nothing", "update"])
def test_copy_with_conflicts_and_checksum_verify(dsn: str, conflict: str) -> None:
    make_counter_table(dsn, 2_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items_copy (LIKE items INCLUDING ALL)")
        c.execute("INSERT INTO items_copy SELECT id, -1, 0, 'old' FROM items WHERE id <= 10")
    bf = Backfill(dsn)
    job = bf.enqueue(copy("items", "items_copy", on_conflict=conflict, batch_size=300))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM items_copy") == 2_000
    report = bf.verify(job.id, chunk=500)
    if conflict == "update":
        assert report.ok, report.to_json()
        assert scalar(dsn, "SELECT count(*) FROM items_copy WHERE note = 'old'") == 0
    else:  # pre-existing rows were kept, and verify says exactly where
        assert [d.lower for d in report.diffs] == [None]
        assert "checksums differ" in report.diffs[0].detail


def test_copy_conflict_error_fails_job_with_range(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items_copy (LIKE items INCLUDING ALL)")
        c.execute("INSERT INTO items_copy SELECT * FROM items WHERE id = 650")
    bf = Backfill(dsn)
    job = bf.enqueue(copy("items", "items_copy", batch_size=100, min_batch_size=100,
                          max_batch_size=100))
    failed = bf.run(job.id)
    assert failed.state == JobState.FAILED
    assert "UniqueViolation" in (failed.last_error or "")
    assert failed.error_range is not None
    assert failed.error_range["after"] == [600]
    assert scalar(dsn, "SELECT count(*) FROM items_copy") == 601  # batches before it committed
    # Fix the cause, retry: resumes from the checkpoint, not from the start.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM items_copy WHERE id = 650")
    bf.retry(job.id)
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert bf.verify(job.id).ok
    reasons = [(e.from_state, e.to_state) for e in bf.events(job.id) if e.kind == "transition"]
    assert ("running", "failed") in reasons
    assert ("failed", "pending") in reasons


def test_move_deletes_source_rows_in_the_same_transaction(dsn: str) -> None:
    make_counter_table(dsn, 2_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items_archive (LIKE items INCLUDING ALL)")
        before = c.execute("SELECT sum(val), count(*) FROM items WHERE val < 30").fetchone()
    bf = Backfill(dsn)
    job = bf.enqueue(move("items", "items_archive", where="val < 30", batch_size=250))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM items WHERE val < 30") == 0
    assert scalar(dsn, "SELECT count(*) FROM items") == 2_000 - before[1]
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT sum(val), count(*) FROM items_archive").fetchone() == before
    assert bf.verify(job.id).ok


def test_transform_normalises_phones(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE customers (id bigint PRIMARY KEY, phone text)")
        c.execute("""INSERT INTO customers SELECT i, CASE i % 3
                       WHEN 0 THEN '(555) 010-' || lpad(i::text, 4, '0')
                       WHEN 1 THEN '+1555010' || lpad(i::text, 4, '0')
                       ELSE 'n/a' END FROM generate_series(1, 900) i""")
    bf = Backfill(dsn)
    job = bf.enqueue("normalise_customer_phones", batch_size=100)
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM customers WHERE phone LIKE '(%'") == 0
    assert scalar(dsn, "SELECT phone FROM customers WHERE id = 3") == "+15550100003"
    assert scalar(dsn, "SELECT count(*) FROM customers WHERE phone = 'n/a'") == 300
    assert bf.progress(job.id).rows_affected == 300  # only rows that changed are written
    assert bf.verify(job.id).ok


def test_transform_from_api_with_function_object(dsn: str) -> None:
    from jobs.examples import normalise_phone

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE people (id int PRIMARY KEY, phone text)")
        c.execute("INSERT INTO people VALUES (1, '555 010 0001'), (2, NULL)")
    bf = Backfill(dsn)
    done = bf.run(transform("people", normalise_phone, columns=["phone"]))
    assert done.state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT phone FROM people WHERE id = 1") == "+15550100001"


def test_delete_by_predicate(dsn: str) -> None:
    make_counter_table(dsn, 2_000, key="composite")
    bf = Backfill(dsn)
    job = bf.enqueue(delete("items", "val >= 90", batch_size=300))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM items WHERE val >= 90") == 0
    assert scalar(dsn, "SELECT count(*) FROM items") == 1_800
    assert bf.progress(job.id).rows_affected == 200
    assert bf.verify(job.id).ok


def test_empty_table_succeeds_at_once(dsn: str) -> None:
    make_counter_table(dsn, 0)
    bf = Backfill(dsn)
    done = bf.run(update("items", {"counter": "counter + 1"}))
    assert done.state == JobState.SUCCEEDED
    assert "empty" in (done.state_reason or "")
