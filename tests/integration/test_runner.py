"""The runner under pressure: duplicates, retries, timeouts, pause/cancel/tune from outside,
Ctrl-C, SIGKILL and a database restart. Per-row counters prove nothing is skipped or repeated."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import psycopg
import pytest

from backfill import Backfill, JobState, update
from backfill.core.db import connect
from backfill.core.errors import IllegalTransition, InvalidInput, JobConflict, LeaseLost
from backfill.engine.batch import run_batch
from backfill.engine.keyset import KeyCodec
from backfill.engine.prepare import prepare
from backfill.engine.runner import Runner, Tick
from backfill.engine.throttle import BatchSizer, LockWaits
from backfill.state import checkpoints, leases, store
from tests.integration.helpers import (
    cli,
    cli_popen,
    counter_histogram,
    kill_run_after,
    make_counter_table,
    scalar,
    sliced_and_running,
    wait_for,
)

INC = {"counter": "counter + 1"}


def _events(bf: Backfill, job_id: int, kind: str) -> list[store.Event]:
    return [e for e in bf.events(job_id) if e.kind == kind]


def test_duplicate_or_late_batch_applies_nothing(dsn: str) -> None:
    make_counter_table(dsn, 500)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100))
    conn = sliced_and_running(dsn, job.id)  # the range is snapshotted, no batch has run
    prepared = prepare(conn, store.get_job(conn, job.id).spec, explain=False)
    codec = KeyCodec(prepared.key_types)
    upper = codec.decode(leases.slices(conn, job.id)[0].upper_bound)
    assert upper is not None
    lease = leases.acquire_lease(conn, job.id, 0, "test", 60, actor="test")
    assert lease is not None
    kwargs: dict[str, Any] = {"job_id": job.id, "slice_no": 0, "cursor": None,
                              "slice_upper": upper, "size": 100,
                              "options": prepared.spec.options, "codec": codec,
                              "lease_token": lease.token}
    first = run_batch(conn, prepared, **kwargs)
    assert first.upper == (100,)
    with pytest.raises(LeaseLost):
        run_batch(conn, prepared, **kwargs)  # the same batch again, e.g. a redelivered task
    assert counter_histogram(dsn) == {0: 400, 1: 100}
    assert leases.slices(conn, job.id)[0].cursor == [100]
    conn.close()


def test_non_retryable_error_fails_with_range_then_retry_resumes(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE items ADD CONSTRAINT small CHECK (counter < 1 OR id < 700)")
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100))
    failed = bf.run(job.id)
    assert failed.state == JobState.FAILED
    assert "CheckViolation" in (failed.last_error or "")
    assert failed.error_range == {"after": [600], "attempts": 1, "batch_kind": "update"}
    assert not _events(bf, job.id, "retry"), "a check violation must not be retried"
    with pytest.raises(IllegalTransition, match="retry"):
        bf.run(job.id)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE items DROP CONSTRAINT small")
    bf.retry(job.id, reason="constraint fixed")
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 1_000}


def test_statement_timeout_shrinks_the_batch(dsn: str) -> None:
    make_counter_table(dsn, 300)
    with psycopg.connect(dsn, autocommit=True) as c:   # the gate refuses pg_sleep() itself
        c.execute("CREATE FUNCTION slow_plus(int) RETURNS int VOLATILE LANGUAGE sql AS "
                  "'SELECT $1 + 1 FROM pg_sleep(0.002)'")
    bf = Backfill(dsn)
    # 2 ms per row: 100 rows take ~200 ms, over the 120 ms statement timeout; 50 rows fit.
    slow = {"counter": "slow_plus(counter)"}
    job = bf.enqueue(update("items", slow, batch_size=100, min_batch_size=10, max_batch_size=100,
                            statement_timeout="120ms", target_duration="50ms"))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 300}
    retries = _events(bf, job.id, "retry")
    assert retries
    assert retries[0].details is not None
    assert retries[0].details["verdict"] == "shrink"
    assert retries[0].details["new_batch_size"] == 50
    assert "QueryCanceled" in (retries[0].reason or "")


def test_lock_timeout_is_retried_and_recorded(dsn: str) -> None:
    make_counter_table(dsn, 400)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100,
                            lock_timeout="50ms", max_retries=50))
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT * FROM items WHERE id = 250 FOR UPDATE")
    released = threading.Event()

    def release_after_retries() -> None:
        # The runner records retries once the batch finally commits, so watch its log instead:
        # wait until the batch has hit the lock timeout at least twice (each attempt is a new
        # backend query), then release.
        wait_for(lambda: scalar(dsn, """SELECT count(*) FROM pg_stat_activity
                                        WHERE wait_event_type = 'Lock'"""), timeout=30)
        wait_for(lambda: not scalar(dsn, """SELECT count(*) FROM pg_stat_activity
                                            WHERE wait_event_type = 'Lock'"""), timeout=30)
        blocker.rollback()
        released.set()

    t = threading.Thread(target=release_after_retries)
    t.start()
    try:
        done = bf.run(job.id)
    finally:
        t.join(timeout=60)
        blocker.close()
    assert released.is_set()
    assert done.state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 400}
    retries = _events(bf, job.id, "retry")
    assert retries
    assert all("LockNotAvailable" in (e.reason or "") for e in retries)
    assert scalar(dsn, "SELECT max(attempts) FROM backfill.batches WHERE job_id = %s", (job.id,)) > 1


def _run_in_thread(bf: Backfill, job_id: int, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["job"] = bf.run(job_id, **kw)
        except Exception as exc:  # surfaced by the test
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def test_pause_cancel_and_tune_from_another_connection_take_effect_next_batch(dsn: str) -> None:
    make_counter_table(dsn, 20_000)
    runner_bf = Backfill(dsn, actor="runner-side")
    operator = Backfill(dsn, actor="alice")
    job = operator.enqueue(update("items", INC, batch_size=100, min_batch_size=100,
                                  max_batch_size=100, pause="20ms"))
    t, result = _run_in_thread(runner_bf, job.id)
    wait_for(lambda: operator.progress(job.id).batches >= 3, what="3 batches")
    operator.tune(job.id, batch_size=400)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM backfill.batches WHERE batch_size = 400"),
             what="a batch of the tuned size")
    operator.pause(job.id, reason="maintenance window")
    t.join(timeout=30)
    assert result["job"].state == JobState.PAUSED
    batches_at_pause = operator.progress(job.id).batches
    paused_at = operator.events(job.id)
    pause_event = next(e for e in paused_at if e.to_state == "paused")
    assert (pause_event.actor, pause_event.reason) == ("alice", "maintenance window")
    # At most the batch in flight committed after the pause.
    late = scalar(dsn, "SELECT count(*) FROM backfill.batches WHERE finished_at > %s",
                  (pause_event.at,))
    assert late <= 1
    assert operator.progress(job.id).batches == batches_at_pause
    tuned = [e for e in paused_at if e.kind == "tuned"]
    assert tuned[0].details == {"changes": {"batch_size": [100, 400],
                                            "max_batch_size": [100, 400]}}
    # Resume and cancel mid-way: cancel is final, and nothing commits after it.
    operator.resume(job.id)
    t, result = _run_in_thread(runner_bf, job.id)
    wait_for(lambda: operator.progress(job.id).batches >= batches_at_pause + 2, what="progress")
    operator.cancel(job.id, reason="wrong column")
    t.join(timeout=30)
    assert result["job"].state == JobState.CANCELLED
    done = operator.progress(job.id).rows_scanned
    assert 0 < done < 20_000
    hist = counter_histogram(dsn)
    assert hist.get(1) == done
    assert set(hist) <= {0, 1}
    with pytest.raises(IllegalTransition, match="cancelled"):
        operator.resume(job.id)


def test_throttled_job_waits_without_a_transaction_and_continues(dsn: str) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100,
                            pause="10ms"))
    ticks: list[Tick] = []
    t, result = _run_in_thread(bf, job.id, on_tick=ticks.append)
    wait_for(lambda: bf.progress(job.id).batches >= 2, what="2 batches")
    conn = connect(dsn)
    store.transition(conn, job.id, JobState.THROTTLED, actor="controller",
                     reason="replica lag 12s > 5s")
    wait_for(lambda: any(tk.state == JobState.THROTTLED for tk in ticks), what="throttled tick")
    held = bf.progress(job.id).batches
    # While throttled the runner holds no transaction open.
    assert not scalar(dsn, """SELECT count(*) FROM pg_stat_activity
                              WHERE application_name LIKE 'backfill job%%'
                                AND state LIKE 'idle in transaction%%'""")
    wait_for(lambda: [tk for tk in ticks if tk.state == JobState.THROTTLED][2:], what="3 polls")
    assert bf.progress(job.id).batches == held
    store.transition(conn, job.id, JobState.RUNNING, actor="controller", reason="lag 0.2s")
    conn.close()
    t.join(timeout=60)
    assert result["job"].state == JobState.SUCCEEDED
    assert counter_histogram(dsn) == {1: 5_000}
    note = next(tk.note for tk in ticks if tk.state == JobState.THROTTLED)
    assert note == "replica lag 12s > 5s"


def test_a_second_runner_is_refused_while_the_first_is_alive(dsn: str) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100,
                            pause="10ms"))
    t, result = _run_in_thread(bf, job.id)
    wait_for(lambda: bf.progress(job.id).batches >= 1, what="a batch")
    with pytest.raises(JobConflict, match="under runner:"):
        Runner(dsn, job.id, actor="second", owner="runner:otherhost:1").run()
    bf.pause(job.id)
    t.join(timeout=30)
    assert result["job"].state == JobState.PAUSED


def _start_cli_run(dsn: str, job_id: int) -> Any:
    return cli_popen(dsn, "run", str(job_id), "--no-progress")


def test_ctrl_c_pauses_with_checkpoint_and_run_resumes(dsn: str) -> None:
    make_counter_table(dsn, 50_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=200, min_batch_size=200, max_batch_size=200,
                            pause="5ms"))
    proc = _start_cli_run(dsn, job.id)
    try:
        wait_for(lambda: bf.progress(job.id).batches >= 5, timeout=60, what="5 batches")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    paused = bf.get(job.id)
    assert paused.state == JobState.PAUSED
    assert "Ctrl-C" in (paused.state_reason or "")
    done = bf.progress(job.id).rows_scanned
    assert 0 < done < 50_000
    assert counter_histogram(dsn) == {0: 50_000 - done, 1: done}
    again = cli(dsn, "run", str(job.id), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert counter_histogram(dsn) == {1: 50_000}
    transitions = [(e.from_state, e.to_state) for e in bf.events(job.id) if e.kind == "transition"]
    assert transitions == [("pending", "running"), ("running", "paused"), ("paused", "pending"),
                           ("pending", "running"), ("running", "succeeded")]


def test_sigkill_mid_run_then_run_takes_over_and_finishes_exactly_once(dsn: str) -> None:
    make_counter_table(dsn, 50_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=200, min_batch_size=200, max_batch_size=200))
    kill_run_after(dsn, job.id, 10)
    assert bf.get(job.id).state == JobState.RUNNING  # nobody said otherwise: the owner just died
    again = cli(dsn, "run", str(job.id), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert counter_histogram(dsn) == {1: 50_000}
    takeovers = _events(bf, job.id, "takeover")
    assert len(takeovers) == 1
    assert "gone" in (takeovers[0].reason or "")


def test_database_restart_mid_run_is_retried_without_loss(dsn: str, pg_server: Any) -> None:
    if pg_server is None:
        pytest.skip("needs the test session's own server to restart it")
    make_counter_table(dsn, 30_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=200, min_batch_size=200, max_batch_size=200,
                            pause="5ms"))
    proc = _start_cli_run(dsn, job.id)
    try:
        wait_for(lambda: bf.progress(job.id).batches >= 5, timeout=60, what="5 batches")
        pg_server.restart(mode="fast")
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert counter_histogram(dsn) == {1: 30_000}
    retries = _events(bf, job.id, "retry")
    assert retries, "the restart should have cost at least one retry"
    assert bf.get(job.id).state == JobState.SUCCEEDED


def test_rate_limit_caps_rows_per_second(dsn: str) -> None:
    import time

    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100,
                            rate=2_000))
    started = time.monotonic()
    assert bf.run(job.id).state == JobState.SUCCEEDED
    # 1000 rows at 2000 rows/s: at least 9 waits of ~50 ms (no wait after the last batch).
    assert time.monotonic() - started >= 0.4


def test_a_low_rate_gives_small_frequent_batches_and_holds(dsn: str) -> None:
    """--rate 200 on 600 rows with the default sizes: before, one 600-row batch ran at once
    (the cap counted only from the second batch on); now batches of at most
    rate * target duration = 100 rows, spread over the 3 s the cap allows."""
    import time

    make_counter_table(dsn, 600)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, rate=200, min_batch_size=500))
    started = time.monotonic()
    assert bf.run(job.id, skip_preflight=True).state == JobState.SUCCEEDED
    elapsed = time.monotonic() - started
    sizes = [int(r[0]) for r in psycopg.connect(dsn, autocommit=True).execute(
        "SELECT rows_scanned FROM backfill.batches WHERE job_id = %s ORDER BY id",
        (job.id,)).fetchall()]
    assert max(sizes) <= 100, sizes
    assert sum(sizes) == 600
    # Every batch but the last is followed by its wait: 500 rows' worth at 200 rows/s.
    assert elapsed >= 500 / 200 * 0.95, elapsed
    assert counter_histogram(dsn) == {1: 600}


def test_a_rate_cap_holds_across_the_slices_of_an_inline_run(dsn: str) -> None:
    """Inline, a job's slices run one after another as one chain of batches: the wait after
    a slice's last batch is owed before the next slice's first. Was: skipped, so --rate 400 on
    6 one-batch slices (--parallelism 6) ran unpaced, 1,200 rows in a fraction of a second."""
    make_counter_table(dsn, 1_200)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, rate=400, parallelism=6))
    started = time.monotonic()
    assert bf.run(job.id, skip_preflight=True).state == JobState.SUCCEEDED
    elapsed = time.monotonic() - started
    assert scalar(dsn, "SELECT count(*) FROM backfill.slices WHERE job_id = %s",
                  (job.id,)) == 6
    # 1,200 rows at 400 rows/s, no wait after the last batch: at least 1,000 rows' worth.
    assert elapsed >= 1_000 / 400 * 0.95, elapsed
    assert counter_histogram(dsn) == {1: 1_200}


def test_batch_stats_are_pruned(dsn: str) -> None:
    make_counter_table(dsn, 1_500)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=10, min_batch_size=10, max_batch_size=10))
    assert bf.run(job.id).state == JobState.SUCCEEDED
    conn = connect(dsn)
    assert checkpoints.prune_batches(conn, job.id, keep=100) == 50
    assert scalar(dsn, "SELECT count(*) FROM backfill.batches") == 100
    assert bf.progress(job.id).batches == 150  # totals live in the slices
    conn.close()


def test_events_are_append_only(dsn: str) -> None:
    make_counter_table(dsn, 10)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC))
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            c.execute("UPDATE backfill.events SET actor = 'mallory'")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            c.execute("DELETE FROM backfill.events WHERE job_id = %s", (job.id,))


def test_schema_upgrade_is_idempotent_and_safe_concurrently(bare_dsn: str) -> None:
    results: list[Any] = []

    def up() -> None:
        try:
            results.append(Backfill(bare_dsn).upgrade())
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=up) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert all(isinstance(r, tuple) for r in results), results
    from backfill.state.schema import LATEST, MIGRATIONS

    assert sorted(r[0] for r in results) == [0, LATEST, LATEST, LATEST]
    assert scalar(bare_dsn, "SELECT count(*) FROM backfill.schema_version") == len(MIGRATIONS)


def test_jobs_enqueued_before_the_upgrade_still_conflict_with_new_ones(bare_dsn: str) -> None:
    """Schema version 9 names tables by oid in conflict keys: the keys of jobs stored under
    version 8 (schema.table(cols)) are rewritten, so an old active job still refuses a new
    one on the same table and columns; an old copy gets its destination's oid."""
    from backfill.state.schema import MIGRATIONS

    with psycopg.connect(bare_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items (id bigint PRIMARY KEY, val int, counter int)")
        c.execute("CREATE TABLE items_copy (id bigint PRIMARY KEY, val int, counter int)")
        c.execute("CREATE SCHEMA backfill")
        c.execute("CREATE TABLE backfill.schema_version (version integer PRIMARY KEY, "
                  "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for m in MIGRATIONS:
            if m.version <= 8:
                c.execute(m.sql.encode())
                c.execute("INSERT INTO backfill.schema_version (version, description) "
                          "VALUES (%s, %s)", (m.version, m.description))
        oid = scalar(bare_dsn, "SELECT 'items'::regclass::oid")
        for name, kind, key in (("old update", "update", "public.items(counter)"),
                                ("old copy", "copy", "public.items_copy(*)")):
            c.execute(
                """INSERT INTO backfill.jobs (name, kind, source_schema, source_table, source_oid,
                       key_columns, key_types, spec, options, conflict_key, created_by)
                   VALUES (%s, %s, 'public', 'items', %s, '{id}', '{bigint}', '{}', '{}', %s,
                           'old version')""", (name, kind, oid, key))
    bf = Backfill(bare_dsn)
    bf.upgrade()
    keys = dict(psycopg.connect(bare_dsn, autocommit=True).execute(
        "SELECT name, conflict_key FROM backfill.jobs").fetchall())
    copy_oid = scalar(bare_dsn, "SELECT 'items_copy'::regclass::oid")
    assert keys == {"old update": f'[["oid:{oid}",["counter"]]]',
                    "old copy": f'[["oid:{copy_oid}",null]]'}
    assert scalar(bare_dsn, "SELECT dest_oid FROM backfill.jobs WHERE name = 'old copy'") \
        == copy_oid
    with pytest.raises(JobConflict, match="old update"):
        bf.enqueue(update("items", INC))
    with pytest.raises(JobConflict, match="old copy"):
        bf.enqueue(update("items_copy", {"val": "1"}))
    assert bf.enqueue(update("items", {"val": "val"})).state == JobState.PENDING


def test_refusals_found_in_review(dsn: str) -> None:
    from backfill import InvalidInput, move, sql_job

    make_counter_table(dsn, 100)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE items_archive (LIKE items INCLUDING ALL)")
    bf = Backfill(dsn)
    with pytest.raises(InvalidInput, match="skipped would still be deleted"):
        bf.enqueue(move("items", "items_archive", on_conflict="nothing"))
    with pytest.raises(InvalidInput, match="batch bounds"):
        bf.enqueue(sql_job("items", "UPDATE items SET counter = counter + 1"))
    with pytest.raises(InvalidInput, match="key column 'id'"):
        bf.enqueue(update("items", {"id": "id + 1000"}))
    # A move also writes its source: an update on the source conflicts with it.
    mover = bf.enqueue(move("items", "items_archive", where="val > 90"))
    with pytest.raises(JobConflict, match=f"job {mover.id}"):
        bf.enqueue(update("items", {"note": "'x'"}))
    assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 1


def test_retry_refuses_to_revive_a_job_that_now_conflicts(dsn: str) -> None:
    make_counter_table(dsn, 100)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE items ADD CONSTRAINT never CHECK (counter < 1)")
    bf = Backfill(dsn)
    first = bf.enqueue(update("items", {"counter": "counter + 1"}))
    assert bf.run(first.id).state == JobState.FAILED
    second = bf.enqueue(update("items", {"counter": "counter + 2", "note": "'b'"}))
    with pytest.raises(JobConflict, match=f"job {second.id}"):
        bf.retry(first.id)
    assert bf.get(first.id).state == JobState.FAILED


def test_recreated_table_is_refused_not_resumed(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100))
    stop = threading.Event()
    ticks: list[Tick] = []

    def on_tick(t: Tick) -> None:
        ticks.append(t)
        if len(ticks) == 3:
            stop.set()

    assert bf.run(job.id, stop=stop, on_tick=on_tick).state == JobState.PAUSED
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE items")
    make_counter_table(dsn, 1_000)
    with pytest.raises(InvalidInput, match="dropped and recreated"):
        bf.run(job.id)
    assert counter_histogram(dsn) == {0: 1_000}


def test_a_job_throttled_at_its_last_batch_still_succeeds(dsn: str) -> None:
    make_counter_table(dsn, 300)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100))
    conn = connect(dsn)
    throttled: list[bool] = []

    def on_tick(t: Tick) -> None:
        if t.rows_scanned == 300 and not throttled:  # the last batch has just committed
            store.transition(conn, job.id, JobState.THROTTLED, actor="controller",
                             reason="lag")
            throttled.append(True)

    assert bf.run(job.id, on_tick=on_tick).state == JobState.SUCCEEDED
    conn.close()
    assert counter_histogram(dsn) == {1: 300}
    assert [(e.from_state, e.to_state) for e in bf.events(job.id)][-1] == ("throttled", "succeeded")


