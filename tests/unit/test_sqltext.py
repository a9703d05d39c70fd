"""The one gate for user text that becomes SQL (invariant 7): each slot accepts exactly what it
allows. A catalogue of smuggling attempts is refused; fragments that only look odd pass."""

from __future__ import annotations

from typing import cast

import pytest

from backfill.core import sqltext
from backfill.core.errors import InvalidFragment, InvalidInput
from backfill.engine.kinds import user_sql
from backfill.job.spec import JobSpec, copy, delete, parse_set, sql_job, update

# Each would break out of the slot it is put in (`... AND (<where>)`, `SET c = (<expr>)`,
# `NULL::<type>`) if it were pasted.
SMUGGLED_EXPRESSIONS = [
    pytest.param("true) OR (true", id="close-and-reopen-parentheses"),
    pytest.param("1) , (2", id="second-target"),
    pytest.param("true; DROP TABLE victim", id="second-statement"),
    pytest.param("true; COMMIT; DROP TABLE victim; SELECT true", id="commit-then-drop"),
    pytest.param("true --", id="line-comment-swallows-the-rest"),
    pytest.param("true) --", id="close-then-comment"),
    pytest.param("true /* OR */", id="block-comment"),
    pytest.param("true */ OR true /*", id="block-comment-closing"),
    pytest.param("true /*", id="open-block-comment"),
    pytest.param("$$ ) OR (true", id="open-dollar-quote"),
    pytest.param("$x$ a", id="open-tagged-dollar-quote"),
    pytest.param("'a", id="open-string"),
    pytest.param('"a', id="open-quoted-name"),
    pytest.param("(true", id="unbalanced-open"),
    pytest.param("true)", id="unbalanced-close"),
    pytest.param("true)) OR ((true", id="double-unbalanced"),
    pytest.param("1 FROM victim", id="from-clause"),
    pytest.param("1 UNION SELECT 2", id="union"),
    pytest.param("1 INTO victim_copy", id="select-into"),
    pytest.param("*", id="star"),
    pytest.param("1 AS x", id="alias"),
    pytest.param("DISTINCT 1", id="distinct"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
]

ODD_BUT_LEGAL_EXPRESSIONS = [
    "note = 'a;b'",                        # a semicolon inside a string
    "note LIKE 'a%'",                      # a percent inside a string
    "val % 7 = 0",                         # the modulo operator
    "note = 'a--b'",                       # a comment marker inside a string
    "note = '/* not a comment */'",
    "note = $$ ) OR (true $$",             # a dollar-quoted string holding parentheses
    "note = $t$it's$t$",
    "(SELECT max(id) FROM victim) > 0",    # a scalar subquery
    "CASE WHEN val > 1 THEN 'x' ELSE 'y' END = 'x'",
    "\"Odd Col\" IS NULL",
    "coalesce(note, '') <> ''",
    "id = ANY ('{1,2,3}'::bigint[])",
]


@pytest.mark.parametrize("text", SMUGGLED_EXPRESSIONS)
def test_smuggled_expressions_are_refused(text: str) -> None:
    with pytest.raises(InvalidFragment):
        sqltext.expression(text)


@pytest.mark.parametrize("text", ODD_BUT_LEGAL_EXPRESSIONS)
def test_odd_but_legal_expressions_pass_unchanged(text: str) -> None:
    assert sqltext.expression(text) == text.strip()


def test_expression_sql_is_parenthesised_and_escapes_percent_only_when_asked() -> None:
    assert sqltext.expression_sql("val % 7").as_string(None) == "(val %% 7)"
    assert sqltext.expression_sql("val % 7", percent=False).as_string(None) == "(val % 7)"


@pytest.mark.parametrize("text", [
    "int", "bigint", "numeric(12,2)", "character varying(20)", "text[]", "int[][]",
    "timestamp with time zone", "double precision", '"MyType"', "public.my_type",
    "interval day to second",
])
def test_type_names(text: str) -> None:
    assert sqltext.type_name(text) == text


@pytest.mark.parametrize("text", [
    pytest.param("int; COMMIT; DROP TABLE victim; SELECT NULL::int", id="the-issue-12-smuggle"),
    pytest.param("int, 1", id="second-target"),
    pytest.param("int) OR (true", id="unbalanced"),
    pytest.param("int -- x", id="comment"),
    pytest.param("int COLLATE \"C\"", id="collate"),
    pytest.param("int + 1", id="expression"),
    pytest.param("int FROM victim", id="from"),
    pytest.param("1", id="not-a-type"),
    pytest.param("", id="empty"),
])
def test_bad_type_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidFragment):
        sqltext.type_name(text)


SQL_JOB = "UPDATE t SET c = 1 WHERE id BETWEEN %(lower)s AND %(upper)s"


