"""The copy job as the online path (issue 18): a MySQL copy job records the binlog position
before its first batch, `backfill mysql catch-up` follows the job's copy once the job has
succeeded (and refuses before), `backfill show JOB` reports the catch-up's lag; against a
real MariaDB written to during the copy, and a real PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
import time

import psycopg
import pytest

from backfill import Backfill, JobState
from backfill.mysql.copy import read_job_state
from tests.integration.helpers import cli, cli_popen, kill_run_after, scalar, wait_for
from tests.integration.mysqlhelpers import mysql_exec, mysql_rows
from tests.integration.test_mysql_binlog import create_acct, dest_rows, source_rows, write_some

pytest_plugins = ["tests.integration.mysqlserver"]
pytestmark = pytest.mark.timeout(300)


def make_acct(mariadb, db, dsn, rows):
    create_acct(mariadb, db, rows)
    res = cli(dsn, "convert-schema", "--source", mariadb.dsn(db), "--tables", "acct", "--apply")
    assert res.returncode == 0, res.stderr


def enqueue_acct(mariadb, db, dsn, *extra):
    res = cli(dsn, "enqueue", "--kind", "copy", "--source", mariadb.dsn(db), "-t", "acct",
              "--dest", "acct", "-q", *extra)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


class Writer:
    """Writes every kind of change (inserts, updates, key-changing updates, deletes) on the
    source in a thread until stopped."""

    def __init__(self, mariadb, db, start=0):
        self.mariadb, self.db, self.i = mariadb, db, start
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            while not self.stop.is_set():
                write_some(self.mariadb, self.db, self.i)
                self.i += 1
        except BaseException as exc:   # surfaced by close()
            self.errors.append(exc)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def show_json(dsn, job):
    res = cli(dsn, "show", str(job), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def catch_up_cli(dsn, mariadb, db, *extra):
    return cli(dsn, "mysql", "catch-up", "--source", mariadb.dsn(db), "--tables", "acct",
               *extra)


def test_a_copy_job_written_during_its_run_is_caught_up(mariadb, mysql_db, dsn):
    make_acct(mariadb, mysql_db, dsn, rows=8000)
    job = enqueue_acct(mariadb, mysql_db, dsn, "--batch-size", "100", "--max-batch-size", "100",
                       "--pause", "20ms")
    assert show_json(dsn, job)["catch_up"]["state"] == "not started"
    res = catch_up_cli(dsn, mariadb, mysql_db)
    assert res.returncode == 2
    assert "no copy recorded a binlog position" in res.stderr

    bf = Backfill(dsn)
    with Writer(mariadb, mysql_db) as writer:
        proc = cli_popen(dsn, "run", str(job), "--no-progress")
        try:
            wait_for(lambda: bf.progress(job).batches >= 3, timeout=60, what="some batches")
            # The position is recorded before the first batch, with the range's snapshot.
            with psycopg.connect(dsn, autocommit=True) as pg:
                found = read_job_state(pg, job)
            assert found is not None
            assert found[:2] == ("public", "acct")
            assert found[2].job_state == "running"
            assert not found[2].copy_done
            res = catch_up_cli(dsn, mariadb, mysql_db)
            assert res.returncode == 2
            assert f"copy job {job} is running" in res.stderr
            assert show_json(dsn, job)["catch_up"]["state"] == "waiting for the copy"
            _, stderr = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr
        assert writer.i >= 3, "the copy ended before the writes began: make it slower"
    assert bf.get(job).state == JobState.SUCCEEDED
    assert dest_rows(dsn) != source_rows(mariadb, mysql_db)   # the copy alone misses writes

    shown = show_json(dsn, job)["catch_up"]
    assert shown["state"] == "catch-up not run", shown
    assert shown["lag_events"] > 0
    assert shown["lag_seconds"] >= 0
    assert shown["binlog_start"] == shown["binlog_applied"]
    text = cli(dsn, "show", str(job))
    assert text.returncode == 0, text.stderr
    assert "catch-up  catch-up not run; lag" in text.stdout

    res = catch_up_cli(dsn, mariadb, mysql_db, "--batch-events", "200")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["events"] >= shown["lag_events"]
    assert dest_rows(dsn) == source_rows(mariadb, mysql_db)
    shown = show_json(dsn, job)["catch_up"]
    assert shown["state"] == "caught up", shown
    assert shown["lag_events"] == 0
    assert shown["events_applied"] > 0
    res = cli(dsn, "mysql", "verify", "--source", mariadb.dsn(mysql_db), "--tables", "acct")
    assert res.returncode == 0, res.stdout + res.stderr

    # The standalone copy does not take over the job's table.
    res = cli(dsn, "mysql", "copy", "--source", mariadb.dsn(mysql_db), "--tables", "acct")
    assert res.returncode == 2
    assert f"copied by job {job}" in res.stderr


def test_a_killed_copy_job_run_again_then_followed_ends_equal(mariadb, mysql_db, dsn):
    make_acct(mariadb, mysql_db, dsn, rows=6000)
    job = enqueue_acct(mariadb, mysql_db, dsn, "--batch-size", "100", "--max-batch-size", "100",
                       "--pause", "20ms")
    with Writer(mariadb, mysql_db) as writer:
        kill_run_after(dsn, job, 5)
        with psycopg.connect(dsn, autocommit=True) as pg:
            start = read_job_state(pg, job)[2].start
        killed_at = writer.i
        wait_for(lambda: writer.i > killed_at + 3, timeout=30, what="writes between the runs")
        res = cli(dsn, "run", str(job), "--no-progress", timeout=240)
        assert res.returncode == 0, res.stderr
    with psycopg.connect(dsn, autocommit=True) as pg:
        assert read_job_state(pg, job)[2].start == start   # recorded once, at the first start
    assert Backfill(dsn).get(job).state == JobState.SUCCEEDED

    # --follow applies the backlog and new writes, until stopped.
    proc = cli_popen(dsn, "mysql", "catch-up", "--source", mariadb.dsn(mysql_db), "--tables",
                     "acct", "--follow", "--batch-events", "100")
    try:
        for i in range(10):
            write_some(mariadb, mysql_db, writer.i + i)
        want = source_rows(mariadb, mysql_db)
        wait_for(lambda: dest_rows(dsn) == want, timeout=60, what="the follower")
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except Exception:
            proc.kill()
            raise
    res = catch_up_cli(dsn, mariadb, mysql_db)
    assert res.returncode == 0, res.stderr
    assert dest_rows(dsn) == source_rows(mariadb, mysql_db)
    assert scalar(dsn, "SELECT count(*) FROM acct") == len(source_rows(mariadb, mysql_db))

    # The rest of the runbook on the job's table: show, gate, cutover (writes stopped).
    src = mariadb.dsn(mysql_db)
    res = cli(dsn, "mysql", "show", "--source", src, "--tables", "acct")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["job"] == job
    assert row["state"] == "caught up"
    res = cli(dsn, "mysql", "gate", "--source", src, "--tables", "acct", "--hold", "1s",
              "--timeout", "30s")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli(dsn, "mysql", "cutover", "--source", src, "--tables", "acct")
    assert res.returncode == 0, res.stdout + res.stderr
    auto = mysql_rows(mariadb, mysql_db, "SELECT auto_increment FROM information_schema.tables "
                      f"WHERE table_schema = '{mysql_db}' AND table_name = 'acct'")[0][0]
    assert json.loads(res.stdout)["sequences"]["acct.id"] >= auto


def test_show_stays_fast_when_the_source_hangs(mariadb, mysql_db, dsn):
    make_acct(mariadb, mysql_db, dsn, rows=50)
    job = enqueue_acct(mariadb, mysql_db, dsn)
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    # A server that accepts connections and never answers stands in for the source.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        hung = mariadb.dsn(mysql_db).replace(f":{mariadb.port}/", f":{port}/")
        with psycopg.connect(dsn, autocommit=True) as pg:
            pg.execute("UPDATE backfill.jobs SET spec = jsonb_set(spec, '{source_dsn}', "
                       "to_jsonb(%s::text)) WHERE id = %s", (hung, job))
        t0 = time.monotonic()
        shown = show_json(dsn, job)["catch_up"]
        assert time.monotonic() - t0 < 12   # 5 s for the lag at most, and the process
        assert shown["state"] == "unknown", shown
        assert shown["reason"]
        assert shown["binlog_start"]          # what the job store knows still shows
        text = cli(dsn, "show", str(job))
        assert text.returncode == 0, text.stderr
        assert "catch-up  unknown" in text.stdout
        assert "Traceback" not in text.stdout + text.stderr
    finally:
        silent.close()


def test_an_older_checkpoint_table_gains_the_job_column(mariadb, mysql_db, dsn):
    """A checkpoint table created before jobs recorded positions (no job_id) is upgraded at
    a job's first start, its `mysql copy` rows kept."""
    from backfill.mysql.copy import _CREATE_CHECKPOINT

    old = _CREATE_CHECKPOINT.as_string(None).replace(
        "    job_id bigint,                        -- the copy job whose copy this is "
        "(NULL: mysql copy)\n", "")
    assert "job_id" not in old
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(old)
        pg.execute("INSERT INTO backfill_mysql_checkpoint (dest_schema, dest_table, source, "
                   "key_columns, copy_done, start_file, start_pos, applied_file, applied_pos)"
                   " VALUES ('public', 'other', 'x.other', '{id}', true, 'b.1', 4, 'b.1', 4)")
    make_acct(mariadb, mysql_db, dsn, rows=20)
    job = enqueue_acct(mariadb, mysql_db, dsn)
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    with psycopg.connect(dsn, autocommit=True) as pg:
        assert read_job_state(pg, job)[:2] == ("public", "acct")
        assert pg.execute("SELECT job_id FROM backfill_mysql_checkpoint WHERE dest_table = "
                          "'other'").fetchone() == (None,)
    assert show_json(dsn, job)["catch_up"]["state"] == "caught up"


