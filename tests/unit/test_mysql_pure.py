"""Pure logic of the MySQL source: DSNs, cast rules, key choice, DDL, value casts."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from backfill.core.errors import InvalidDsn, InvalidFragment, InvalidKey, InvalidOption
from backfill.mysql.errors import UnsupportedType
from backfill.mysql.model import MySQLColumn, MySQLIndex, MySQLTable
from backfill.mysql.schema import (
    RULE_NAMES,
    CastOptions,
    create_statement,
    parse_cast,
    parse_target,
    plan_table,
    post_copy_statements,
    render,
    sequence_statements,
)
from backfill.mysql.source import (
    MySQLSource,
    error_text,
    is_connection_error,
    is_server_error,
    quote_name,
)
from backfill.mysql.values import RawRowConverter, Refusal, RowConverter, render_text

# -- DSNs --------------------------------------------------------------------------------------


def test_dsn_parses(tmp_path):
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\npassword=x\n")
    s = MySQLSource.parse(f"mysql://app@db.example:3307/shop?read_default_file={cnf}")
    assert (s.user, s.host, s.port, s.database) == ("app", "db.example", 3307, "shop")
    assert s.connection_settings()["read_default_file"] == str(cnf)
    assert "password" not in s.connection_settings()
    assert s.describe() == "db.example:3307/shop"
    assert MySQLSource.parse("mariadb://u@h/d").database == "d"


@pytest.mark.parametrize("dsn", ["mysql://app:secret@h/db", "mysql://app:@h/db",
                                 "mysql://app@h/db?password=secret"])
def test_password_in_dsn_is_refused_naming_the_option_file(dsn):
    with pytest.raises(InvalidDsn, match=r"option file \(~/.my.cnf.*read_default_file") as exc:
        MySQLSource.parse(dsn)
    assert "secret" not in str(exc.value)


@pytest.mark.parametrize(("dsn", "msg"), [
    ("postgresql://h/db", "mysql://"), ("mysql://u@h", "one database"),
    ("mysql://u@h/db?bogus=1", "unknown source DSN parameter"),
    ("mysql://u@h/db?read_default_file=/nonexistent/x.cnf", "does not exist"),
    ("mysql://u@h:notaport/db", "malformed"),
])
def test_bad_dsns(dsn, msg):
    with pytest.raises(InvalidDsn, match=msg):
        MySQLSource.parse(dsn)


def test_quote_name_doubles_backquotes():
    assert quote_name("a`b") == "`a``b`"
    with pytest.raises(InvalidDsn):
        quote_name("a\x00b")


# -- cast rules ------------------------------------------------------------------------------


def col(name, ctype, *, nullable=True, **kw):
    dtype = ctype.split("(")[0].split()[0]
    if dtype in ("char", "varchar", "text", "enum", "set", "longtext", "tinytext"):
        kw.setdefault("charset", "utf8mb4")
    return MySQLColumn(name=name, position=kw.pop("position", 1), data_type=dtype,
                       column_type=ctype, nullable=nullable, **kw)


def table(*cols, indexes=None):
    cols = tuple(
        MySQLColumn(**{**c.__dict__, "position": i + 1}) for i, c in enumerate(cols))
    if indexes is None:
        indexes = (MySQLIndex("PRIMARY", True, (cols[0].name,)),)
    return MySQLTable("shop", "Orders", cols, tuple(indexes))


def casts_of(t, **kw):
    return {c.source.name: (c.pg_type, c.rule) for c in plan_table(t, CastOptions(**kw)).columns}


def test_default_rules():
    t = table(
        col("id", "int(10) unsigned", nullable=False, auto_increment=True),
        col("flag", "tinyint(1)"), col("tiny", "tinyint(4)"), col("su", "smallint(5) unsigned"),
        col("big", "bigint(20) unsigned"), col("d", "decimal(30,10)", precision=30, scale=10),
        col("f", "float"), col("db", "double"), col("b1", "bit(1)", precision=1),
        col("b5", "bit(5)", precision=5), col("y", "year(4)"), col("c", "char(3)", length=3),
        col("v", "varchar(20)", length=20), col("t", "longtext"),
        col("e", "enum('a','b')", values=("a", "b")), col("s", "set('x','y')", values=("x", "y")),
        col("j", "longtext", is_json=True), col("bl", "blob"),
        col("dd", "date"), col("dt", "datetime(6)", fsp=6), col("ts", "timestamp(3)", fsp=3),
        col("tm", "time"),
    )
    got = casts_of(t)
    assert got["id"] == ("bigint", "auto-increment-identity")
    assert got["flag"] == ("boolean", "tinyint1-boolean")
    assert got["tiny"] == ("smallint", "tinyint")
    assert got["su"] == ("integer", "smallint-unsigned")
    assert got["big"] == ("numeric(20)", "bigint-unsigned")
    assert got["d"] == ("numeric(30,10)", "decimal")
    assert got["f"][0] == "real"
    assert got["db"][0] == "double precision"
    assert got["b1"] == ("boolean", "bit1-boolean")
    assert got["b5"][0] == "bit(5)"
    assert got["c"] == ("varchar(3)", "char")
    assert got["t"] == ("text", "text")
    assert got["e"] == ("text", "enum-text-check")
    assert got["s"] == ("text[]", "set-text-array")
    assert got["j"] == ("jsonb", "json-jsonb")
    assert got["bl"] == ("bytea", "blob-bytea")
    assert got["dt"] == ("timestamp(6)", "datetime-timestamp")
    assert got["ts"] == ("timestamptz(3)", "timestamp-timestamptz")
    assert {r for _, r in got.values()} <= RULE_NAMES
    assert casts_of(t, tinyint1_boolean=False)["flag"] == ("smallint", "tinyint")


def test_cast_override_is_checked_and_applied():
    t = table(col("id", "int", nullable=False), col("flag", "tinyint(1)"),
              col("Amount", "decimal(10,2)", precision=10, scale=2))
    opts = CastOptions.from_specs(["orders.flag=smallint", "Orders.amount=numeric(12,4)"])
    got = casts_of(t, casts=opts.casts)
    assert got["flag"] == ("smallint", "cast")
    assert got["Amount"] == ("numeric(12,4)", "cast")
    with pytest.raises(UnsupportedType, match="cannot produce date from tinyint"):
        casts_of(t, casts={("Orders", "flag"): "date"})
    with pytest.raises(InvalidFragment):
        casts_of(t, casts={("Orders", "flag"): "int; DROP TABLE x"})
    with pytest.raises(InvalidOption, match=r"table\.column=type"):
        parse_cast("flag=int")
    assert parse_cast("db.t.c = text") == ("db.t", "c", "text")


def test_parse_target_kinds():
    assert parse_target("timestamp with time zone").kind == "timestamptz"
    assert parse_target("varchar(12)").length == 12
    n = parse_target("numeric(12, 4)")
    assert (n.kind, n.precision, n.scale) == ("numeric", 12, 4)
    assert parse_target("text[]").kind == "textarray"
    with pytest.raises(UnsupportedType):
        parse_target("point")


def test_unsupported_type_names_the_cast_that_fixes_it():
    t = table(col("id", "int", nullable=False), col("shape", "geometry"))
    with pytest.raises(UnsupportedType,
                       match=r"Orders.shape: MySQL type geometry .*--cast 'Orders.shape=bytea'"):
        casts_of(t)
    assert casts_of(t, casts={("Orders", "shape"): "bytea"})["shape"] == ("bytea", "cast")


def test_key_choice():
    cols = (col("a", "int", nullable=False), col("b", "varchar(10)", nullable=False, length=10),
            col("c", "int"), col("f", "double", nullable=False))
    pk = MySQLIndex("PRIMARY", True, ("a",))
    uq = MySQLIndex("u_ab", True, ("a", "b"))
    assert plan_table(table(*cols, indexes=(uq, pk)), CastOptions()).key == ("a",)
    assert plan_table(table(*cols, indexes=(uq,)), CastOptions()).key == ("a", "b")
    for bad in ((MySQLIndex("u_c", True, ("c",)),), (MySQLIndex("u_f", True, ("f",)),),
                (MySQLIndex("u_b", True, ("b",), prefix=True),),
                (MySQLIndex("i_a", False, ("a",)),), ()):
        with pytest.raises(InvalidKey, match="no usable key"):
            plan_table(table(*cols, indexes=bad), CastOptions())
    with pytest.raises(InvalidKey, match="c is nullable"):
        plan_table(table(*cols, indexes=(MySQLIndex("u_c", True, ("c",)),)), CastOptions(),
                   key=["c"])


def test_identifier_case_collision():
    t = table(col("id", "int", nullable=False), col("Name", "text"), col("name", "text"))
    with pytest.raises(InvalidOption, match="identifier_case=preserve"):
        casts_of(t)
    assert "Name" in {c.name for c in
                      plan_table(t, CastOptions(identifier_case="preserve")).columns}


def test_ddl():
    t = table(col("id", "bigint(20)", nullable=False, auto_increment=True),
              col("e", "enum('a','it''s')", values=("a", "it's"), nullable=False),
              col("d", "datetime", nullable=False, default="'0000-00-00 00:00:00'"),
              indexes=(MySQLIndex("PRIMARY", True, ("id",)), MySQLIndex("ix_e", False, ("e",))))
    plan = plan_table(t, CastOptions())
    ddl = render([create_statement(plan)])
    assert '"public"."orders"' in ddl
    assert '"id" bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL' in ddl
    assert '"e" text NOT NULL' in ddl
    assert "CHECK (\"e\" IN ('a', 'it''s'))" in ddl
    assert '"d" timestamp,' in ddl or '"d" timestamp\n' in ddl   # zero-date default: nullable
    assert 'PRIMARY KEY ("id")' in ddl
    assert any("NOT NULL dropped" in n for n in plan.notes)
    post = render(post_copy_statements(plan))
    assert 'CREATE INDEX CONCURRENTLY IF NOT EXISTS "orders_ix_e"' in post
    seq = render(sequence_statements(plan, {"id": 50}))
    assert "setval(pg_get_serial_sequence" in seq
    assert "50" in seq


# -- values ------------------------------------------------------------------------------------


def converter(*cols_, casts=None):
    t = table(col("id", "int", nullable=False), *cols_)
    return RowConverter(plan_table(t, CastOptions(casts=casts)).columns)


def test_values_from_raw_select_and_binlog_agree():
    cols = (col("dt", "datetime(6)", fsp=6), col("ts", "timestamp"), col("tm", "time(2)", fsp=2),
            col("s", "set('x','y','z')", values=("x", "y", "z")), col("b", "bit(5)", precision=5),
            col("f", "float"), col("d", "date"), col("v", "varchar(5)", length=5))
    conv = converter(*cols)
    raw = [1, b"2024-02-29 12:34:56.123456", b"2024-03-01 01:02:03", b"-838:59:59.50", b"z,x",
           b"\x15", 1.1, b"0000-00-00", "caf\u00e9".encode()]
    binlog = [1, dt.datetime(2024, 2, 29, 12, 34, 56, 123456), dt.datetime(2024, 3, 1, 1, 2, 3),
              -dt.timedelta(hours=838, minutes=59, seconds=59, microseconds=500000), {"z", "x"},
              "10101", 1.100000023841858, None, "caf\u00e9"]
    a, b = conv.source_values(raw), conv.source_values(binlog)
    assert a == b
    assert a[2].tzinfo is dt.UTC
    assert a[4] == ["x", "z"]
    assert a[5] == 21
    assert a[7] is None


@pytest.mark.parametrize(("ctype", "kw", "cast", "value", "fix"), [
    ("tinyint(1)", {}, None, 5, "smallint"),
    ("varchar(10)", {"length": 10}, None, b"a\x00b", "bytea"),
    ("varchar(10)", {"length": 10}, None, b"\xff\xfe", "bytea"),
    ("time", {}, None, b"25:00:00", "interval"),
    ("bigint(20) unsigned", {}, "bigint", 2**63, "numeric"),
    ("decimal(10,4)", {"precision": 10, "scale": 4}, "numeric(10,2)", Decimal("1.2345"),
     "numeric"),
    ("longtext", {"is_json": True}, None, b'{"a": "\\u0000"}', "json"),
])
def test_values_refused_with_the_fix(ctype, kw, cast, value, fix):
    c = col("c", ctype, **kw)
    conv = converter(c, casts={("Orders", "c"): cast} if cast else None)
    with pytest.raises(Refusal) as exc:
        conv.convert([1, value])
    assert exc.value.fix == fix
    assert exc.value.column == "c"


def test_exact_values():
    conv = converter(col("d", "decimal(30,10)", precision=30, scale=10),
                     col("t", "time(6)", fsp=6), col("n", "datetime", nullable=False))
    row = conv.convert([1, Decimal("12345678901234567890.0123456789"), b"23:59:59.999999",
                        b"2024-01-01 00:00:00"])
    assert row[1] == Decimal("12345678901234567890.0123456789")
    assert row[2] == dt.time(23, 59, 59, 999999)
    with pytest.raises(Refusal, match="zero date"):
        conv.convert([1, None, None, b"0000-00-00 00:00:00"])
    assert render_text(dt.timedelta(hours=-1, seconds=-1)) == "-01:00:01"


def _outcome(fn, row):
    try:
        return ("ok", fn(row))
    except Refusal as r:
        return ("refused", r.reason, r.fix, r.column)


def test_raw_fast_path_gives_the_same_values_and_refusals():
    cols = (col("a", "int"), col("b", "int unsigned"), col("c", "bigint unsigned"),
            col("d", "tinyint(1)"), col("e", "decimal(12,2)", precision=12, scale=2),
            col("f", "varchar(5)", length=5), col("g", "text"), col("h", "datetime(6)", fsp=6),
            col("i", "datetime", nullable=False), col("j", "year"), col("k", "smallint unsigned"),
            col("l", "decimal(10,4)", precision=10, scale=4), col("m", "char(3)", length=3),
            col("n", "varchar(10)", length=10), col("o", "time"))
    overrides = {("Orders", "c"): "bigint", ("Orders", "l"): "numeric(10,2)",
                 ("Orders", "n"): "varchar(4)"}
    t = table(col("id", "bigint", nullable=False), *cols)
    casts = plan_table(t, CastOptions(casts=overrides)).columns
    slow, fast = RowConverter(casts), RawRowConverter(casts)
    good = [1, -(2**31), 2**32 - 1, 2**64 - 1 - 2**63, 1, Decimal("-9999999999.99"),
            "cafés".encode(), b"x" * 1000, b"2024-02-29 12:34:56.123456", b"2024-01-01 00:00:00",
            2155, 65535, Decimal("1.2300"), b"abc", b"abcd", b"12:00:00"]
    nulls = [2, *[None] * (len(good) - 1)]
    nulls[9] = b"2024-01-01 00:00:00"
    zero = [*good]
    zero[8] = b"0000-00-00 00:00:00.000000"
    zero[3] = 2**63 - 1
    rows = [good, nulls, zero]
    # (No 6-character value in f: MySQL holds varchar(5) to 5 characters, so the fast path
    # checks the length only where the destination is narrower, as n is.)
    bad = [(3, 2**63), (4, 2), (6, b"\xff"), (7, b"a\x00"),
           (9, b"2024-00-01 00:00:00"), (12, Decimal("1.2345")), (14, b"abcde"),
           (15, b"25:00:00"), (4, -1)]
    for pos, value in bad:
        row = [*good]
        row[pos] = value
        rows.append(row)
    for row in rows:
        assert _outcome(fast.convert, row) == _outcome(slow.convert, row), row
    with pytest.raises(Refusal) as exc:
        fast.convert_rows(rows)
    assert exc.value.row_index == 3
    assert fast.convert_rows(rows[:3]) == [slow.convert(r) for r in rows[:3]]


# -- cutover gate ------------------------------------------------------------------------------


def test_gate_opens_only_after_the_hold_within_bounds():
    from backfill.mysql.binlog import Lag
    from backfill.mysql.copy import BinlogPosition
    from backfill.mysql.cutover import GatePolicy, LagReading, gate_decision

    pos = BinlogPosition("binlog.000001", 4)

    def r(at, seconds, events=0):
        return LagReading(at, Lag(seconds, events, pos, pos))

    policy = GatePolicy(max_lag_seconds=5, max_lag_events=100, hold_seconds=10)
    assert not gate_decision([], 0, policy).open
    assert not gate_decision([r(0, 1), r(5, 1)], 5, policy).open          # not held long enough
    assert gate_decision([r(0, 1), r(5, 1), r(10, 2)], 10, policy).open
    assert gate_decision([r(-20, 60), r(0, 1), r(10, 2)], 10, policy).open  # old spike: out
    closed = gate_decision([r(0, 1), r(6, 9), r(10, 2)], 10, policy)
    assert not closed.open
    assert "above 5s" in closed.reason
    assert not gate_decision([r(0, 1), r(6, 1, events=500), r(10, 2)], 10, policy).open
    failed = gate_decision([r(0, 1), LagReading(6, None), r(10, 2)], 10, policy)
    assert not failed.open                                                # fail-closed
    assert "failed" in failed.reason


# -- catch-up coalescing -----------------------------------------------------------------------


def test_binlog_changes_coalesce_per_key_last_image_wins():
    from types import SimpleNamespace

    from backfill.mysql.binlog import CatchUp, _Pending

    t = table(col("id", "int", nullable=False), col("v", "varchar(10)", length=10),
              col("s", "set('a','b')", values=("a", "b")))
    plan = plan_table(t, CastOptions())
    p = _Pending(plan, RowConverter(plan.columns))

    def rows(*images):
        return SimpleNamespace(rows=list(images))

    def img(i, v, s=""):
        return {"id": i, "v": v, "s": s}

    CatchUp._add(p, rows({"values": img(1, "a")}, {"values": img(2, "b")},
                         {"values": img(3, "c")}), update=False, delete=False)
    CatchUp._add(p, rows({"before_values": img(1, "a"), "after_values": img(1, "a2")},
                         {"before_values": img(2, "b"), "after_values": img(20, "b")}),
                 update=True, delete=False)
    CatchUp._add(p, rows({"values": img(3, "c")}), update=False, delete=True)
    CatchUp._add(p, rows({"values": {"id": 4, "v": "d", "s": None},
                          "none_sources": {"s": "empty set"}}), update=False, delete=False)
    assert p.events == 7
    assert p.changes == {(1,): [1, "a2", []], (2,): None, (20,): [20, "b", []], (3,): None,
                         (4,): [4, "d", []]}


# -- error classification ----------------------------------------------------------------------


def test_only_a_lost_connection_is_a_connection_error():
    pymysql = pytest.importorskip("pymysql")
    err = pymysql.err
    lost = [err.OperationalError(2003, "Can't connect"), err.OperationalError(2006, "gone away"),
            err.OperationalError(2013, "Lost connection"), err.OperationalError(2055, "lost"),
            err.OperationalError(1053, "Server shutdown in progress"),
            err.OperationalError(1152, "Aborted connection"),
            err.OperationalError(1927, "Connection was killed"),
            err.OperationalError(4031, "disconnected by the server"),
            err.InterfaceError(0, ""), err.OperationalError(), ConnectionResetError(),
            TimeoutError()]
    answers = [err.OperationalError(1054, "Unknown column 'v' in 'field list'"),
               err.OperationalError(1205, "Lock wait timeout exceeded"),
               err.OperationalError(1969, "Query execution was interrupted (max_statement_time"
                                          " exceeded)"),
               err.OperationalError(1317, "Query execution was interrupted"),
               err.OperationalError(3024, "maximum statement execution time exceeded"),
               err.ProgrammingError(1146, "Table 'shop.orders' doesn't exist"),
               err.InternalError(1213, "Deadlock found")]
    for exc in lost:
        assert is_connection_error(exc), exc
        assert not is_server_error(exc), exc
    for exc in answers:
        assert not is_connection_error(exc), exc
        assert is_server_error(exc), exc
    assert not is_connection_error(ValueError("x"))
    assert not is_server_error(ValueError("x"))
    assert error_text(err.OperationalError(1205, "Lock wait timeout exceeded\nmore")) == \
        "MySQL error 1205: Lock wait timeout exceeded"


def test_ddl_is_told_behind_comments_and_by_the_table_it_names():
    from backfill.mysql.binlog import _is_ddl, _mentions, _statement

    for text in ("/* gh-ost */ ALTER TABLE shop.orders ADD c int",
                 "-- tool\n  # more\n DROP TABLE orders", "/*!40000 ALTER TABLE orders */",
                 "  /* a */ /* b */rename table orders to o2", "TRUNCATE orders"):
        assert _is_ddl(text), text
    for text in ("/* ALTER */ SELECT 1", "INSERT INTO orders VALUES (1)", "COMMIT", "BEGIN"):
        assert not _is_ddl(text), text
    assert _statement("/* x */ ALTER TABLE t") == "ALTER TABLE t"
    cases = [("ALTER TABLE shop.orders ADD c int", "other", True),
             ("ALTER TABLE `shop`.`orders` ADD c int", "other", True),
             ("ALTER TABLE `Shop` . orders ADD c int", "", True),
             ("ALTER TABLE orders ADD c int", "shop", True),
             ("ALTER TABLE orders ADD c int", "", True),
             ("ALTER TABLE orders ADD c int", "other", False),
             ("ALTER TABLE other.orders ADD c int", "shop", False),
             ("ALTER TABLE shop.orders_old ADD c int", "shop", False),
             ("ALTER TABLE shop.my_orders ADD c int", "shop", False),
             ("RENAME TABLE shop.tmp TO shop.orders", "other", True)]
    for text, session, want in cases:
        assert _mentions(text, "orders", "shop", session) is want, (text, session)


def test_a_positional_row_image_of_another_width_is_a_changed_table():
    from backfill.mysql.binlog import SourceSchemaChanged, _Pending

    plan = plan_table(table(col("id", "int", nullable=False), col("v", "int")), CastOptions())
    p = _Pending(plan, RowConverter(plan.columns))
    assert p.convert({"UNKNOWN_COL0": 1, "UNKNOWN_COL1": 2}, {}) == [1, 2]
    for image in ({"UNKNOWN_COL0": 1}, {"UNKNOWN_COL0": 1, "UNKNOWN_COL1": 2, "UNKNOWN_COL2": 3}):
        with pytest.raises(SourceSchemaChanged, match="columns, the plan 2"):
            p.convert(image, {})