@pytest.mark.parametrize("text", [
    SQL_JOB,
    SQL_JOB + ";",
    "UPDATE t SET note = 'a;b' WHERE id BETWEEN %(lower)s AND %(upper)s",
    "UPDATE t SET note = 'x%%' WHERE id BETWEEN %(lower)s AND %(upper)s",
    "DELETE FROM t WHERE id BETWEEN %(lower_id)s AND %(upper_id)s",
    "INSERT INTO u SELECT * FROM t WHERE id BETWEEN %(lower)s AND %(upper)s",
    "WITH x AS (SELECT id FROM t WHERE id BETWEEN %(lower)s AND %(upper)s) "
    "UPDATE t SET c = 1 FROM x WHERE t.id = x.id",
    "SELECT f(%(lower)s, %(upper)s)",
    "-- a comment\n" + SQL_JOB,
])
def test_sql_job_statements_that_pass(text: str) -> None:
    sqltext.statement(text, allowed=sqltext.SQL_JOB_STATEMENTS, placeholders=True)


@pytest.mark.parametrize("text", [
    pytest.param(SQL_JOB + "; COMMIT", id="then-commit"),
    pytest.param(SQL_JOB + "; DROP TABLE victim", id="then-drop"),
    pytest.param("COMMIT", id="commit"),
    pytest.param("BEGIN", id="begin"),
    pytest.param("DROP TABLE victim", id="ddl"),
    pytest.param("SELECT 1 INTO victim_copy", id="select-into"),
    pytest.param("UPDATE t SET note = 'x%' WHERE id BETWEEN %(lower)s AND %(upper)s",
                 id="lone-percent"),
    pytest.param("UPDATE t SET c = (1 WHERE id BETWEEN %(lower)s AND %(upper)s",
                 id="unbalanced"),
    pytest.param("DO $$ BEGIN DROP TABLE victim; END $$", id="do-block"),
])
def test_sql_job_statements_refused(text: str) -> None:
    with pytest.raises(InvalidFragment):
        sqltext.statement(text, allowed=sqltext.SQL_JOB_STATEMENTS, placeholders=True)


def test_probe_is_one_select() -> None:
    sqltext.statement("SELECT count(*) FROM pg_stat_activity", allowed=sqltext.PROBE_STATEMENTS)
    for bad in ("SELECT 1; DROP TABLE victim", "DELETE FROM victim", "COMMIT",
                "SELECT 1; COMMIT; DROP TABLE victim"):
        with pytest.raises(InvalidFragment):
            sqltext.statement(bad, allowed=sqltext.PROBE_STATEMENTS)


def test_scripts_split_into_statements_and_refuse_transaction_control() -> None:
    assert sqltext.statements("CREATE TABLE a (x int); SELECT ';'") == (
        "CREATE TABLE a (x int)", "SELECT ';'")
    for bad in ("BEGIN; CREATE TABLE a (x int); COMMIT", "CREATE TABLE a (x int); COMMIT",
                "SAVEPOINT s", "ROLLBACK"):
        with pytest.raises(InvalidFragment):
            sqltext.statements(bad)


# -- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "read"), [
    ("users", (None, "users")),
    ("T1", (None, "t1")),
    ("Public.Users", ("public", "users")),
    ('"Sales Data"."Order-Items"', ("Sales Data", "Order-Items")),
    ('"my table"', (None, "my table")),
    ('"Acct"."T"', ("Acct", "T")),
    ('"a.b"', (None, "a.b")),
    ('public."a.b"', ("public", "a.b")),
    ('"say ""hi"""', (None, 'say "hi"')),
    (" app . orders ", ("app", "orders")),
    ("café", (None, "café")),
    ('"select"', (None, "select")),
])
def test_qualified_names_are_read_as_sql_reads_them(text: str, read: tuple[str | None, str]) -> None:
    assert sqltext.qualified_name(text) == read
    # ... and written back so that they read the same
    assert sqltext.qualified_name(sqltext.render_qualified(*read)) == read


@pytest.mark.parametrize("text", [
    "a.b.c", "", ".a", "a.", "a b", '"a', '""', "a;b", "a--", "select", "1abc", "a,b",
    "x" * 64, "t)", 'a"b"',
])
def test_malformed_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidFragment):
        sqltext.qualified_name(text)


def test_identifier_lists_split_on_commas_outside_quotes() -> None:
    assert sqltext.identifier_list('a, "B,c" ,D') == ("a", "B,c", "d")
    assert sqltext.identifier_list(["Id", '"Id"']) == ("id", "Id")
    with pytest.raises(InvalidFragment):
        sqltext.identifier_list("a.b")
    with pytest.raises(InvalidFragment):
        sqltext.identifier_list("a,,b")
    with pytest.raises(InvalidFragment):
        sqltext.identifier('"a,b", c')


def test_quote_ident_quotes_only_when_needed() -> None:
    assert sqltext.quote_ident("users") == "users"
    assert sqltext.quote_ident("Users") == '"Users"'
    assert sqltext.quote_ident("my table") == '"my table"'
    assert sqltext.quote_ident("select") == '"select"'
    assert sqltext.quote_ident('a"b') == '"a""b"'


# -- the specs go through the gate at construction ---------------------------------------------


