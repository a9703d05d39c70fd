"""Issue 12, items 2 and 3, against a real server: every piece of user SQL passes one gate
(invariant 7), and names are read as SQL writes them.

A smuggling attempt is refused with exit 2 before anything runs: the ``victim`` table is
intact and the state schema holds no job. Fragments that only look odd still work, and so
do tables whose names need quotes, through enqueue, pre-flight and run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from backfill import Backfill, InvalidFragment, JobState, copy, update
from backfill.control.controller import ControllerConfig, _tables
from backfill.control.policy import Limit
from backfill.control.signals import Probe, probe
from backfill.migrate.executor import Migrator
from backfill.migrate.file import parse
from tests.integration.test_bad_input import (
    assert_no_jobs,
    assert_ok,
    assert_refused,
    checksum,
    cli,
)

pytestmark = pytest.mark.timeout(180)

Conn = psycopg.Connection[Any]
ROWS = 2_000


@pytest.fixture
def victim(conn: Conn) -> tuple[int, int]:
    """``items`` (the job's table, 2,000 rows) and ``victim`` (what a smuggle would drop);
    returns ``items``' checksum."""
    conn.execute("CREATE TABLE victim (id int PRIMARY KEY)")
    conn.execute("INSERT INTO victim SELECT generate_series(1, 10)")
    conn.execute("""CREATE TABLE items (id bigint PRIMARY KEY, val int NOT NULL,
                    counter int NOT NULL DEFAULT 0, note text)""")
    conn.execute("INSERT INTO items (id, val) SELECT g, g %% 100 FROM generate_series(1, %s) g",
                 (ROWS,))
    return checksum(conn, "items")


def assert_intact(conn: Conn, items: tuple[int, int]) -> None:
    assert conn.execute("SELECT to_regclass('public.victim') IS NOT NULL").fetchone() == (True,)
    assert conn.execute("SELECT count(*) FROM victim").fetchone() == (10,)
    assert checksum(conn, "items") == items


# -- item 2: one gate for every piece of user SQL ---------------------------------------------


def test_a_where_that_closes_its_parentheses_is_refused(
    dsn: str, conn: Conn, victim: tuple[int, int]
) -> None:
    """Was: ``… AND (true) OR (true)``, every batch updated the whole table."""
    res = cli(dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1",
              "--where", "true) OR (true")
    assert_refused(res, 2, "WHERE", "true) OR (true", "does not parse")
    assert_intact(conn, victim)
    assert_no_jobs(conn)
    with pytest.raises(InvalidFragment):
        Backfill(dsn).enqueue(update("items", {"counter": "counter + 1"},
                                     where="true) OR (true"))
    assert_no_jobs(conn)


SMUGGLED_JOBS = [
    pytest.param(["--set", "counter = 1", "--where", "true; DROP TABLE victim"], id="where-;"),
    pytest.param(["--set", "counter = 1", "--where", "true; COMMIT; DROP TABLE victim"],
                 id="where-commit"),
    pytest.param(["--set", "counter = 1", "--where", "true --"], id="where-line-comment"),
    pytest.param(["--set", "counter = 1", "--where", "true) --"], id="where-close-comment"),
    pytest.param(["--set", "counter = 1", "--where", "true /* */ OR true"],
                 id="where-block-comment"),
    pytest.param(["--set", "counter = 1", "--where", "true */ OR true /*"],
                 id="where-block-comment-closing"),
    pytest.param(["--set", "counter = 1", "--where", "$$ ) OR (true"], id="where-dollar"),
    pytest.param(["--set", "counter = 1", "--where", "(true"], id="where-unbalanced-open"),
    pytest.param(["--set", "counter = 1", "--where", "true))"], id="where-unbalanced-close"),
    pytest.param(["--set", "counter = 1; DROP TABLE victim"], id="set-;"),
    pytest.param(["--set", "counter = 1), note = (note"], id="set-second-assignment"),
    pytest.param(["--set", "counter = 1 --"], id="set-comment"),
    pytest.param(["--set", "counter = 1 FROM victim"], id="set-from"),
    pytest.param(["--sql", "UPDATE items SET counter = 1 WHERE id BETWEEN %(lower)s AND "
                  "%(upper)s; DROP TABLE victim"], id="sql-;"),
    pytest.param(["--sql", "UPDATE items SET counter = 1 WHERE id BETWEEN %(lower)s AND "
                  "%(upper)s; COMMIT"], id="sql-commit"),
    pytest.param(["--sql", "DROP TABLE victim /* %(lower)s %(upper)s */"], id="sql-ddl"),
    pytest.param(["--sql", "DO $$ BEGIN DROP TABLE victim; END $$ /* %(lower)s %(upper)s */"],
                 id="sql-do"),
    pytest.param(["--kind", "delete", "--where", "id < 0) OR (true"], id="delete-or-true"),
    pytest.param(["--dest", "victim; DROP TABLE victim"], id="dest-name"),
    pytest.param(["--set", "counter = 1", "--key", "id; DROP TABLE victim"], id="key-name"),
]


@pytest.mark.parametrize("args", SMUGGLED_JOBS)
def test_the_smuggling_catalogue_is_refused_with_nothing_written(
    dsn: str, conn: Conn, victim: tuple[int, int], args: list[str]
) -> None:
    res = cli(dsn, "enqueue", "-t", "items", *args)
    assert_refused(res, 2)
    assert_intact(conn, victim)
    assert_no_jobs(conn)


def test_odd_looking_but_legal_fragments_still_work(
    dsn: str, conn: Conn, victim: tuple[int, int]
) -> None:
    """A semicolon, a percent, a comment marker or a dollar quote inside a literal."""
    job = int(assert_ok(cli(
        dsn, "enqueue", "-t", "items", "--set", "note = 'a;b%c--d' || $$)$$",
        "--set", "counter = counter + 1", "--where", "val % 7 = 0 AND note IS NULL",
        "-q")).stdout)
    assert_ok(cli(dsn, "run", str(job), "--no-progress", "--skip-preflight"))
    assert conn.execute("SELECT count(*) FROM items WHERE note = 'a;b%c--d)' AND counter = 1"
                        ).fetchone() == (len([i for i in range(1, ROWS + 1) if i % 100 % 7 == 0]),)
    assert conn.execute("SELECT count(*) FROM items WHERE counter <> 0 AND val % 7 <> 0"
                        ).fetchone() == (0,)
    sql_job = int(assert_ok(cli(
        dsn, "enqueue", "-t", "items", "--sql",
        "UPDATE items SET note = 'x;50%%' WHERE id BETWEEN %(lower)s AND %(upper)s", "-q")).stdout)
    assert_ok(cli(dsn, "run", str(sql_job), "--no-progress", "--skip-preflight"))
    assert conn.execute("SELECT count(*) FROM items WHERE note = 'x;50%'").fetchone() == (ROWS,)


def _migration(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text('id = "m-smuggle"\n[[operations]]\n' + body)
    return path


def test_migrate_plan_does_not_run_sql_smuggled_into_a_type(
    dsn: str, conn: Conn, victim: tuple[int, int], tmp_path: Path
) -> None:
    """Was: exit 0, and ``victim`` dropped by a command documented as writing nothing."""
    path = _migration(tmp_path, 'op = "add_column"\ntable = "items"\ncolumn = "extra"\n'
                                'type = "int; COMMIT; DROP TABLE victim; SELECT NULL::int"\n')
    res = cli(dsn, "migrate", "plan", str(path))
    assert_refused(res, 2, "type", "one type")
    assert_intact(conn, victim)
    assert conn.execute("SELECT count(*) FROM backfill.migrations").fetchone() == (0,)


SMUGGLED_MIGRATIONS = [
    pytest.param('op = "add_column"\ntable = "items"\ncolumn = "extra"\ntype = "int"\n'
                 'default = "0; COMMIT; DROP TABLE victim; SELECT 0"\n', id="default"),
    pytest.param('op = "add_column"\ntable = "items"\ncolumn = "extra"\ntype = "int"\n'
                 'value = "val) FROM items; DROP TABLE victim; SELECT (1"\n', id="value"),
    pytest.param('op = "change_type"\ntable = "items"\ncolumn = "val"\ntype = "bigint"\n'
                 'using = "val::bigint --"\n', id="using-comment"),
    pytest.param('op = "add_check"\ntable = "items"\nname = "c"\n'
                 'check = "true) NOT VALID; DROP TABLE victim; SELECT (true"\n', id="check"),
    pytest.param('op = "create_index"\ntable = "items"\ncolumns = ["val"]\n'
                 'where = "true /* */"\n', id="index-where-comment"),
    pytest.param('op = "create_index"\ntable = "items"\nexpression = "$$"\n',
                 id="index-expression-dollar"),
    pytest.param('op = "backfill"\ntable = "items"\nset = { counter = "1), note = (note" }\n',
                 id="backfill-set"),
    pytest.param('op = "sql"\nup = "CREATE TABLE extra (a int); COMMIT; DROP TABLE victim"\n'
                 'allow = ["drop-table"]\n', id="raw-sql-commit"),
    pytest.param('op = "sql"\nup = "BEGIN; CREATE TABLE extra (a int)"\n', id="raw-sql-begin"),
    pytest.param('op = "create_table"\ntable = "extra"\ncolumns = [{ name = "a", type = '
                 '"int PRIMARY KEY); DROP TABLE victim; CREATE TABLE x (a int" }]\n',
                 id="create-table-type"),
    pytest.param('op = "add_column"\ntable = "items; DROP TABLE victim"\ncolumn = "x"\n'
                 'type = "int"\n', id="table-name"),
]


@pytest.mark.parametrize("body", SMUGGLED_MIGRATIONS)
def test_migration_smuggling_catalogue_is_refused(
    dsn: str, conn: Conn, victim: tuple[int, int], tmp_path: Path, body: str
) -> None:
    for command in ("plan", "start"):
        res = cli(dsn, "migrate", command, str(_migration(tmp_path, body)))
        assert_refused(res, 2)
        assert_intact(conn, victim)
    assert conn.execute("SELECT count(*) FROM backfill.migrations").fetchone() == (0,)
    assert conn.execute("SELECT to_regclass('public.extra')").fetchone() == (None,)


def test_a_migration_plan_is_rolled_back(dsn: str, conn: Conn, victim: tuple[int, int]) -> None:
    mig = parse('id = "m-ok"\n[[operations]]\nop = "add_column"\ntable = "items"\n'
                'column = "extra"\ntype = "numeric(12,2)"\ndefault = "0"\n', "m.toml")
    plans = Migrator(dsn, actor="tester").plan(mig)
    assert plans
    assert plans[0].steps
    assert conn.execute("SELECT count(*) FROM information_schema.columns WHERE "
                        "table_name = 'items' AND column_name = 'extra'").fetchone() == (0,)


def test_a_probe_cannot_commit_and_write(dsn: str, conn: Conn, victim: tuple[int, int]) -> None:
    """Was: the probe's read-only transaction ended at its COMMIT and the DROP ran."""
    with pytest.raises(InvalidFragment):
        ControllerConfig.from_mapping({"probes": {"p": {
            "sql": "SELECT 1; COMMIT; DROP TABLE victim", "max": 5}}})
    reading = probe(conn, Probe("p", "SELECT 1; COMMIT; DROP TABLE victim", Limit(5, 4)))
    assert reading.value is None
    assert reading.error
    assert_intact(conn, victim)
    ok = probe(conn, Probe("q", "SELECT count(*) FROM victim WHERE id::text LIKE '1%'",
                           Limit(50, 40)))
    assert ok.value == 2.0


# -- item 3: names as SQL writes them ----------------------------------------------------------


@pytest.fixture
def odd_names(conn: Conn) -> None:
    conn.execute('CREATE SCHEMA "Sales Data"')
    for table in ('"Sales Data"."Order-Items"', "t1", 'public."a.b"', '"my table"'):
        conn.execute(f"""CREATE TABLE {table} ("Id" bigint PRIMARY KEY, "Qty, each" int NOT NULL,
                         counter int NOT NULL DEFAULT 0)""")
        conn.execute(f'INSERT INTO {table} ("Id", "Qty, each") '
                     "SELECT g, g FROM generate_series(1, 300) g")
    conn.execute('CREATE TABLE "Sales Data"."Archive" ("Id" bigint PRIMARY KEY, '
                 '"Qty, each" int NOT NULL, counter int NOT NULL DEFAULT 0)')


@pytest.mark.parametrize(("written", "table"), [
    pytest.param('"Sales Data"."Order-Items"', '"Sales Data"."Order-Items"', id="quoted-schema"),
    pytest.param("T1", "t1", id="unquoted-folds"),
    pytest.param('"a.b"', 'public."a.b"', id="dot-in-name"),
    pytest.param('public."a.b"', 'public."a.b"', id="dot-in-name-qualified"),
    pytest.param('"my table"', '"my table"', id="space-in-name"),
])
def test_tables_named_as_sql_writes_them_enqueue_preflight_and_run(
    dsn: str, conn: Conn, odd_names: None, written: str, table: str
) -> None:
    job = int(assert_ok(cli(dsn, "enqueue", "-t", written, "--set", "counter = counter + 1",
                            "--key", '"Id"', "-q")).stdout)
    res = assert_ok(cli(dsn, "preflight", str(job), "--json"))
    assert '"invalid indexes"' in res.stdout
    assert_ok(cli(dsn, "run", str(job), "--no-progress"))      # with its pre-flight
    assert conn.execute(f"SELECT count(*) FROM {table} WHERE counter = 1").fetchone() == (300,)


def test_key_and_columns_read_quoted_names_with_commas(
    dsn: str, conn: Conn, odd_names: None
) -> None:
    job = int(assert_ok(cli(
        dsn, "enqueue", "-t", '"Sales Data"."Order-Items"', "--dest", '"Sales Data"."Archive"',
        "--columns", '"Id", "Qty, each"', "--key", '"Id"', "-q")).stdout)
    assert_ok(cli(dsn, "run", str(job), "--no-progress"))
    assert conn.execute('SELECT count(*), sum("Qty, each") FROM "Sales Data"."Archive"'
                        ).fetchone() == (300, 300 * 301 // 2)
    # The controller finds both tables (the destination by its name, read and quoted).
    record = Backfill(dsn).get(job)
    with psycopg.connect(dsn, autocommit=True) as c:
        oids = _tables(c, record)
        want = c.execute("""SELECT '"Sales Data"."Order-Items"'::regclass::oid,
                                   '"Sales Data"."Archive"'::regclass::oid""").fetchone()
    assert want is not None
    assert oids == (int(want[0]), int(want[1]))


def test_preflight_checks_the_table_the_job_names(dsn: str, conn: Conn) -> None:
    """Was: a job on "Acct"."T" had its invalid indexes looked up on acct.t."""
    conn.execute('CREATE SCHEMA "Acct"')
    conn.execute('CREATE TABLE "Acct"."T" (id bigint PRIMARY KEY, v int)')
    conn.execute('INSERT INTO "Acct"."T" SELECT g, g FROM generate_series(1, 100) g')
    conn.execute("CREATE SCHEMA acct")
    conn.execute("CREATE TABLE acct.t (id bigint PRIMARY KEY, v int)")
    conn.execute("INSERT INTO acct.t VALUES (1, 1), (2, 1)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY t_v ON acct.t (v)")   # left INVALID
    bf = Backfill(dsn)
    job = bf.enqueue(update('"Acct"."T"', {"v": "v + 1"}))
    assert job.table == '"Acct"."T"'
    checks = {c.name: c for c in bf.preflight(job.id)}
    assert checks["invalid indexes"].status == "pass", checks["invalid indexes"]
    assert bf.run(job.id).state == JobState.SUCCEEDED
    # ... and one on the job's own table is found.
    other = bf.enqueue(update("acct.t", {"v": "v"}, undo_log=False))
    checks = {c.name: c for c in bf.preflight(other.id)}
    assert checks["invalid indexes"].status == "fail"
    assert "t_v" in checks["invalid indexes"].reason


def test_the_api_reads_names_the_same_way(dsn: str, conn: Conn, odd_names: None) -> None:
    bf = Backfill(dsn)
    job = bf.enqueue(copy('"Sales Data"."Order-Items"', '"Sales Data"."Archive"',
                          columns='"Id", "Qty, each"', key='"Id"'))
    assert job.key_columns == ("Id",)
    assert bf.run(job.id).state == JobState.SUCCEEDED
    assert bf.enqueue(update("T1", {"Counter": "1"}, key='"Id"')).table == "public.t1"


def test_a_stored_job_is_checked_again_where_its_text_is_used(
    dsn: str, conn: Conn, victim: tuple[int, int]
) -> None:
    """A job stored before the gate (or edited in the state schema) still shows and cancels,
    but does not run."""
    job = int(assert_ok(cli(dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1",
                            "-q")).stdout)
    conn.execute("""UPDATE backfill.jobs SET spec = jsonb_set(spec, '{where}',
                    '"true) OR (true"') WHERE id = %s""", (job,))
    assert_ok(cli(dsn, "show", str(job)))
    assert_refused(cli(dsn, "run", str(job), "--no-progress", "--skip-preflight"), 2,
                   "true) OR (true")
    assert_refused(cli(dsn, "run", str(job), "--dry-run"), 2, "true) OR (true")
    assert_intact(conn, victim)
    assert_ok(cli(dsn, "cancel", str(job)))


def test_a_migration_on_a_table_whose_name_needs_quotes(
    dsn: str, conn: Conn, odd_names: None, tmp_path: Path
) -> None:
    conn.execute('ANALYZE "Sales Data"."Order-Items"')
    path = tmp_path / "m.toml"
    path.write_text('id = "m-quoted"\n[[operations]]\nop = "add_column"\n'
                    'table = \'"Sales Data"."Order-Items"\'\ncolumn = "Extra"\ntype = "bigint"\n'
                    'value = \'"Qty, each" * 2\'\nnot_null = true\n')
    plan = assert_ok(cli(dsn, "migrate", "plan", str(path))).stdout
    assert '"Sales Data"."Order-Items"' in plan
    assert "300 rows" in plan                    # its size, found under its quoted name
    assert_ok(cli(dsn, "migrate", "start", str(path)))
    assert_ok(cli(dsn, "migrate", "complete", "m-quoted"))
    assert conn.execute('SELECT count(*) FROM "Sales Data"."Order-Items" '
                        'WHERE extra = "Qty, each" * 2').fetchone() == (300,)
