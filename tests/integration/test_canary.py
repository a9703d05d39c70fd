"""Progressive rollout: a canary runs, is verified, and the job waits in awaiting_approval
until an operator (or a quiet period) approves the rest."""

from __future__ import annotations

import dataclasses
import threading

import psycopg
import pytest

from backfill import Backfill, update
from backfill.core.errors import IllegalTransition, InvalidInput
from backfill.engine.reaper import reap
from backfill.engine.runner import Runner
from backfill.job.spec import JobSpec
from backfill.job.states import JobState
from backfill.state import checkpoints, store
from tests.integration.helpers import cli, counter_histogram, make_counter_table, scalar, wait_for

pytestmark = pytest.mark.timeout(180)

FILL = {"note": "'n' || id"}   # idempotent: verify can re-check it


def test_canary_stops_for_approval_then_the_rest_runs(dsn: str) -> None:
    make_counter_table(dsn, 20_000)
    bf = Backfill(dsn)
    r = cli(dsn, "enqueue", "-t", "items", "--set", "note = 'n' || id", "--canary", "2000",
            "--batch-size", "500", "-q")
    assert r.returncode == 0, r.stderr
    job_id = int(r.stdout.strip())
    with pytest.raises(IllegalTransition, match="nothing to approve"):
        bf.approve(job_id)
    r = cli(dsn, "run", str(job_id), "--no-progress")
    assert r.returncode == 3, r.stderr
    assert "ran its canary and waits for approval" in r.stderr
    job = bf.get(job_id)
    assert job.state == JobState.AWAITING_APPROVAL
    done = bf.progress(job_id).rows_scanned
    assert 2_000 <= done < 2_000 + 2_000      # the batch that crossed it, at most
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == done
    # run again does not go past the gate
    r = cli(dsn, "run", str(job_id), "--no-progress")
    assert r.returncode == 3
    assert bf.progress(job_id).rows_scanned == done
    shown = cli(dsn, "show", str(job_id)).stdout
    assert f"canary {done:,} rows at" in shown
    assert "verified; the other ~" in shown
    assert "rows projected at" in shown
    kinds = [e.kind for e in bf.events(job_id)]
    assert "canary_verified" in kinds
    r = cli(dsn, "approve", str(job_id))
    assert r.returncode == 0, r.stderr
    assert bf.get(job_id).approved_by == "tester"
    r = cli(dsn, "run", str(job_id), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NULL") == 0
    approvals = [e for e in bf.events(job_id) if e.to_state == "pending"
                 and e.from_state == "awaiting_approval"]
    assert len(approvals) == 1
    assert approvals[0].actor == "tester"


def test_a_canary_that_does_not_verify_fails_the_job(dsn: str) -> None:
    make_counter_table(dsn, 10_000)
    bf = Backfill(dsn)
    # counter + 1 is never "true" on re-check: verify reports every row.
    job = bf.enqueue(
        _with_canary(update("items", {"counter": "counter + 1"}, batch_size=500), "1000"))
    done = bf.run(job.id)
    assert done.state == JobState.FAILED
    assert "canary verification failed" in (done.state_reason or "")
    assert counter_histogram(dsn)[1] < 2_000    # the rest never ran


def test_auto_approval_after_a_quiet_period(dsn: str) -> None:
    make_counter_table(dsn, 8_000)
    bf = Backfill(dsn)
    job = bf.enqueue(_with_canary(update("items", FILL, batch_size=400), "800",
                                  auto_ms=300))
    done = bf.run(job.id)
    assert done.state == JobState.SUCCEEDED
    approval = [e for e in bf.events(job.id) if e.from_state == "awaiting_approval"]
    assert approval[0].actor == "auto-approve"


def test_auto_approval_is_withheld_after_a_retry(dsn: str) -> None:
    make_counter_table(dsn, 8_000)
    bf = Backfill(dsn)
    job = bf.enqueue(_with_canary(update("items", FILL, batch_size=400, lock_timeout="100ms"),
                                  "2000", auto_ms=200))
    holder = psycopg.connect(dsn)
    holder.execute("SELECT * FROM items WHERE id = 1000 FOR UPDATE")

    def release() -> None:
        # Release the row once the runner waited for it and timed out (a retry, then).
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        wait_for(lambda: scalar(dsn, waiting), timeout=30, interval=0.01,
                 what="the runner waiting for the locked row")
        wait_for(lambda: not scalar(dsn, waiting), timeout=30, interval=0.01,
                 what="its lock timeout")
        holder.rollback()

    t = threading.Thread(target=release, daemon=True)
    t.start()
    try:
        done = bf.run(job.id)
    finally:
        t.join(timeout=30)
        holder.close()
    assert done.state == JobState.AWAITING_APPROVAL
    assert any(e.kind == "auto_approve_withheld" for e in bf.events(job.id))


def test_the_workers_reaper_auto_approves(dsn: str) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(_with_canary(update("items", FILL, batch_size=500), "500", auto_ms=100))
    # The runner alone (Backfill.run would wait out the quiet period itself).
    assert Runner(dsn, job.id, actor="tester").run().state == JobState.AWAITING_APPROVAL
    with psycopg.connect(dsn, autocommit=True) as c:   # as if it had run on the workers
        c.execute("UPDATE backfill.jobs SET runs_on = 'workers' WHERE id = %s", (job.id,))
    # A reaper pass approves it first, then starts it on the workers (no broker: nothing sent).
    wait_for(lambda: (reap(dsn, actor="reaper:test", send=lambda claims: None, gate=None),
                      bf.get(job.id).state != JobState.AWAITING_APPROVAL)[1], timeout=20,
             interval=0.2, what="auto-approval by the reaper")
    approval = [e for e in bf.events(job.id) if e.from_state == "awaiting_approval"]
    assert approval[0].actor == "auto-approve"
    assert approval[0].to_state == JobState.PENDING


@pytest.mark.parametrize(("args", "message"), [
    (["--canary", "50000"], "is not smaller than the table"),
    (["--canary", "100%"], "less than 100%"),
    (["--canary", "lots"], "expected rows (5000) or a percent (2%)"),
    (["--auto-approve-after", "5m"], "auto_approve_after needs a canary"),
])
def test_bad_canary_options_are_refused(dsn: str, args: list[str], message: str) -> None:
    make_counter_table(dsn, 1_000)
    r = cli(dsn, "enqueue", "-t", "items", "--set", "note = 'x'", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 0


def test_a_percent_canary_is_sized_from_the_table(dsn: str) -> None:
    make_counter_table(dsn, 10_000)
    bf = Backfill(dsn)
    job = bf.enqueue(_with_canary(update("items", FILL), "5%"))
    assert job.canary_rows == 500
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE fresh (id bigint PRIMARY KEY, note text)")
    with pytest.raises(InvalidInput, match=r"needs public\.fresh's size"):
        bf.enqueue(_with_canary(update("fresh", FILL), "5%"))


def _with_canary(spec: JobSpec, canary: str, auto_ms: float | None = None) -> JobSpec:
    return dataclasses.replace(spec, canary=canary, auto_approve_after_ms=auto_ms)


def test_a_canary_with_a_volatile_set_is_not_failed_by_its_recheck(dsn: str) -> None:
    make_counter_table(dsn, 4_000)
    bf = Backfill(dsn)
    job = bf.enqueue(_with_canary(update("items", {"note": "md5(random()::text)"},
                                         batch_size=300), "600"))
    done = bf.run(job.id)
    assert done.state == JobState.AWAITING_APPROVAL
    assert bf.progress(job.id).rows_scanned == 600      # the last batch stops at the canary
    assert "not re-checkable" in (bf.canary(job.id) or {}).get("verify_detail", "")
    assert bf.approve(job.id).state == JobState.PENDING


def test_a_canary_rate_counts_only_the_time_it_ran(dsn: str) -> None:
    """A pause in the middle of the canary is no part of its rows/s (nor of the projection)."""
    make_counter_table(dsn, 20_000)
    bf = Backfill(dsn)
    job = bf.enqueue(dataclasses.replace(
        update("items", FILL, batch_size=200, min_batch_size=200, max_batch_size=200),
        canary="2000"))
    stop = threading.Event()
    ticks: list[object] = []

    def on_tick(t: object) -> None:
        ticks.append(t)
        if len(ticks) == 3:
            stop.set()

    assert bf.run(job.id, stop=stop, on_tick=on_tick, skip_preflight=True).state == "paused"
    paused_at = scalar(dsn, "SELECT clock_timestamp()")
    wait_for(lambda: scalar(dsn, "SELECT clock_timestamp() - %s > interval '3 seconds'",
                            (paused_at,)), timeout=10, what="a 3 s pause")
    assert bf.run(job.id).state == JobState.AWAITING_APPROVAL
    with psycopg.connect(dsn) as c:
        report = checkpoints.canary_report(c, job.id)
    assert report is not None
    assert 0 < report["canary_seconds"] < 3.0, report
    assert report["canary_rows_per_s"] > report["canary_rows"] / 3.0


def test_a_canary_rate_leaves_out_throttled_and_failed_stretches(dsn: str) -> None:
    """Was: after a failure and its retry, a 3 s rest was projected at 4m38s. A throttle by
    the controller (3 s) and a failure left 3 s before its retry are no part of the canary's
    seconds, as a pause is not (above)."""
    make_counter_table(dsn, 20_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE fail_switch (on_id bigint)")
        c.execute("INSERT INTO fail_switch VALUES (1001)")
        c.execute("""CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                       IF EXISTS (SELECT FROM fail_switch WHERE on_id = NEW.id) THEN
                         RAISE EXCEPTION 'switched off';
                       END IF;
                       RETURN NEW;
                     END $$""")
        c.execute("CREATE TRIGGER boom BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION boom()")
    bf = Backfill(dsn)
    job = bf.enqueue(dataclasses.replace(
        update("items", FILL, batch_size=200, min_batch_size=200, max_batch_size=200,
               rate=1000, max_retries=0), canary="4000"))
    assert bf.run(job.id, skip_preflight=True).state == JobState.FAILED   # at row 1,001
    failed_at = scalar(dsn, "SELECT clock_timestamp()")
    wait_for(lambda: scalar(dsn, "SELECT clock_timestamp() - %s > interval '3 seconds'",
                            (failed_at,)), timeout=10, what="3 s failed")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM fail_switch")
    bf.retry(job.id)

    def throttle_for_3_s() -> None:
        wait_for(lambda: bf.progress(job.id).rows_scanned >= 1_200, timeout=30,
                 what="a batch after the retry")
        with psycopg.connect(dsn, autocommit=True) as c:
            store.transition(c, job.id, JobState.THROTTLED, actor="controller:test",
                             reason="test throttle", expect=frozenset({JobState.RUNNING}))
            throttled_at = scalar(dsn, "SELECT clock_timestamp()")
            wait_for(lambda: scalar(dsn, "SELECT clock_timestamp() - %s > interval '3 seconds'",
                                    (throttled_at,)), timeout=10, what="3 s throttled")
            store.transition(c, job.id, JobState.RUNNING, actor="controller:test",
                             reason="test resume", expect=frozenset({JobState.THROTTLED}))

    throttler = threading.Thread(target=throttle_for_3_s, daemon=True)
    throttler.start()
    assert bf.run(job.id, skip_preflight=True).state == JobState.AWAITING_APPROVAL
    throttler.join(timeout=30)
    assert not throttler.is_alive()
    kinds = [(e.from_state, e.to_state) for e in bf.events(job.id) if e.kind == "transition"]
    assert ("running", "throttled") in kinds
    assert ("throttled", "running") in kinds
    with psycopg.connect(dsn) as c:
        report = checkpoints.canary_report(c, job.id)
    assert report is not None
    # 4,000 rows at 1,000 rows/s: about 4 s of running (the throttle lands in a 2.8 s window
    # of it); 6 s more were throttled or failed, which a rate over every stretch would count.
    assert 0 < report["canary_seconds"] < 7.0, report
    assert report["canary_rows_per_s"] > 4_000 / 9.0
