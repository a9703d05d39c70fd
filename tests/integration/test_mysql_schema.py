"""convert-schema against a real MariaDB: every type of the issue's list, key choice, bad
input; the DDL applied to a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from backfill.core.errors import InvalidKey, TableNotFound
from backfill.mysql import schema
from backfill.mysql.errors import UnsupportedType
from backfill.mysql.schema import CastOptions
from backfill.mysql.source import MySQLSource, connect

pytest_plugins = ["tests.integration.mysqlserver"]

ALL_TYPES = """
CREATE TABLE AllTypes (
  id int unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,
  flag tinyint(1) NOT NULL DEFAULT 0, tiny tinyint, utiny tinyint unsigned,
  small smallint, usmall smallint unsigned, med mediumint, umed mediumint unsigned,
  i int, big bigint, ubig bigint unsigned,
  dec1 decimal(30,10), fl float, dbl double, b1 bit(1), b9 bit(9), yr year,
  ch char(4), vc varchar(50) CHARACTER SET latin1, tt tinytext, tx text, mt mediumtext,
  lt longtext, en enum('small','medium','it''s'), st set('r','g','b'), js json,
  bn binary(4), vb varbinary(10), tb tinyblob, bl blob, mb mediumblob, lb longblob,
  d date, dt datetime(6), ts timestamp(3) NULL, tm time(2),
  dz datetime NOT NULL DEFAULT '0000-00-00 00:00:00',
  UNIQUE KEY uq_vc (vc), KEY ix_i_big (i, big), KEY ix_prefix (tx(10)), FULLTEXT KEY ft (lt)
)"""


@pytest.fixture
def src(mariadb, mysql_db):
    conn = mariadb.connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = ''")
        cur.execute(ALL_TYPES)
        cur.execute("CREATE TABLE parent (a int NOT NULL, b varchar(10) NOT NULL, "
                    "n int NULL, UNIQUE KEY u_ab (a, b), UNIQUE KEY u_n (n))")
        cur.execute("CREATE TABLE child (id bigint PRIMARY KEY, pa int, pb varchar(10), "
                    "FOREIGN KEY fk_parent (pa, pb) REFERENCES parent (a, b) ON DELETE CASCADE)")
        cur.execute("CREATE TABLE nokey (a int, b int, UNIQUE KEY (a))")
        cur.execute("CREATE TABLE shapes (id int PRIMARY KEY, g geometry)")
    conn.close()
    source = MySQLSource.parse(mariadb.dsn(mysql_db))
    conn = connect(source, raw=False)
    yield conn, mysql_db
    conn.close()


def pg_types(dsn, table):
    with psycopg.connect(dsn, autocommit=True) as c:
        return dict(c.execute(
            "SELECT attname, format_type(atttypid, atttypmod) || CASE WHEN attnotnull "
            "THEN ' not null' ELSE '' END FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped", (table,)).fetchall())


def test_every_type_converts_and_applies(src, bare_dsn):
    conn, db = src
    plans = schema.convert(conn, db, ["alltypes", "parent", "child"], CastOptions())
    alltypes, parent, _child = plans
    assert alltypes.source.name == "AllTypes"
    assert alltypes.name == "alltypes"
    assert alltypes.key == ("id",)
    assert parent.key == ("a", "b")     # composite unique not-null; u_n is nullable
    rules = {c.source.name: c.rule for c in alltypes.columns}
    assert rules["js"] == "json-jsonb"            # MariaDB's json: longtext + json_valid
    assert rules["id"] == "auto-increment-identity"
    with psycopg.connect(bare_dsn, autocommit=True) as pg:
        schema.create_tables(pg, plans)
        schema.create_after_copy(pg, plans)
        for stmt in schema.sequence_statements(alltypes, {"id": 10}):
            pg.execute(stmt)
        fks = pg.execute("SELECT conname, convalidated FROM pg_constraint "
                         "WHERE contype = 'f'").fetchall()
        indexes = {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes "
                                            "WHERE tablename = 'alltypes'").fetchall()}
    types = pg_types(bare_dsn, "alltypes")
    assert types == {
        "id": "bigint not null", "flag": "boolean not null", "tiny": "smallint",
        "utiny": "smallint", "small": "smallint", "usmall": "integer", "med": "integer",
        "umed": "integer", "i": "integer", "big": "bigint", "ubig": "numeric(20,0)",
        "dec1": "numeric(30,10)", "fl": "real", "dbl": "double precision", "b1": "boolean",
        "b9": "bit(9)", "yr": "smallint", "ch": "character varying(4)",
        "vc": "character varying(50)", "tt": "text", "tx": "text", "mt": "text", "lt": "text",
        "en": "text", "st": "text[]", "js": "jsonb", "bn": "bytea", "vb": "bytea",
        "tb": "bytea", "bl": "bytea", "mb": "bytea", "lb": "bytea", "d": "date",
        "dt": "timestamp(6) without time zone", "ts": "timestamp(3) with time zone",
        "tm": "time(2) without time zone", "dz": "timestamp without time zone",
    }
    assert fks == [("child_fk_parent", True)]
    # The prefix and fulltext indexes are not moved; the others are, after the copy.
    assert indexes == {"alltypes_pkey", "alltypes_uq_vc", "alltypes_ix_i_big"}


def test_bad_input_is_named(src):
    conn, db = src
    with pytest.raises(InvalidKey, match="nokey has no usable key"):
        schema.convert(conn, db, ["nokey"], CastOptions())
    with pytest.raises(UnsupportedType, match=r"shapes.g: .*--cast 'shapes.g=bytea'"):
        schema.convert(conn, db, ["shapes"], CastOptions())
    plan, = schema.convert(conn, db, ["shapes"],
                           CastOptions.from_specs(["shapes.g=bytea"]))
    assert plan.columns[1].pg_type == "bytea"
    with pytest.raises(TableNotFound, match="missing"):
        schema.convert(conn, db, ["missing"], CastOptions())