def test_a_source_without_a_row_binlog_copies_offline_with_a_warning(mariadb, mysql_db, dsn):
    make_acct(mariadb, mysql_db, dsn, rows=20)
    job = enqueue_acct(mariadb, mysql_db, dsn)
    mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'MIXED'")
    try:
        res = cli(dsn, "run", str(job), "--no-progress")
    finally:
        mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'ROW'")
    assert res.returncode == 0, res.stderr
    assert Backfill(dsn).get(job).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM acct") == 20
    shown = show_json(dsn, job)
    assert shown["catch_up"]["state"] == "not recorded"
    assert any(e["kind"] == "warning" and "MIXED, not ROW" in (e["reason"] or "")
               for e in shown["events"])
    res = catch_up_cli(dsn, mariadb, mysql_db)
    assert res.returncode == 2
    assert "no copy recorded a binlog position" in res.stderr


def test_a_new_copy_job_takes_the_position_over_only_into_an_emptied_table(
        mariadb, mysql_db, dsn):
    make_acct(mariadb, mysql_db, dsn, rows=30)
    first = enqueue_acct(mariadb, mysql_db, dsn)
    assert cli(dsn, "run", str(first), "--no-progress").returncode == 0
    with psycopg.connect(dsn, autocommit=True) as pg:
        start = read_job_state(pg, first)[2].start
    write_some(mariadb, mysql_db, 1)

    again = enqueue_acct(mariadb, mysql_db, dsn)      # the first copy's rows are still there
    res = cli(dsn, "run", str(again), "--no-progress")
    assert res.returncode != 0                        # its COPY collides with them
    shown = show_json(dsn, again)
    assert shown["catch_up"]["state"] == "not recorded"
    assert any("empty the table before copying it again" in (e["reason"] or "")
               for e in shown["events"])
    with psycopg.connect(dsn, autocommit=True) as pg:
        assert read_job_state(pg, first)[2].start == start    # the first job's stands
    assert cli(dsn, "cancel", str(again)).returncode == 0

    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("TRUNCATE acct")
    third = enqueue_acct(mariadb, mysql_db, dsn)
    assert cli(dsn, "run", str(third), "--no-progress").returncode == 0
    with psycopg.connect(dsn, autocommit=True) as pg:
        assert read_job_state(pg, first) is None
        assert read_job_state(pg, third)[2].start > start
    write_some(mariadb, mysql_db, 2)
    res = catch_up_cli(dsn, mariadb, mysql_db)
    assert res.returncode == 0, res.stderr
    assert dest_rows(dsn) == source_rows(mariadb, mysql_db)
