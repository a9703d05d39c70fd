"""The catch-up against a real MariaDB binlog: writes during and after the copy (inserts,
updates, key-changing updates, deletes) end with equal tables; lag; refusals."""

from __future__ import annotations

import threading

import psycopg
import pytest

from backfill.core.errors import InvalidInput
from backfill.mysql import schema
from backfill.mysql.binlog import SourceSchemaChanged, catch_up, measure_lag
from backfill.mysql.copy import copy_table, read_state
from backfill.mysql.errors import SourceNotReady
from backfill.mysql.schema import CastOptions
from backfill.mysql.source import MySQLSource, connect
from tests.integration.helpers import wait_for
from tests.integration.mysqlhelpers import mysql_cli, mysql_cli_popen, mysql_exec, mysql_rows

pytest_plugins = ["tests.integration.mysqlserver"]

COLUMNS = "id, tenant, name, bal, at, tags"


def create_acct(mariadb, db, rows):
    mysql_exec(mariadb, db, """
        CREATE TABLE acct (id int NOT NULL AUTO_INCREMENT, tenant int NOT NULL,
          name varchar(40) NOT NULL, bal decimal(14,2), at datetime(6), tags set('a','b','c'),
          PRIMARY KEY (id), KEY (tenant))""", f"""
        INSERT INTO acct (tenant, name, bal, at, tags)
        SELECT seq % 5, concat('n', seq), seq * 1.25, '2024-01-01' + INTERVAL seq SECOND,
               IF(seq % 3 = 0, 'a,c', '')
        FROM seq_1_to_{rows}""")


def setup(mariadb, db, dest, rows=3000):
    create_acct(mariadb, db, rows)
    source = MySQLSource.parse(mariadb.dsn(db))
    conn = connect(source, raw=False)
    try:
        plan, = schema.convert(conn, db, ["acct"], CastOptions())
    finally:
        conn.close()
    with psycopg.connect(dest, autocommit=True) as pg:
        schema.create_tables(pg, [plan])
    return source, plan


def source_rows(mariadb, db):
    return [(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else
             sorted(m for m in r[5].split(",") if m))
            for r in mysql_rows(mariadb, db, f"SELECT {COLUMNS} FROM acct ORDER BY id")]


def dest_rows(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        return [(*r[:5], None if r[5] is None else sorted(r[5])) for r in
                c.execute(f"SELECT {COLUMNS} FROM acct ORDER BY id").fetchall()]


def write_some(mariadb, db, i):
    """One round of every kind of change, in a few transactions."""
    mysql_exec(
        mariadb, db,
        f"INSERT INTO acct (tenant, name, bal, at, tags) VALUES ({i % 5}, 'new{i}', {i}.5, "
        f"'2025-06-01 12:00:00.{i % 1000000:06d}', 'b')",
        f"UPDATE acct SET bal = bal + 1, name = concat(name, '+') WHERE id = {1 + (i * 37) % 2500}",
        f"UPDATE acct SET id = id + 100000 WHERE id = {2 + (i * 53) % 2500}",   # key change
        f"DELETE FROM acct WHERE id = {3 + (i * 71) % 2500}",
        "START TRANSACTION",
        f"UPDATE acct SET tags = 'a,b,c' WHERE tenant = {i % 5} AND id < 40",
        f"DELETE FROM acct WHERE name = 'new{i - 3}'",
        "COMMIT",
    )


def test_changes_during_and_after_the_copy_are_caught_up(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn)
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        pg.execute("SELECT 1")
    with pytest.raises(InvalidInput, match="no copy recorded a binlog position"):
        # no checkpoint yet
        catch_up(source, bare_dsn, [plan])

    copied = threading.Event()
    errors: list[BaseException] = []

    def run_copy() -> None:
        try:
            copy_table(source, bare_dsn, plan, batch_size=100, pause=0.01)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            copied.set()

    t = threading.Thread(target=run_copy)
    t.start()
    i = 0
    while not copied.is_set() and i < 400:       # writes during the copy
        write_some(mariadb, mysql_db, i)
        i += 1
    t.join(timeout=120)
    assert not errors, errors
    assert i >= 3, "the copy ended before the writes began: make it slower"
    for _ in range(20):                           # and after it
        write_some(mariadb, mysql_db, i)
        i += 1

    lag = measure_lag(source, bare_dsn, [plan])
    assert lag.events > 0
    res = catch_up(source, bare_dsn, [plan], batch_events=500)
    assert res.events >= lag.events
    assert res.rows_written < res.events          # coalesced per key
    assert dest_rows(bare_dsn) == source_rows(mariadb, mysql_db)
    assert measure_lag(source, bare_dsn, [plan]).events == 0

    # Again, from the committed position: more writes, nothing replayed twice.
    for _ in range(10):
        write_some(mariadb, mysql_db, i)
        i += 1
    res2 = catch_up(source, bare_dsn, [plan])
    assert 0 < res2.events < res.events
    assert dest_rows(bare_dsn) == source_rows(mariadb, mysql_db)
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        state = read_state(pg, plan)
    assert state.events_applied == res.events + res2.events
    assert state.applied_event_at is not None


def test_follow_mode_keeps_up_until_stopped(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn, rows=500)
    copy_table(source, bare_dsn, plan)
    stop = threading.Event()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(catch_up(
        source, bare_dsn, [plan], follow=True, stop=stop.is_set, batch_seconds=0.2)))
    t.start()
    try:
        for i in range(30):
            write_some(mariadb, mysql_db, i)
        want = source_rows(mariadb, mysql_db)
        wait_for(lambda: dest_rows(bare_dsn) == want, timeout=30, what="the follower")
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive()
    assert result