def test_ctrl_c_while_retrying_pauses_instead_of_failing(dsn: str) -> None:
    make_counter_table(dsn, 400)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", INC, batch_size=100, min_batch_size=100, max_batch_size=100,
                            lock_timeout="20ms", max_retries=1000))
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT * FROM items WHERE id = 150 FOR UPDATE")
    stop = threading.Event()
    t, result = _run_in_thread(bf, job.id, stop=stop)
    try:
        wait_for(lambda: scalar(dsn, """SELECT count(*) FROM pg_stat_activity
                                        WHERE wait_event_type = 'Lock'"""), what="a lock wait")
        stop.set()
        t.join(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
    assert not t.is_alive()
    assert result["job"].state == JobState.PAUSED
    assert counter_histogram(dsn) == {0: 300, 1: 100}


def test_an_application_session_blocked_by_a_batch_shrinks_the_next_one(dsn: str) -> None:
    """The lock-wait budget, collected for real: an application UPDATE of a row the batch
    has locked waits for its COMMIT; the batch sees it (pg_blocking_pids, just before
    COMMIT) and the sizer makes the next batch smaller. Without a blocked session, no cut."""
    make_counter_table(dsn, 400)
    with psycopg.connect(dsn, autocommit=True) as c:   # 3 ms a row: a 100-row batch ~300 ms
        c.execute("CREATE FUNCTION slow_plus(int) RETURNS int VOLATILE LANGUAGE sql AS "
                  "'SELECT $1 + 1 FROM pg_sleep(0.003)'")
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"counter": "slow_plus(counter)"}, batch_size=100,
                            max_batch_size=100, target_duration="10s",
                            lock_wait_budget="50ms", undo_log=False))
    conn = sliced_and_running(dsn, job.id)
    prepared = prepare(conn, store.get_job(conn, job.id).spec, explain=False)
    options = prepared.spec.options
    codec = KeyCodec(prepared.key_types)
    upper = codec.decode(leases.slices(conn, job.id)[0].upper_bound)
    assert upper is not None
    lease = leases.acquire_lease(conn, job.id, 0, "test", 60, actor="test")
    assert lease is not None
    sizer = BatchSizer(size=100)
    seen: list[LockWaits | None] = []

    def next_size(rows: int, ms: float, waits: LockWaits | None) -> int:
        seen.append(waits)
        return sizer.observe(rows, ms, options, waits)

    def batch(cursor: Any) -> Any:
        return run_batch(conn, prepared, job_id=job.id, slice_no=0, cursor=cursor,
                         slice_upper=upper, size=sizer.size, options=options, codec=codec,
                         next_size=next_size, lease_token=lease.token)

    first = batch(None)   # nobody waits: the size stays
    assert seen[-1] == LockWaits(0, 0.0)
    assert sizer.size == 100
    app = psycopg.connect(dsn, autocommit=True)
    blocked = threading.Thread(target=lambda: (time.sleep(0.1), app.execute(
        "UPDATE items SET note = 'app' WHERE id = 101")))   # the first row of the 2nd batch
    blocked.start()
    batch(first.upper)
    blocked.join(10)
    app.close()
    waits = seen[-1]
    assert waits is not None
    assert waits.sessions == 1
    assert 100 <= waits.max_wait_ms <= 1000, waits   # ~200 ms: from 0.1 s to the COMMIT
    assert sizer.size < 100
    assert scalar(dsn, "SELECT note FROM items WHERE id = 101") == "app"
    conn.close()