def test_specs_refuse_smuggled_text_before_any_database() -> None:
    with pytest.raises(InvalidFragment):
        update("t", {"c": "1"}, where="true) OR (true")
    with pytest.raises(InvalidFragment):
        update("t", ["c = 1) , d = (2"])
    with pytest.raises(InvalidFragment):
        delete("t", "true; DROP TABLE victim")
    with pytest.raises(InvalidFragment):
        sql_job("t", SQL_JOB + "; COMMIT")
    with pytest.raises(InvalidFragment):
        copy("t", "u", where="true --")
    with pytest.raises(InvalidInput):
        update("a.b.c", {"c": "1"})
    # A stored spec still loads (list, show, cancel), but its text is checked again where it
    # is used, and by any change to it.
    stored = update("t", {"c": "1"}).to_json()
    stored["where"] = "true) OR (true"
    spec = JobSpec.from_json(stored)
    with pytest.raises(InvalidFragment):
        user_sql(cast(str, spec.where))
    with pytest.raises(InvalidFragment):
        spec.with_options(batch_size=10)


def test_set_columns_keys_and_columns_are_names_as_sql_writes_them() -> None:
    assert parse_set(['Total = 1', '"Total" = 2', '"a=b" = 3']) == (
        ("total", "1"), ("Total", "2"), ("a=b", "3"))
    spec = update("T", {"Total": "1"}, key='"Id", b')
    assert spec.set == (("total", "1"),)
    assert spec.key == ("Id", "b")
    assert copy("t", "u", columns='a, "B,c"').columns == ("a", "B,c")


def test_backslashes_are_read_with_standard_conforming_strings() -> None:
    """The gate reads '\\' as a one-character string, as the server does with
    standard_conforming_strings on (which every connection sets)."""
    assert sqltext.expression("note = '\\' OR true OR '\\'") == "note = '\\' OR true OR '\\'"
    with pytest.raises(InvalidFragment):
        sqltext.expression("note = '\\' ) OR (true")


def test_a_sql_jobs_bounds_must_be_real_parameters() -> None:
    """A bound inside a comment or a string literal is no bound: every batch would run over
    the rest of the table."""
    with pytest.raises(InvalidInput, match="must use the batch bounds"):
        sql_job("t", "UPDATE t SET c = 1 WHERE id > %(lower)s -- %(upper)s")
    with pytest.raises(InvalidInput, match="must use the batch bounds"):
        sql_job("t", "UPDATE t SET c = '%(upper)s' WHERE id > %(lower)s")
    assert sql_job("t", "UPDATE t SET c = '%%' WHERE id BETWEEN %(lower)s AND %(upper)s")
    assert sqltext.parameters_used(
        "UPDATE t SET c = 1 WHERE (a, b) > (%(lower_a)s, %(lower_b)s) AND a <= %(upper_a)s"
    ) == {"lower_a", "lower_b", "upper_a"}


@pytest.mark.parametrize("text", [
    "set_config('statement_timeout', '0', true)",
    "n + (SELECT 1 FROM pg_sleep(10))::int",
    "pg_catalog.set_config('lock_timeout', '0', false)",
    "CASE WHEN pg_try_advisory_xact_lock(1) THEN 1 END",
    "length(pg_read_file('/etc/passwd'))",
    "pg_terminate_backend(42)::int",
])
def test_an_expression_that_changes_the_session_or_reaches_out_is_refused(text: str) -> None:
    with pytest.raises(InvalidFragment, match=r"calls .*\(\): a job may not"):
        sqltext.expression(text, slot="--set")


def test_a_statement_that_changes_the_session_is_refused_and_plain_functions_pass() -> None:
    with pytest.raises(InvalidFragment, match=r"set_config\(\)"):
        sqltext.statement("UPDATE t SET n = 1 WHERE set_config('lock_timeout', '0', true) <> ''",
                          allowed=sqltext.SQL_JOB_STATEMENTS)
    assert sqltext.expression("lower(email) || now()::text") == "lower(email) || now()::text"
    # A name in a string is not a call.
    assert sqltext.expression("'set_config(x)'") == "'set_config(x)'"


@pytest.mark.parametrize("text", [
    "UPDATE pg_settings SET setting = '0' WHERE name = 'lock_timeout'",
    "WITH s AS (UPDATE pg_catalog.pg_settings SET setting = '0' WHERE name = 'lock_timeout' "
    "RETURNING 1) UPDATE t SET n = n + 1 WHERE id BETWEEN %(lower)s AND %(upper)s",
    "SELECT pg_replication_slot_advance('slot', pg_current_wal_lsn())",
    "SELECT * FROM pg_logical_slot_get_changes('slot', NULL, NULL)",
])
def test_a_statement_that_writes_settings_or_consumes_a_slot_is_refused(text: str) -> None:
    with pytest.raises(InvalidFragment, match=r"a job may not"):
        sqltext.statement(text, allowed=sqltext.SQL_JOB_STATEMENTS, placeholders=True)


def test_reading_pg_settings_is_fine() -> None:
    text = "SELECT setting::int FROM pg_settings WHERE name = 'max_connections'"
    assert sqltext.statement(text, allowed=sqltext.PROBE_STATEMENTS) == text