def test_ddl_on_the_source_stops_the_catch_up(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn, rows=10)
    copy_table(source, bare_dsn, plan)
    mysql_exec(mariadb, mysql_db, "ALTER TABLE acct ADD COLUMN extra int")
    with pytest.raises(SourceSchemaChanged, match="ALTER TABLE acct"):
        catch_up(source, bare_dsn, [plan])


@pytest.mark.parametrize("ddl", ["/* gh-ost */ ALTER TABLE acct ADD COLUMN extra int",
                                 "USE information_schema",
                                 ])
def test_ddl_behind_a_comment_or_from_another_database_stops_the_catch_up(
        ddl, mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn, rows=10)
    copy_table(source, bare_dsn, plan)
    if ddl.startswith("USE"):   # the session's default database is not the source's
        mysql_exec(mariadb, mysql_db, ddl, f"ALTER TABLE `{mysql_db}`.acct ADD COLUMN extra int")
    else:
        mysql_exec(mariadb, mysql_db, ddl)
    with pytest.raises(SourceSchemaChanged, match="ALTER TABLE"):
        catch_up(source, bare_dsn, [plan])


def test_statement_binlog_is_refused(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn, rows=10)
    copy_table(source, bare_dsn, plan)
    mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'MIXED'")
    try:
        with pytest.raises(SourceNotReady, match="MIXED, not ROW"):
            catch_up(source, bare_dsn, [plan])
    finally:
        mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'ROW'")


def test_kill_mid_catch_up_then_resume(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn, rows=2000)
    copy_table(source, bare_dsn, plan)
    for i in range(300):                   # 300 transactions, ~2000 row changes
        write_some(mariadb, mysql_db, i)
    src = mariadb.dsn(mysql_db)

    def applied() -> int:
        with psycopg.connect(bare_dsn, autocommit=True) as pg:
            return read_state(pg, plan).events_applied
    proc = mysql_cli_popen(bare_dsn, "mysql", "catch-up", "--source", src, "--tables", "acct",
                           "--batch-events", "20", "--follow")
    try:
        wait_for(lambda: applied() >= 200, timeout=60, what="some catch-up batches")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = mysql_cli(bare_dsn, "mysql", "catch-up", "--source", src, "--tables", "acct")
    assert res.returncode == 0, res.stderr
    assert dest_rows(bare_dsn) == source_rows(mariadb, mysql_db)
    assert measure_lag(source, bare_dsn, [plan]).events == 0


def test_tables_copied_at_different_times_catch_up_together(mariadb, mysql_db, bare_dsn):
    """Each table replays from its own snapshot: the one copied later skips the changes its
    copy already saw, the other applies them."""
    source, acct = setup(mariadb, mysql_db, bare_dsn, rows=200)
    mysql_exec(mariadb, mysql_db, "CREATE TABLE log (id int PRIMARY KEY, msg text)",
               "INSERT INTO log SELECT seq, concat('m', seq) FROM seq_1_to_50")
    conn = connect(source, raw=False)
    try:
        log, = schema.convert(conn, mysql_db, ["log"], CastOptions())
    finally:
        conn.close()
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        schema.create_tables(pg, [log])
    copy_table(source, bare_dsn, acct)
    for i in range(5):                      # acct needs these replayed; log's copy sees them
        write_some(mariadb, mysql_db, i)
        mysql_exec(mariadb, mysql_db, f"UPDATE log SET msg = concat(msg, '!') WHERE id = {i + 1}",
                   f"INSERT INTO log VALUES ({100 + i}, 'new')")
    copy_table(source, bare_dsn, log)
    mysql_exec(mariadb, mysql_db, "DELETE FROM log WHERE id = 2", "UPDATE log SET id = 1000 "
               "WHERE id = 3")
    res = catch_up(source, bare_dsn, [acct, log])
    assert dest_rows(bare_dsn) == source_rows(mariadb, mysql_db)
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        got = pg.execute("SELECT id, msg FROM log ORDER BY id").fetchall()
        states = {p.name: read_state(pg, p) for p in (acct, log)}
    assert got == [tuple(r) for r in mysql_rows(mariadb, mysql_db,
                                               "SELECT id, msg FROM log ORDER BY id")]
    assert states["log"].events_applied == 2        # only what came after its own snapshot
    assert states["acct"].applied == states["log"].applied == res.position
