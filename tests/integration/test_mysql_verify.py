"""Verify across the two engines: a faithful copy of every type verifies clean; a changed
value, a missing row and an extra row are each found, in their range."""

from __future__ import annotations

import psycopg

from backfill.mysql import schema
from backfill.mysql.copy import copy_table
from backfill.mysql.schema import CastOptions
from backfill.mysql.source import MySQLSource, connect
from backfill.mysql.verify import verify_table
from tests.integration.mysqlhelpers import mysql_exec

pytest_plugins = ["tests.integration.mysqlserver"]


def test_verify_finds_each_kind_of_difference(mariadb, mysql_db, bare_dsn):
    mysql_exec(mariadb, mysql_db, "SET SESSION sql_mode = ''", """
        CREATE TABLE w (code varchar(12) NOT NULL, n int NOT NULL, flag tinyint(1),
          dec1 decimal(30,10), ubig bigint unsigned, fl float, db double, dt datetime(6),
          ts timestamp(6) NULL, d date, tm time(3), en enum('a','b'), st set('r','g','b'),
          js json, bl blob, b9 bit(9), vc varchar(20) CHARACTER SET latin1, yr year,
          PRIMARY KEY (code, n))""", """
        INSERT INTO w SELECT concat(CHAR(65 + seq % 26), 'é', seq % 3), seq, seq % 2,
          seq / 7, 18446744073709551615 - seq, seq / 3, seq / 3, '2024-02-29' + INTERVAL seq
          MICROSECOND, '2024-03-10' + INTERVAL seq SECOND, IF(seq % 10 = 0, '0000-00-00',
          '2024-01-01'), '12:34:56.789', IF(seq % 2, 'a', 'b'), 'r,b',
          concat('{"k": [1, 2.50, "é"], "n": ', seq, '}'), unhex(hex(seq)), seq % 512,
          'café', 1901 + seq % 100
        FROM seq_1_to_2500""")
    source = MySQLSource.parse(mariadb.dsn(mysql_db))
    conn = connect(source, raw=False)
    try:
        plan, = schema.convert(conn, mysql_db, ["w"], CastOptions())
    finally:
        conn.close()
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        schema.create_tables(pg, [plan])
    copy_table(source, bare_dsn, plan, batch_size=700)

    clean = verify_table(source, bare_dsn, plan, range_size=500)
    assert clean.ok, clean.mismatched[:1]
    assert (clean.ranges, clean.source_rows, clean.dest_rows) == (5, 2500, 2500)

    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        pg.execute("UPDATE w SET dec1 = dec1 + 0.0000000001 WHERE n = 100")
        pg.execute("DELETE FROM w WHERE n = 2000")
        pg.execute("INSERT INTO w (code, n) VALUES ('zzz', 1)")
    report = verify_table(source, bare_dsn, plan, range_size=500)
    assert not report.ok
    assert {k[1] for r in report.mismatched for k in r.differences} == {100, 2000}
    assert sum(r.source_rows - r.dest_rows for r in report.mismatched) == 1
    assert report.extra_in_dest == 1
