"""Exactly once across a restart of either server: the copy and the catch-up reconnect and
continue from the committed checkpoint, and the tables end equal (verified)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from backfill.mysql import schema
from backfill.mysql.binlog import catch_up
from backfill.mysql.copy import copy_table, read_state
from backfill.mysql.schema import CastOptions
from backfill.mysql.source import MySQLSource, connect
from backfill.mysql.verify import verify_table
from tests.integration.helpers import wait_for
from tests.integration.mysqlhelpers import mysql_exec

pytest_plugins = ["tests.integration.mysqlserver"]

ROWS = 20_000


def setup(mariadb, db, dest):
    mysql_exec(mariadb, db, """
        CREATE TABLE r (id int NOT NULL PRIMARY KEY, v varchar(20) NOT NULL, n decimal(9,3))""",
               f"INSERT INTO r SELECT seq, concat('v', seq), seq / 8 FROM seq_1_to_{ROWS}")
    source = MySQLSource.parse(mariadb.dsn(db))
    conn = connect(source, raw=False)
    try:
        plan, = schema.convert(conn, db, ["r"], CastOptions())
    finally:
        conn.close()
    with psycopg.connect(dest, autocommit=True) as pg:
        schema.create_tables(pg, [plan])
    return source, plan


def copied(dest, plan):
    with psycopg.connect(dest, autocommit=True) as pg:
        state = read_state(pg, plan)
    return state.rows_copied if state else 0


def in_thread(fn):
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


@pytest.mark.parametrize("which", ["mariadb", "postgres"])
def test_copy_survives_a_server_restart(which, mariadb, mysql_db, bare_dsn, pg_server):
    if which == "postgres" and pg_server is None:
        pytest.skip("an external PostgreSQL (BACKFILL_TEST_DSN) is not ours to restart")
    source, plan = setup(mariadb, mysql_db, bare_dsn)
    t, errors = in_thread(lambda: copy_table(source, bare_dsn, plan, batch_size=200,
                                             pause=0.01, retry_for=60))
    wait_for(lambda: copied(bare_dsn, plan) >= 2000, timeout=60, what="some batches")
    if which == "mariadb":
        mariadb.restart()
    else:
        # A fast stop: it breaks every connection mid-batch as a crash does, but the shared
        # test server runs with synchronous_commit off, so a crash (immediate) could also
        # forget the last commits, which no client can keep.
        pg_server.restart(mode="fast")
    t.join(timeout=120)
    assert not t.is_alive()
    assert not errors, errors
    report = verify_table(source, bare_dsn, plan)
    assert report.ok, report.mismatched[:1]
    assert report.dest_rows == ROWS


def test_catch_up_survives_a_source_restart(mariadb, mysql_db, bare_dsn):
    source, plan = setup(mariadb, mysql_db, bare_dsn)
    copy_table(source, bare_dsn, plan)
    stop = threading.Event()
    t, errors = in_thread(lambda: catch_up(source, bare_dsn, [plan], follow=True,
                                           stop=stop.is_set, batch_seconds=0.2, retry_for=60))
    try:
        mysql_exec(mariadb, mysql_db, "UPDATE r SET v = 'before' WHERE id <= 100")
        mariadb.restart()
        mysql_exec(mariadb, mysql_db, "UPDATE r SET v = 'after' WHERE id > 19900",
                   "DELETE FROM r WHERE id BETWEEN 500 AND 599",
                   "UPDATE r SET id = id + 100000 WHERE id BETWEEN 1000 AND 1009")

        def equal() -> bool:
            assert not errors, errors
            return verify_table(source, bare_dsn, plan).ok
        wait_for(equal, timeout=60, interval=0.5, what="the follower to catch up")
    finally:
        stop.set()
        t.join(timeout=60)
    assert not errors, errors
