"""Reversible backfills: the undo log is written with each batch, and `revert` restores the
table exactly, leaving rows the application changed since alone unless forced."""

from __future__ import annotations

import dataclasses
import datetime as dt

import psycopg
import pytest
from psycopg import sql

from backfill import Backfill, delete, transform, update
from backfill.core.errors import IllegalTransition, InvalidInput
from backfill.job.states import JobState
from tests.integration.helpers import cli, kill_run_after, scalar

pytestmark = pytest.mark.timeout(180)

CHECKSUM = "SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM {} t"


def _accounts(dsn: str, rows: int = 20_000) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     balance numeric(12, 2), note text, tags text[], seen timestamptz,
                     doubled numeric GENERATED ALWAYS AS (balance * 2) STORED)""")
        c.execute("""INSERT INTO accounts (balance, note, tags, seen)
                     SELECT g * 1.25, CASE WHEN g %% 7 = 0 THEN NULL ELSE 'n' || g END,
                            ARRAY['a', g::text], timestamptz '2024-01-01' + g * interval '1 min'
                     FROM generate_series(1, %s) g""", (rows,))


def _sum(dsn: str, table: str = "accounts") -> str:
    return str(scalar(dsn, CHECKSUM.format(table)))


def test_update_then_revert_restores_the_table_exactly(dsn: str) -> None:
    _accounts(dsn)
    before = _sum(dsn)
    bf = Backfill(dsn)
    job = bf.run(update("accounts", {"balance": "balance * 3", "note": "upper(note)",
                                     "seen": "NULL"}, batch_size=700))
    assert job.state == JobState.SUCCEEDED
    assert _sum(dsn) != before
    assert scalar(dsn, f"SELECT count(*) FROM backfill.undo_{job.id}") == 20_000
    # Append-only: no insert-triggered autovacuum competes with the job for it.
    assert scalar(dsn, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                  (f"backfill.undo_{job.id}",)) == ["autovacuum_enabled=false"]
    revert = bf.revert(job.id)
    assert bf.run(revert.id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before
    assert bf.verify(revert.id).ok


def test_rows_changed_since_are_left_alone_and_counted_unless_forced(dsn: str) -> None:
    _accounts(dsn, 5_000)
    before = _sum(dsn)
    bf = Backfill(dsn)
    job = bf.run(update("accounts", {"note": "'job'"}, batch_size=500))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE accounts SET note = 'app' WHERE id IN (10, 20, 30)")
    r = cli(dsn, "revert", str(job.id), "--no-progress")
    assert r.returncode == 0, r.stderr
    revert = bf.list(include_finished=True)[0]
    assert revert.kind == "revert"
    prog = bf.progress(revert.id)
    assert prog.rows_scanned - prog.rows_affected == 3
    shown = cli(dsn, "show", str(revert.id))
    assert "3 changed since and left alone" in shown.stdout
    assert scalar(dsn, "SELECT count(*) FROM accounts WHERE note = 'app'") == 3
    assert scalar(dsn, "SELECT count(*) FROM accounts WHERE note = 'job'") == 0
    forced = bf.revert(job.id, force=True)
    assert bf.run(forced.id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before


def test_delete_then_revert_puts_the_rows_back(dsn: str) -> None:
    _accounts(dsn, 8_000)
    before = _sum(dsn)
    bf = Backfill(dsn)
    job = bf.run(delete("accounts", "id % 3 = 0 OR note IS NULL", batch_size=300))
    gone = 8_000 - scalar(dsn, "SELECT count(*) FROM accounts")
    assert gone > 2_600
    assert scalar(dsn, f"SELECT count(*) FROM backfill.undo_{job.id}") == gone
    assert bf.run(bf.revert(job.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before   # identity values, arrays, timestamps, generated column


def test_transform_then_revert(dsn: str) -> None:
    from jobs.examples import normalise_phone

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE people (id int PRIMARY KEY, phone text, other text)")
        c.execute("""INSERT INTO people SELECT g, CASE WHEN g % 2 = 0 THEN '555 010 '
                     || lpad(g::text, 4, '0') ELSE 'n/a' END, 'x' FROM generate_series(1, 600) g""")
    before = _sum(dsn, "people")
    bf = Backfill(dsn)
    job = bf.run(transform("people", normalise_phone, columns=["phone"], batch_size=100))
    assert _sum(dsn, "people") != before
    assert scalar(dsn, f"SELECT count(*) FROM backfill.undo_{job.id}") == 300
    assert bf.run(bf.revert(job.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn, "people") == before


def test_a_killed_run_logs_every_batch_exactly_once(dsn: str) -> None:
    """The undo rows commit with the batch and its checkpoint: after a SIGKILL and a resume,
    the log holds each changed row once, and the revert is exact."""
    _accounts(dsn, 40_000)
    before = _sum(dsn)
    bf = Backfill(dsn)
    job = bf.enqueue(update("accounts", {"balance": "balance + 1"}, batch_size=200,
                            min_batch_size=200, max_batch_size=200))
    kill_run_after(dsn, job.id, 20)
    r = cli(dsn, "run", str(job.id), "--no-progress", "--takeover-after", "1")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, f"SELECT count(*) FROM backfill.undo_{job.id}") == 40_000
    assert bf.run(bf.revert(job.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before


def test_refusals_and_pruning(dsn: str) -> None:
    _accounts(dsn, 1_000)
    bf = Backfill(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE copies (LIKE accounts)")
    from backfill import copy
    copied = bf.run(copy("accounts", "copies", columns=["id", "balance"]))
    with pytest.raises(InvalidInput, match="copy jobs keep no undo log"):
        bf.revert(copied.id)
    plain = bf.run(update("accounts", {"note": "'x'"}))
    assert plain.state == JobState.SUCCEEDED
    no_log = bf.enqueue(update("accounts", {"note": "'y'"}, undo_log=False)).id
    r = cli(dsn, "enqueue", "-t", "accounts", "--set", "seen = NULL", "--no-undo-log", "-q")
    assert r.returncode == 0, r.stderr
    for job_id in (no_log, int(r.stdout.strip())):
        assert scalar(dsn, f"SELECT to_regclass('backfill.undo_{job_id}')") is None
        r = cli(dsn, "revert", str(job_id))
        assert r.returncode == 2
        assert "enqueued with undo_log off" in r.stderr
        bf.cancel(job_id)
    r = cli(dsn, "revert", "9999")
    assert r.returncode == 2
    assert "no job with id" in r.stderr
    pending = bf.enqueue(update("accounts", {"balance": "0"}))
    with pytest.raises(InvalidInput, match="is pending: cancel it"):
        bf.revert(pending.id)
    bf.cancel(pending.id)
    # Pruning: only logs of jobs that ended longer ago than the retention.
    r = cli(dsn, "undo-log", "prune", "--older-than", "1h")
    assert r.returncode == 0
    assert "no undo log older than 1h" in r.stdout
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE backfill.jobs SET finished_at = now() - interval '8 days' "
                  "WHERE id = %s", (plain.id,))
    r = cli(dsn, "undo-log", "prune")
    assert r.returncode == 0, r.stderr
    assert f"backfill.undo_{plain.id}" in r.stdout
    assert scalar(dsn, f"SELECT to_regclass('backfill.undo_{plain.id}')") is None
    assert scalar(dsn, f"SELECT to_regclass('backfill.undo_{pending.id}')") is not None
    assert scalar(dsn, "SELECT count(*) FROM backfill.events WHERE kind = 'undo_pruned' "
                       "AND job_id = %s", (plain.id,)) == 1
    with pytest.raises(InvalidInput, match="was pruned"):
        bf.revert(plain.id)


def test_revert_compares_stored_bytes_and_handles_types_without_equality(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE docs (id int PRIMARY KEY, body json, pos point, iv interval)")
        c.execute("""INSERT INTO docs SELECT g, json_build_object('g', g), point(g, g),
                     interval '1 mon' FROM generate_series(1, 300) g""")
    before = _sum(dsn, "docs")
    bf = Backfill(dsn)
    job = bf.run(update("docs", {"body": "json_build_object('new', id)", "pos": "point(0, 0)",
                                 "iv": "interval '2 mon'"}, batch_size=100))
    assert job.state == JobState.SUCCEEDED
    with psycopg.connect(dsn, autocommit=True) as c:
        # An "equal" value written by the application since: 60 days = 2 mon for =, not *=.
        c.execute("UPDATE docs SET iv = interval '60 days' WHERE id = 7")
    revert = bf.run(bf.revert(job.id).id)
    assert revert.state == JobState.SUCCEEDED
    prog = bf.progress(revert.id)
    assert prog.rows_scanned - prog.rows_affected == 1
    assert scalar(dsn, "SELECT iv::text FROM docs WHERE id = 7") == "60 days"
    assert bf.verify(revert.id).ok
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE docs SET iv = interval '1 mon', body = json_build_object('g', 7), "
                  "pos = point(7, 7) WHERE id = 7")
    assert _sum(dsn, "docs") == before


def bump(row: dict[str, object]) -> dict[str, object]:
    """A transform writing jsonb and interval values (the undo log must keep them exact)."""
    return {"meta": {"seen": row["id"]}, "iv": dt.timedelta(days=30)}


def test_transform_undo_is_exact_for_jsonb_and_interval(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE things (id int PRIMARY KEY, meta jsonb, iv interval)")
        c.execute("""INSERT INTO things SELECT g, jsonb_build_object('g', g), interval '1 mon'
                     FROM generate_series(1, 200) g""")
    before = _sum(dsn, "things")
    bf = Backfill(dsn)
    job = bf.run(transform("things", "tests.integration.test_undo:bump",
                           columns=["id", "meta", "iv"], writes=["meta", "iv"], batch_size=50))
    assert job.state == JobState.SUCCEEDED, job.last_error
    assert scalar(dsn, "SELECT count(*) FROM backfill.undo_%s" % job.id) == 200  # noqa: UP031
    assert scalar(dsn, f"SELECT \"old:iv\"::text FROM backfill.undo_{job.id} WHERE id = 1") \
        == "1 mon"
    assert bf.run(bf.revert(job.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn, "things") == before


def test_reverting_a_failed_job_cancels_it(dsn: str) -> None:
    _accounts(dsn, 2_000)
    bf = Backfill(dsn)
    job = bf.run(update("accounts", {"balance": "CASE WHEN id = 1600 THEN 1 / (id - 1600) "
                                                "ELSE 0 END"},
                        batch_size=500, max_retries=0))
    assert job.state == JobState.FAILED
    bf.run(bf.revert(job.id).id)
    assert bf.get(job.id).state == JobState.CANCELLED
    with pytest.raises(IllegalTransition):
        bf.retry(job.id)


def _has_primary_key(dsn: str, job_id: int) -> bool:
    return bool(scalar(dsn, "SELECT EXISTS (SELECT FROM pg_index WHERE indrelid = "
                            "to_regclass(%s) AND indisprimary)", (f"backfill.undo_{job_id}",)))


def test_the_undo_log_is_keyed_when_a_revert_starts_not_while_the_job_writes(dsn: str) -> None:
    """Update and delete jobs append to an unindexed log (cheaper batches); the revert adds
    the primary key in its own start and restores exactly. A log that already has one (written
    before this change) reverts too."""
    _accounts(dsn, 6_000)
    before = _sum(dsn)
    bf = Backfill(dsn)
    job = bf.run(update("accounts", {"balance": "balance * 3", "note": "upper(note)"},
                        batch_size=700))
    assert job.state == JobState.SUCCEEDED
    assert not _has_primary_key(dsn, job.id)
    revert = bf.revert(job.id)
    assert _has_primary_key(dsn, job.id)
    assert bf.run(revert.id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before
    assert bf.verify(revert.id).ok
    # An old-style log, keyed from the start: the revert leaves its key alone.
    again = bf.run(update("accounts", {"note": "'x'"}, batch_size=1000))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"ALTER TABLE backfill.undo_{again.id} ADD PRIMARY KEY (id)")
    assert bf.run(bf.revert(again.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before
    gone = bf.run(delete("accounts", where="id % 3 = 0", batch_size=1000))
    assert not _has_primary_key(dsn, gone.id)
    assert bf.run(bf.revert(gone.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn) == before


def test_returning_old_logs_the_same_undo_rows_as_the_two_pass_statement(dsn: str) -> None:
    """PostgreSQL 18 logs an update in one pass (``RETURNING OLD``); older servers read the
    rows first. Both write the same undo rows (on 18 both statements are run and compared;
    on older servers the one-pass one must not be chosen)."""
    from backfill.engine.prepare import prepare_stored
    from backfill.state import store

    _accounts(dsn, 3_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("accounts", {"balance": "balance * 3", "note": "upper(note)",
                                         "tags": "tags || 'z'::text"}, where="id % 5 <> 0"))
    with psycopg.connect(dsn, autocommit=True) as c:
        prepared = prepare_stored(c, store.get_job(c, job.id), explain=False)
        version = c.info.server_version
        one_pass = 'RETURNING new."id"' in prepared.write_statement(lower=True).as_string(c)
        assert one_pass == (version >= 180000)
        assert prepared.optimistic_log == (version < 180000)
        if version < 180000:
            return
        old_style = dataclasses.replace(prepared, server_version=0)
        read_all = old_style._update_logged(old_style._assignments(),
                                            old_style.keyset.predicate(lower=True),
                                            optimistic=True)
        logs = []
        for stmt in (prepared.write_statement(lower=True), read_all):
            with c.transaction(force_rollback=True):
                c.execute(stmt, {"lo0": 100, "hi0": 2_600})
                logs.append(c.execute(f"SELECT u::text FROM backfill.undo_{job.id} u "
                                      "ORDER BY id").fetchall())
    assert len(logs[0]) == 2_000
    assert logs[0] == logs[1]


@pytest.mark.parametrize(("column", "row", "app_set", "logged", "final"), [
    # A filled column: every old value is read, and the row version must still match.
    ("note", 5, "note = 'app'", "(app,APP)", "APP"),     # a value: its row version changed
    ("note", 7, "note = 'app'", "(app,APP)", "APP"),     # NULL, then a value
    ("note", 14, "balance = 1", "(,-)", "-"),            # stays NULL, a newer version
    # A new column, all NULL: the batch is filled without reading the old values.
    ("memo", 5, "memo = 'app'", "(app,APP)", "APP"),     # no longer NULL: redone, locking
    ("memo", 13, "balance = 1", "(,N13)", "N13"),        # stays NULL: updated as it is now
])
def test_a_row_updated_between_the_read_and_the_write_is_logged_with_its_newest_value(
        dsn: str, column: str, row: int, app_set: str, logged: str, final: str) -> None:
    """Before PostgreSQL 18 the logged update reads the old values without locking (or,
    when the batch's written columns are all NULL, does not read them); a row another
    session updates in between is caught (its row version changed, or it holds a value
    now) and the batch is redone locking its rows: the undo log holds the value the job
    overwrote, not the one it first read."""
    import threading
    import time

    from backfill.engine.prepare import prepare_stored
    from backfill.state import store

    _accounts(dsn, 100)   # note is NULL where id % 7 = 0
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE accounts ADD COLUMN memo text")
    bf = Backfill(dsn)
    job = bf.enqueue(update("accounts", {column: f"upper(coalesce({column}, note, '-'))"}))
    with psycopg.connect(dsn, autocommit=True) as c, \
            psycopg.connect(dsn, autocommit=True) as app:
        prepared = prepare_stored(c, store.get_job(c, job.id), explain=False)
        if c.info.server_version >= 180000:
            prepared = dataclasses.replace(prepared, server_version=170000)
        assert prepared.optimistic_log
        app.execute("BEGIN")
        app.execute(f"UPDATE accounts SET {app_set} WHERE id = {row}")
        threading.Thread(target=lambda: (time.sleep(0.3), app.execute("COMMIT"))).start()
        with c.transaction():
            rows = prepared.write_batch(c, None, (20,), None)
        undo = dict(c.execute(f'SELECT id, ROW("old:{column}", "new:{column}")::text '
                              f"FROM backfill.undo_{job.id}").fetchall())
    assert rows == 20
    assert len(undo) == 20
    assert undo[row] == logged
    assert undo[6] == ("(n6,N6)" if column == "note" else "(,N6)")
    if row != 14:
        assert undo[14] == "(,-)"
    assert scalar(dsn, f"SELECT {column} FROM accounts WHERE id = {row}") == final


def test_before_18_each_logging_statement_writes_the_same_undo_rows(dsn: str) -> None:
    """Before PostgreSQL 18 a logged update runs one of three statements: the batch filled
    without reading its old values when its written columns are all NULL (tried first),
    every row's old values read and joined back (when the batch holds values), or the
    rows locked first (after a concurrent change). Where each applies, they log the same
    rows and leave the same table; the first changes nothing in a batch holding values."""
    from backfill.engine.prepare import prepare_stored
    from backfill.state import store

    _accounts(dsn, 20_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE accounts ADD COLUMN score bigint, ADD COLUMN labels text[]")
        c.execute("UPDATE accounts SET score = -id WHERE id % 4 = 0")
        c.execute("UPDATE accounts SET labels = ARRAY['x', NULL] WHERE id % 6 = 0")
        c.execute("VACUUM ANALYZE accounts")
    bf = Backfill(dsn)
    job = bf.enqueue(update("accounts", {"score": "balance::bigint", "labels": "tags"},
                            where="id % 5 <> 0"))
    clear = "UPDATE accounts SET score = NULL, labels = NULL WHERE id > 1000 AND id <= 4000"
    with psycopg.connect(dsn, autocommit=True) as c:
        prepared = prepare_stored(c, store.get_job(c, job.id), explain=False)
        prepared = dataclasses.replace(prepared, server_version=170000)
        pred = prepared.keyset.predicate(lower=True)
        a = prepared._assignments()
        statements = {"fill": prepared.write_statement(lower=True),
                      "read all": prepared._update_logged(a, pred, optimistic=True),
                      "locking": prepared._update_logged(a, pred)}
        assert "num_nulls" in statements["fill"].as_string(c)
        params = {"lo0": 1_000, "hi0": 4_000}
        for held in (True, False):    # the batch as loaded (a third filled), or all NULL
            results = {}
            for name, stmt in statements.items():
                with c.transaction(force_rollback=True):
                    if not held:
                        c.execute(clear)
                    start = c.execute(CHECKSUM.format("accounts")).fetchone()
                    cur = c.execute(stmt, params)
                    counts = cur.fetchone() if name != "locking" else (cur.rowcount,)
                    results[name] = (
                        counts[-1],
                        c.execute(f"SELECT u::text FROM backfill.undo_{job.id} u ORDER BY id"
                                  ).fetchall(),
                        c.execute(CHECKSUM.format("accounts")).fetchone())
                    if name == "fill":   # of 3,000 keys: 1 in 5 skipped, a third filled
                        assert counts == ((2_400, 800, 0) if held else (2_400, 0, 2_400))
                        if held:
                            assert results[name] == (0, [], start)   # nothing changed
                    if name == "read all":
                        assert counts == (2_400, 800 if held else 0, 2_400)
            assert results["read all"][0] == 2_400
            assert results["read all"] == results["locking"]
            if held:
                assert results["read all"][1][:4] == [  # id, old/new score, old/new labels
                    ('(1001,,,1251,"{a,1001}")',), ('(1002,,"{x,NULL}",1253,"{a,1002}")',),
                    ('(1003,,,1254,"{a,1003}")',), ('(1004,-1004,,1255,"{a,1004}")',)]
            else:
                assert results["fill"] == results["read all"]

    # write_batch tries the fill while the batch before held no values (or it is the
    # first); a batch holding values runs the read-all statement, at once after the fill
    # changed nothing or, after such a batch, instead of it.
    class Recording(psycopg.Cursor):  # type: ignore[type-arg]
        def execute(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
            text = query.as_string(self) if isinstance(query, sql.Composable) else query
            ran.append("fill" if '"t:fill"' in text else "read all" if '"t:xmin"' in text
                       else "locking" if "FOR NO KEY UPDATE" in text else text)
            return super().execute(query, params, **kw)

    ran: list[str] = []
    with psycopg.connect(dsn, autocommit=True, cursor_factory=Recording) as c:
        for lo, hi, statements_run, held_after in [
                (4_000, 4_300, ["fill", "read all"], 80),
                (2_000, 2_300, ["read all"], 0),          # cleared: all NULL
                (2_300, 2_600, ["fill"], 0),
                (4_300, 4_600, ["fill", "read all"], 80)]:
            with c.transaction(force_rollback=True):
                c.execute(clear)
                ran.clear()
                prepared.write_batch(c, (lo,), (hi,), None)
            assert ran[0] == "SAVEPOINT backfill_logged"
            assert ran[1:] == statements_run, (lo, ran)
            assert prepared._held == [held_after]


@pytest.mark.parametrize("ddl", [
    # Named like the statement's CTEs before: "table name specified more than once" (and a
    # table named "fill" read by the SET expression was the CTE there).
    "CREATE TABLE prev (id int PRIMARY KEY, v int)",
    # ctids repeat across partitions: a row version is (partition, ctid).
    "CREATE TABLE prev (id int PRIMARY KEY, v int) PARTITION BY HASH (id); "
    "CREATE TABLE prev_0 PARTITION OF prev FOR VALUES WITH (MODULUS 3, REMAINDER 0); "
    "CREATE TABLE prev_1 PARTITION OF prev FOR VALUES WITH (MODULUS 3, REMAINDER 1); "
    "CREATE TABLE prev_2 PARTITION OF prev FOR VALUES WITH (MODULUS 3, REMAINDER 2)",
])
def test_every_logging_statement_updates_and_logs_exactly_the_batchs_rows(
        dsn: str, ddl: str) -> None:
    """Each logged update (before 18: fill, read all, locking; on 18 also RETURNING OLD)
    changes and logs exactly the batch's rows, on a table named like the statement's parts
    and on a partitioned one, where row versions of different partitions share ctids; a
    run and its revert restore the table."""
    from backfill.engine.prepare import prepare_stored
    from backfill.state import store

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(ddl)
        c.execute("INSERT INTO prev SELECT g, CASE WHEN g % 2 = 0 THEN g END "
                  "FROM generate_series(1, 600) g")
        c.execute("CREATE TABLE fill (id int)")   # empty, and read by the SET expression
    bf = Backfill(dsn)
    before = _sum(dsn, "prev")
    job = bf.enqueue(update("prev", {"v": "coalesce(v, 0) + 1 + (SELECT count(*) FROM fill)"},
                            batch_size=100))
    with psycopg.connect(dsn, autocommit=True) as c:
        prepared = dataclasses.replace(
            prepare_stored(c, store.get_job(c, job.id), explain=False), server_version=170000)
        pred = prepared.keyset.predicate(lower=True)
        a = prepared._assignments()
        for name, stmt, clear in [("fill", prepared.write_statement(lower=True), True),
                                  ("read all", prepared._update_logged(a, pred, optimistic=True),
                                   False),
                                  ("locking", prepared._update_logged(a, pred), False)]:
            with c.transaction(force_rollback=True):
                if clear:   # the fill applies to a batch whose written column is all NULL
                    c.execute("UPDATE prev SET v = NULL WHERE id > 100 AND id <= 400")
                was = dict(c.execute("SELECT id, v FROM prev").fetchall())
                c.execute(stmt, {"lo0": 100, "hi0": 400})
                now = dict(c.execute("SELECT id, v FROM prev").fetchall())
                undo = c.execute(f'SELECT id, "old:v", "new:v" FROM backfill.undo_{job.id}'
                                 ).fetchall()
            changed = sorted(k for k in now if now[k] != was[k])
            assert changed == list(range(101, 401)), name
            assert sorted(undo) == [(k, was[k], (was[k] or 0) + 1)
                                    for k in range(101, 401)], name
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert scalar(dsn, "SELECT count(*) FROM prev "
                       "WHERE v = CASE WHEN id % 2 = 0 THEN id + 1 ELSE 1 END") == 600
    assert bf.run(bf.revert(job.id).id).state == JobState.SUCCEEDED
    assert _sum(dsn, "prev") == before
