"""The copy against a real MariaDB and a real PostgreSQL: exact values, a SIGKILL mid-copy
and a resume that ends with exactly the source rows, refused values, bad sources."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import psycopg
import pytest

from backfill.core.errors import DatabaseUnavailable, TableNotFound
from backfill.mysql import schema
from backfill.mysql.copy import copy_table, read_state
from backfill.mysql.errors import SourceNotReady, ValueRefused
from backfill.mysql.schema import CastOptions
from backfill.mysql.source import MySQLSource, connect
from tests.integration.helpers import wait_for
from tests.integration.mysqlhelpers import mysql_cli, mysql_cli_popen, mysql_exec, mysql_rows

pytest_plugins = ["tests.integration.mysqlserver"]


def plan_for(mariadb, db, table, dest_dsn=None, **options):
    source = MySQLSource.parse(mariadb.dsn(db))
    conn = connect(source, raw=False)
    try:
        plan, = schema.convert(conn, db, [table], CastOptions(**options))
    finally:
        conn.close()
    if dest_dsn is not None:
        with psycopg.connect(dest_dsn, autocommit=True) as pg:
            schema.create_tables(pg, [plan])
    return source, plan


def pg_all(dsn, query):
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(query).fetchall()


def test_values_are_exact(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db, "SET SESSION sql_mode = ''", """
        CREATE TABLE v (id bigint unsigned PRIMARY KEY, flag tinyint(1), dec1 decimal(30,10),
          ubig bigint unsigned, fl float, dt datetime(6), ts timestamp(6) NULL, d date,
          tm time(3), en enum('a','b'), st set('r','g','b'), js json, bl blob, b9 bit(9),
          vc varchar(20) CHARACTER SET latin1, yr year)""", """
        INSERT INTO v VALUES
         (1, 1, 12345678901234567890.0123456789, 18446744073709551615, 1.1,
          '2024-02-29 23:59:59.999999', '2024-03-10 02:30:00.000001', '2024-01-02',
          '12:34:56.789', 'b', 'b,r', '{"k": [1, 2.50, "é"]}', x'00ff10', b'100000001',
          'café', 2024),
         (2, 0, -0.0000000001, 0, -3.5, '0000-00-00 00:00:00', NULL, '0000-00-00',
          '00:00:00', NULL, '', '[]', '', b'0', '', 1901),
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
          NULL, NULL)""")
    source, plan = plan_for(mariadb, mysql_db, "v", bare_dsn)
    res = copy_table(source, bare_dsn, plan, batch_size=2)
    assert res.rows == 3
    assert res.state.copy_done
    rows = pg_all(bare_dsn, "SELECT * FROM v ORDER BY id")
    assert rows[0] == (
        1, True, Decimal("12345678901234567890.0123456789"), Decimal(18446744073709551615), 1.1,
        dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        dt.datetime(2024, 3, 10, 2, 30, 0, 1, tzinfo=dt.UTC), dt.date(2024, 1, 2),
        dt.time(12, 34, 56, 789000), "b", ["r", "b"], {"k": [1, 2.5, "é"]}, b"\x00\xff\x10",
        "100000001", "café", 2024)
    assert rows[1][:11] == (2, False, Decimal("-0.0000000001"), Decimal(0), -3.5, None, None,
                            None, dt.time(0), None, [])
    assert rows[2] == (3, *([None] * 15))
    # decimal text is exact, not a float's
    assert pg_all(bare_dsn, "SELECT dec1::text FROM v WHERE id = 1") == [
        ("12345678901234567890.0123456789",)]


def test_kill_mid_copy_then_resume_copies_each_row_once(mariadb, mysql_db, bare_dsn):
    rows = 20_000
    mysql_exec(mariadb, mysql_db, """
        CREATE TABLE items (tenant int NOT NULL, seq bigint NOT NULL, name varchar(40) NOT NULL,
          amount decimal(12,2), PRIMARY KEY (tenant, seq))""", f"""
        INSERT INTO items SELECT seq % 7, seq, concat('item ', seq), seq / 100
        FROM seq_1_to_{rows}""")
    source_dsn = mariadb.dsn(mysql_db)
    res = mysql_cli(bare_dsn, "convert-schema", "--source", source_dsn, "--tables", "items",
                    "--apply")
    assert res.returncode == 0, res.stderr
    _, plan = plan_for(mariadb, mysql_db, "items")

    proc = mysql_cli_popen(bare_dsn, "mysql", "copy", "--source", source_dsn, "--tables",
                           "items", "--batch-size", "300", "--pause", "20ms")
    try:
        def copied() -> int:
            with psycopg.connect(bare_dsn, autocommit=True) as pg:
                try:
                    state = read_state(pg, plan)
                except psycopg.errors.UndefinedTable:
                    return 0
                return state.rows_copied if state else 0
        wait_for(lambda: copied() >= 3000, timeout=60, what="some batches")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = pg_all(bare_dsn, "SELECT count(*) FROM items")[0][0]
    assert 3000 <= partial < rows
    assert copied() == partial            # the checkpoint committed with the rows

    res = mysql_cli(bare_dsn, "mysql", "copy", "--source", source_dsn, "--tables", "items",
                    "--batch-size", "1000")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["rows"] == rows - partial
    assert report["rows_total"] == rows
    src = mysql_rows(mariadb, mysql_db, "SELECT tenant, seq, name, amount FROM items "
                                        "ORDER BY tenant, seq")
    dst = pg_all(bare_dsn, "SELECT tenant, seq, name, amount FROM items ORDER BY tenant, seq")
    assert dst == [tuple(r) for r in src]
    # Run again: nothing more to do.
    res = mysql_cli(bare_dsn, "mysql", "copy", "--source", source_dsn, "--tables", "items")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == 0


def test_refused_value_names_the_key_and_the_rule(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db,
               "CREATE TABLE f (id int PRIMARY KEY, flag tinyint(1) NOT NULL)",
               "INSERT INTO f SELECT seq, seq % 2 FROM seq_1_to_1000",
               "UPDATE f SET flag = 5 WHERE id = 750")
    source, plan = plan_for(mariadb, mysql_db, "f", bare_dsn)
    with pytest.raises(ValueRefused, match=r"f row \(id=750\), column flag: 5 is neither 0 nor "
                                           r"1; --cast 'f.flag=smallint' would move it"):
        copy_table(source, bare_dsn, plan, batch_size=100)
    assert pg_all(bare_dsn, "SELECT count(*), max(id) FROM f") == [(700, 700)]


def test_source_without_row_binlog_is_refused(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE s (id int PRIMARY KEY)")
    source, plan = plan_for(mariadb, mysql_db, "s", bare_dsn)
    mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'STATEMENT'")
    try:
        with pytest.raises(SourceNotReady, match="binlog_format is STATEMENT, not ROW"):
            copy_table(source, bare_dsn, plan)
    finally:
        mysql_exec(mariadb, mysql_db, "SET GLOBAL binlog_format = 'ROW'")


def test_missing_destination_table_is_named(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE s (id int PRIMARY KEY)")
    source, plan = plan_for(mariadb, mysql_db, "s")
    with pytest.raises(TableNotFound, match=r"public\.s does not exist: create it first"):
        copy_table(source, bare_dsn, plan)


def test_unreachable_source_fails_fast(mariadb, mysql_db, bare_dsn):
    from tests.integration.servers import free_port

    mysql_exec(mariadb, mysql_db, "CREATE TABLE s (id int PRIMARY KEY)")
    _, plan = plan_for(mariadb, mysql_db, "s", bare_dsn)
    dead = MySQLSource.parse(f"mysql://backfill@127.0.0.1:{free_port()}/{mysql_db}"
                             f"?read_default_file={mariadb.option_file}&connect_timeout=2")
    with pytest.raises(DatabaseUnavailable, match=r"cannot connect to MySQL 127\.0\.0\.1"):
        copy_table(dead, bare_dsn, plan)


def test_invalid_utf8_is_refused_with_the_key_and_the_rule(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db,
               "CREATE TABLE u (id int PRIMARY KEY, raw varbinary(10))",
               "INSERT INTO u VALUES (1, 'ok'), (2, x'c328'), (3, 'fine')")
    source, plan = plan_for(mariadb, mysql_db, "u", bare_dsn,
                            casts={("u", "raw"): "text"})
    with pytest.raises(ValueRefused, match=r"u row \(id=2\), column raw: invalid UTF-8 at "
                                           r"byte 0; --cast 'u.raw=bytea' would move it"):
        copy_table(source, bare_dsn, plan)


def test_password_in_the_source_dsn_is_refused_by_the_cli(bare_dsn):
    res = mysql_cli(bare_dsn, "convert-schema", "--source", "mysql://app:hunter2@127.0.0.1/db")
    assert res.returncode == 2
    assert "must not carry a password" in res.stderr
    assert "~/.my.cnf" in res.stderr
    assert "hunter2" not in res.stderr + res.stdout
