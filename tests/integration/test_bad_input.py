"""Bad input fails before the first write, with a message that says what to fix (invariant 4).

Every test runs the real CLI as a subprocess against a real PostgreSQL database and checks four
things about a refused command: the exit code (2 for input the user must fix, 1 for operational
trouble such as a missing state schema or an unreachable server), a message on stderr naming the
thing to fix, no Python traceback, and no writes at all: the user table's checksum is unchanged
and ``backfill.jobs`` / ``backfill.events`` hold nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.timeout(180)

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 60
STATE_TABLES = ("jobs", "events", "slices", "batches")
DEFINED_JOB = "demo_fill_total"
FILL_TOTAL = "total_cents = quantity::bigint * unit_price_cents"

Conn = psycopg.Connection[Any]


# -- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:  # what pytest shows when an assertion fails
        return (f"backfill {' '.join(self.args)} -> exit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")


def cli(dsn: str, *args: str) -> Result:
    """Run ``python -m backfill.cli.main --dsn DSN ARGS`` the way an operator's script would."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BACKFILL_DSN", "DATABASE_URL", "BACKFILL_JOBS_MODULE")}
    env["BACKFILL_LOG_FORMAT"] = "json"
    env["BACKFILL_ACTOR"] = "tester@bad-input"
    proc = subprocess.run(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dsn, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )
    return Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def message_lines(res: Result) -> list[str]:
    """stderr without the JSON log lines: what a human reads."""
    return [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith("{")]


def assert_refused(res: Result, code: int, *words: str) -> str:
    """The command failed with ``code``, said ``words`` on stderr, and did not crash."""
    assert "Traceback" not in res.stderr, res
    assert "Traceback" not in res.stdout, res
    assert res.returncode == code, res
    message = " ".join(" ".join(message_lines(res)).split())  # undo line wrapping
    assert message.lower().startswith("error:"), res
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in the message\n{res}"
    return message


def assert_ok(res: Result) -> Result:
    assert "Traceback" not in res.stderr, res
    assert res.returncode == 0, res
    return res


def checksum(conn: Conn, table: str) -> tuple[int, int]:
    """(count, sum of the first 64 bits of each row's md5): changes if any row changes."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint), 0)"
        " FROM {} t").format(sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def state(conn: Conn) -> dict[str, Any]:
    """Everything the state schema holds: row counts and the jobs' full rows."""
    snap: dict[str, Any] = {}
    for t in STATE_TABLES:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("backfill", t))).fetchone()
        assert row is not None
        snap[t] = int(row[0])
    snap["job_rows"] = [r[0] for r in conn.execute(
        "SELECT j::text FROM backfill.jobs j ORDER BY id").fetchall()]
    return snap


def assert_no_jobs(conn: Conn) -> None:
    snap = state(conn)
    assert snap["jobs"] == 0, snap
    assert snap["events"] == 0, snap
    assert snap["slices"] == 0, snap
    assert snap["batches"] == 0, snap


def make_demo(conn: Conn, rows: int) -> None:
    """The README demo table, ``total_cents`` still NULL everywhere."""
    conn.execute(
        """CREATE TABLE demo_orders (
               id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               quantity         int NOT NULL,
               unit_price_cents int NOT NULL,
               total_cents      bigint)""")
    conn.execute(
        """INSERT INTO demo_orders (quantity, unit_price_cents)
           SELECT 1 + g %% 7, 100 + g %% 1000 FROM generate_series(1, %s) g""", (rows,))


def enqueue_defined(dsn: str) -> int:
    res = assert_ok(cli(dsn, "enqueue", DEFINED_JOB, "-q"))
    return int(res.stdout.strip())


@pytest.fixture
def demo(conn: Conn) -> tuple[int, int]:
    """demo_orders with 200 rows; returns its checksum."""
    make_demo(conn, 200)
    return checksum(conn, "demo_orders")


# -- tables, columns, SET and WHERE ------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    pytest.param(["-t", "nosuch_table", "--set", "total_cents = 1"],
                 ["nosuch_table", "does not exist"], id="unknown-table"),
    pytest.param(["-t", "nosuch_schema.demo_orders", "--set", "total_cents = 1"],
                 ["nosuch_schema.demo_orders", "does not exist"], id="unknown-schema"),
    pytest.param(["-t", "a.b.c", "--set", "total_cents = 1"],
                 ["a.b.c", "table name"], id="malformed-table-name"),
    pytest.param(["-t", "demo_orders", "--set", "nosuch_col = 1"],
                 ["nosuch_col", "does not exist", "demo_orders"], id="unknown-set-column"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = nosuch_col * 2"],
                 ["nosuch_col", "does not exist"], id="unknown-column-in-expression"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = quantity +* 2"],
                 ["+*", "SET"], id="set-does-not-parse-operator"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = (quantity * 2"],
                 ["syntax error", "SET"], id="set-does-not-parse-syntax"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents"],
                 ["cannot parse SET", "total_cents", "column = expression"], id="set-not-assignment"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = 'abc' || now()::date - 1"],
                 ["total_cents", "bigint", "text"], id="set-type-mismatch"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = 'x'"],
                 ["bigint", '"x"'], id="set-text-into-bigint"),
    pytest.param(["-t", "demo_orders", "--set", "total_cents = 1", "--set", "total_cents = 2"],
                 ["assigned twice"], id="set-column-twice"),
    pytest.param(["-t", "demo_orders", "--set", FILL_TOTAL, "--where", "nosuch_col > 0"],
                 ["nosuch_col", "WHERE"], id="where-unknown-column"),
    pytest.param(["-t", "demo_orders", "--set", FILL_TOTAL, "--where", "quantity"],
                 ["boolean", "WHERE"], id="where-not-boolean"),
    pytest.param(["-t", "demo_orders", "--set", FILL_TOTAL, "--where", "quantity >"],
                 ["syntax error", "WHERE"], id="where-syntax-error"),
    pytest.param(["-t", "demo_orders", "--set", FILL_TOTAL, "--where", "quantity = 'many'"],
                 ['"many"', "WHERE"], id="where-bad-literal"),
    pytest.param(["-t", "demo_orders", "--set", FILL_TOTAL, "--where", "true; DROP TABLE demo_orders"],
                 ["one expression", "2 statements", "WHERE"], id="where-second-statement"),
])
def test_bad_table_set_or_where_is_refused_before_any_write(
    dsn: str, conn: Conn, demo: tuple[int, int], args: list[str], words: list[str]
) -> None:
    res = cli(dsn, "enqueue", *args)
    assert_refused(res, 2, *words)
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


# -- keys ---------------------------------------------------------------------------------------


@pytest.fixture
def keyless(conn: Conn) -> tuple[int, int]:
    """A table with no primary key and only unusable indexes; returns its checksum."""
    conn.execute(
        """CREATE TABLE keyless (
               id    bigint NOT NULL,   -- unique only under a predicate
               code  text NOT NULL,     -- indexed, not unique
               maybe integer,           -- unique, nullable
               score real NOT NULL,     -- unique, not null, unsupported key type
               plain bigint NOT NULL,   -- not null, no index at all
               val   integer)""")
    conn.execute("CREATE UNIQUE INDEX keyless_id_positive ON keyless (id) WHERE id > 0")
    conn.execute("CREATE INDEX keyless_code ON keyless (code)")
    conn.execute("CREATE UNIQUE INDEX keyless_maybe ON keyless (maybe)")
    conn.execute("CREATE UNIQUE INDEX keyless_score ON keyless (score)")
    conn.execute("INSERT INTO keyless SELECT g, 'c' || g % 10, g, g, g, NULL FROM generate_series(1, 200) g")
    return checksum(conn, "keyless")


@pytest.mark.parametrize(("key_args", "words"), [
    pytest.param([], ["keyless", "no primary key", "--key"], id="no-primary-key"),
    pytest.param(["--key", "code"], ["code", "not unique"], id="non-unique-index-only"),
    pytest.param(["--key", "id"], ["(id)", "not unique", "predicate"], id="partial-unique-index-only"),
    pytest.param(["--key", "plain"], ["(plain)", "not unique"], id="no-index-at-all"),
    pytest.param(["--key", "maybe"], ["maybe", "nullable", "NOT NULL"], id="nullable"),
    pytest.param(["--key", "score"], ["score", "real", "not supported"], id="unsupported-type"),
    pytest.param(["--key", "nosuch_col"], ["nosuch_col", "does not exist"], id="unknown-column"),
    pytest.param(["--key", "code,code"], ["code", "twice"], id="column-twice"),
])
def test_unusable_key_is_refused_before_any_write(
    dsn: str, conn: Conn, keyless: tuple[int, int], key_args: list[str], words: list[str]
) -> None:
    res = cli(dsn, "enqueue", "-t", "keyless", "--set", "val = 1", *key_args)
    assert_refused(res, 2, *words)
    assert checksum(conn, "keyless") == keyless
    assert_no_jobs(conn)


# -- unknown jobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    pytest.param(["run", "nosuch"], id="run-name"),
    pytest.param(["run", "nosuch", "--dry-run"], id="dry-run-name"),
    pytest.param(["show", "nosuch"], id="show-name"),
    pytest.param(["status", "nosuch"], id="status-name"),
    pytest.param(["pause", "nosuch"], id="pause-name"),
    pytest.param(["show", "999"], id="show-id"),
    pytest.param(["pause", "999"], id="pause-id"),
    pytest.param(["resume", "999"], id="resume-id"),
    pytest.param(["cancel", "999"], id="cancel-id"),
    pytest.param(["retry", "999"], id="retry-id"),
    pytest.param(["tune", "999", "--batch-size", "10"], id="tune-id"),
    pytest.param(["run", "999"], id="run-id"),
    pytest.param(["run", "999", "--dry-run"], id="dry-run-id"),
    pytest.param(["verify", "999"], id="verify-id"),
])
def test_unknown_job_is_refused(dsn: str, conn: Conn, demo: tuple[int, int], args: list[str]) -> None:
    res = cli(dsn, *args)
    assert_refused(res, 2, "no job", args[1])
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


def test_unknown_defined_job_is_refused_and_lists_the_defined_ones(
    dsn: str, conn: Conn, demo: tuple[int, int]
) -> None:
    res = cli(dsn, "enqueue", "nosuch_defined")
    assert_refused(res, 2, "no defined job", "nosuch_defined", DEFINED_JOB)
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


# -- malformed options --------------------------------------------------------------------------

MALFORMED_OPTIONS = [
    pytest.param(["--batch-size", "0"], ["batch_size", "positive", "0"], id="batch-size-0"),
    pytest.param(["--batch-size", "-5"], ["batch_size", "positive", "-5"], id="batch-size-negative"),
    pytest.param(["--batch-size", "abc"], ["batch_size", "integer", "abc"], id="batch-size-abc"),
    pytest.param(["--target-duration", "5parsecs"], ["target_duration", "5parsecs", "2s"],
                 id="target-duration-parsecs"),
    pytest.param(["--target-duration", "0"], ["target_duration", "positive"], id="target-duration-0"),
    pytest.param(["--rate", "-1"], ["rate", "positive", "-1"], id="rate-negative"),
    pytest.param(["--rate", "fast"], ["rate", "number", "fast"], id="rate-fast"),
    pytest.param(["--lock-timeout", ""], ["lock_timeout", "empty"], id="lock-timeout-empty"),
    pytest.param(["--statement-timeout", "0"], ["statement_timeout", "positive"],
                 id="statement-timeout-0"),
    pytest.param(["--pause", "-1s"], ["pause", "-1s"], id="pause-negative"),
    pytest.param(["--max-retries", "-1"], ["max_retries", "-1"], id="max-retries-negative"),
    pytest.param(["--min-batch-size", "5000"], ["min_batch_size", "5000", "batch_size"],
                 id="min-above-batch-size"),
]


@pytest.mark.parametrize(("option", "words"), MALFORMED_OPTIONS)
def test_malformed_option_on_enqueue_is_refused(
    dsn: str, conn: Conn, demo: tuple[int, int], option: list[str], words: list[str]
) -> None:
    res = cli(dsn, "enqueue", "-t", "demo_orders", "--set", FILL_TOTAL, *option)
    assert_refused(res, 2, *words)
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


@pytest.mark.parametrize(("option", "words"), MALFORMED_OPTIONS)
def test_malformed_option_on_tune_leaves_the_job_alone(
    dsn: str, conn: Conn, demo: tuple[int, int], option: list[str], words: list[str]
) -> None:
    job_id = enqueue_defined(dsn)
    before = state(conn)
    res = cli(dsn, "tune", str(job_id), *option)
    assert_refused(res, 2, *words)
    assert state(conn) == before
    assert checksum(conn, "demo_orders") == demo


@pytest.mark.parametrize("option", [
    pytest.param(["--rate", "nan"], id="rate-nan"),
    pytest.param(["--target-duration", "nan"], id="target-duration-nan"),
    pytest.param(["--target-duration", "inf"], id="target-duration-inf"),
    pytest.param(["--statement-timeout", "nan"], id="statement-timeout-nan"),
])
def test_non_finite_option_is_refused(
    dsn: str, conn: Conn, demo: tuple[int, int], option: list[str]
) -> None:
    res = cli(dsn, "enqueue", "-t", "demo_orders", "--set", FILL_TOTAL, *option)
    assert_refused(res, 2, option[0].lstrip("-").replace("-", "_"))
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


# -- conflicting jobs ---------------------------------------------------------------------------


def test_second_active_job_on_same_columns_is_refused(
    dsn: str, conn: Conn, demo: tuple[int, int]
) -> None:
    first = assert_ok(cli(dsn, "enqueue", "-t", "demo_orders", "--set", FILL_TOTAL, "-q"))
    job_id = int(first.stdout.strip())
    after_first = state(conn)
    assert after_first["jobs"] == 1
    assert after_first["events"] == 1

    again = cli(dsn, "enqueue", "-t", "demo_orders", "--set", FILL_TOTAL)
    assert_refused(again, 2, f"job {job_id}", "total_cents", f"backfill cancel {job_id}")
    # The defined job writes the same column of the same table: refused as well.
    defined = cli(dsn, "enqueue", DEFINED_JOB)
    assert_refused(defined, 2, f"job {job_id}", "total_cents")

    assert state(conn) == after_first
    assert checksum(conn, "demo_orders") == demo


def test_overlapping_columns_conflict_and_disjoint_ones_do_not(dsn: str, conn: Conn) -> None:
    conn.execute("CREATE TABLE wide (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                 " a int, b int, c int)")
    conn.execute("INSERT INTO wide (a, b, c) SELECT g, g, g FROM generate_series(1, 100) g")
    before = checksum(conn, "wide")
    first = assert_ok(cli(dsn, "enqueue", "-t", "wide", "--set", "a = 1", "--set", "b = 2", "-q"))
    job_id = int(first.stdout.strip())
    after_first = state(conn)

    for args in (["--set", "b = 3"],
                 ["--set", "c = 3", "--set", "a = 3"],
                 ["--kind", "delete", "--where", "c = 0"]):  # a delete writes every column
        res = cli(dsn, "enqueue", "-t", "wide", *args)
        assert_refused(res, 2, f"job {job_id}", "wide")
        assert state(conn) == after_first, args

    # Control: a job on a column nobody writes is accepted, so the refusals above are specific.
    assert_ok(cli(dsn, "enqueue", "-t", "wide", "--set", "c = 3"))
    assert state(conn)["jobs"] == 2
    assert checksum(conn, "wide") == before


# -- state schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    pytest.param(["list"], id="list"),
    pytest.param(["show", "1"], id="show"),
    pytest.param(["pause", "1"], id="pause"),
    pytest.param(["enqueue", DEFINED_JOB], id="enqueue-defined"),
    pytest.param(["enqueue", "-t", "demo_orders", "--set", FILL_TOTAL], id="enqueue-adhoc"),
    pytest.param(["run", DEFINED_JOB], id="run"),
    pytest.param(["run", DEFINED_JOB, "--dry-run"], id="dry-run"),
])
def test_missing_state_schema_says_to_run_db_upgrade(bare_dsn: str, args: list[str]) -> None:
    with psycopg.connect(bare_dsn, autocommit=True) as bare:
        make_demo(bare, 50)
        before = checksum(bare, "demo_orders")
        res = cli(bare_dsn, *args)
        assert_refused(res, 1, "state schema", "missing", "backfill db upgrade")
        assert checksum(bare, "demo_orders") == before
        row = bare.execute("SELECT to_regnamespace('backfill')").fetchone()
        assert row is not None
        assert row[0] is None, "a refused command created the state schema"


def test_db_upgrade_makes_a_bare_database_usable(bare_dsn: str) -> None:
    assert_refused(cli(bare_dsn, "list"), 1, "backfill db upgrade")
    status = cli(bare_dsn, "db", "status")
    assert status.returncode == 1, status
    assert "missing" in status.stdout
    assert "upgraded from version 0" in assert_ok(cli(bare_dsn, "db", "upgrade")).stdout
    assert "no jobs" in assert_ok(cli(bare_dsn, "list")).stdout
    assert "already at version" in assert_ok(cli(bare_dsn, "db", "upgrade")).stdout


@pytest.mark.parametrize("args", [
    pytest.param(["list"], id="list"),
    pytest.param(["enqueue", DEFINED_JOB], id="enqueue"),
    pytest.param(["show", "1"], id="show"),
])
def test_outdated_state_schema_says_to_run_db_upgrade(
    dsn: str, conn: Conn, demo: tuple[int, int], args: list[str]
) -> None:
    conn.execute("DELETE FROM backfill.schema_version")
    conn.execute("INSERT INTO backfill.schema_version (version, description) VALUES (0, 'simulated')")
    res = cli(dsn, *args)
    assert_refused(res, 1, "outdated", "version 0", "backfill db upgrade")
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)


def test_db_upgrade_brings_an_outdated_schema_to_current(dsn: str, conn: Conn) -> None:
    # A faithful "version 0" schema: the version table exists, migration 1 is not applied.
    conn.execute("DROP TABLE backfill.batches, backfill.events, backfill.slices, backfill.jobs, "
                 "backfill.heartbeat, backfill.controller, backfill.migration_events, "
                 "backfill.migration_steps, backfill.migrations")
    conn.execute("DROP FUNCTION backfill.events_append_only()")
    conn.execute("DELETE FROM backfill.schema_version")
    assert_refused(cli(dsn, "list"), 1, "outdated", "backfill db upgrade")
    assert "upgraded from version 0 to" in assert_ok(cli(dsn, "db", "upgrade")).stdout
    assert "no jobs" in assert_ok(cli(dsn, "list")).stdout
    assert_ok(cli(dsn, "db", "status"))


def test_db_upgrade_on_inconsistent_schema_fails_in_one_line(dsn: str, conn: Conn) -> None:
    conn.execute("DELETE FROM backfill.schema_version")
    conn.execute("INSERT INTO backfill.schema_version (version, description) VALUES (0, 'simulated')")
    res = cli(dsn, "db", "upgrade")
    assert "Traceback" not in res.stderr, res
    assert_refused(res, 1, "migration 1", "backfill.schema_version")


@pytest.mark.parametrize("args", [
    pytest.param(["list"], id="list"),
    pytest.param(["enqueue", DEFINED_JOB], id="enqueue"),
    pytest.param(["db", "upgrade"], id="db-upgrade"),
])
def test_newer_state_schema_says_to_upgrade_the_package(
    dsn: str, conn: Conn, demo: tuple[int, int], args: list[str]
) -> None:
    conn.execute("INSERT INTO backfill.schema_version (version, description) VALUES (999, 'future')")
    res = cli(dsn, *args)
    assert_refused(res, 1, "999", "newer", "upgrade the backfill package")
    assert checksum(conn, "demo_orders") == demo
    assert_no_jobs(conn)
    row = conn.execute("SELECT max(version) FROM backfill.schema_version").fetchone()
    assert row is not None
    assert row[0] == 999


# -- unreachable database -----------------------------------------------------------------------

SECRET = "hunter2"
UNREACHABLE = {
    "keyword": f"host=127.0.0.1 port=1 user=x password={SECRET} dbname=x",
    "url": f"postgresql://x:{SECRET}@127.0.0.1:1/x",
}


@pytest.mark.parametrize("dsn_form", sorted(UNREACHABLE))
@pytest.mark.parametrize("args", [
    pytest.param(["list"], id="list"),
    pytest.param(["show", "1"], id="show"),
    pytest.param(["enqueue", DEFINED_JOB], id="enqueue"),
    pytest.param(["run", DEFINED_JOB, "--dry-run"], id="dry-run"),
    pytest.param(["db", "upgrade"], id="db-upgrade"),
    pytest.param(["db", "status"], id="db-status"),
])
def test_unreachable_database_is_one_line_without_the_password(dsn_form: str, args: list[str]) -> None:
    res = cli(UNREACHABLE[dsn_form], *args)
    assert_refused(res, 1, "cannot connect", "127.0.0.1:1")
    assert len(message_lines(res)) == 1, res
    assert SECRET not in res.stdout
    assert SECRET not in res.stderr


def test_malformed_dsn_does_not_show_the_password() -> None:
    res = cli(f"host=127.0.0.1 port=1 password={SECRET} dbname", "list")
    assert "Traceback" not in res.stderr, res
    assert res.returncode == 2, res  # input the user must fix
    assert "malformed database dsn" in res.stderr.lower(), res
    assert SECRET not in res.stdout
    assert SECRET not in res.stderr


# -- operator commands illegal in the job's state ---------------------------------------------


@pytest.fixture
def succeeded_job(dsn: str, conn: Conn) -> int:
    """A tiny demo_fill_total job run to success with the CLI."""
    make_demo(conn, 100)
    job_id = enqueue_defined(dsn)
    res = assert_ok(cli(dsn, "run", str(job_id), "--no-progress"))
    assert f"job {job_id} succeeded" in res.stdout, res
    row = conn.execute("SELECT count(*) FROM demo_orders WHERE total_cents IS NULL").fetchone()
    assert row == (0,)
    return job_id


@pytest.mark.parametrize("args", [
    pytest.param(["pause"], id="pause"),
    pytest.param(["retry"], id="retry"),
    pytest.param(["resume"], id="resume"),
    pytest.param(["cancel"], id="cancel"),
    pytest.param(["tune", "--batch-size", "10"], id="tune"),
])
def test_operator_command_on_succeeded_job_is_refused(
    dsn: str, conn: Conn, succeeded_job: int, args: list[str]
) -> None:
    before, table_before = state(conn), checksum(conn, "demo_orders")
    res = cli(dsn, args[0], str(succeeded_job), *args[1:])
    message = assert_refused(res, 2, f"job {succeeded_job}", "succeeded")
    if args[0] != "tune":
        assert "already succeeded" in message
    assert state(conn) == before
    assert checksum(conn, "demo_orders") == table_before


@pytest.mark.parametrize(("job_state", "command"), [
    pytest.param("pending", "resume", id="resume-pending"),
    pytest.param("running", "resume", id="resume-running"),
    pytest.param("failed", "resume", id="resume-failed"),
    pytest.param("pending", "retry", id="retry-pending"),
    pytest.param("running", "retry", id="retry-running"),
    pytest.param("paused", "retry", id="retry-paused"),
])
def test_resume_or_retry_from_the_wrong_state_is_refused(
    dsn: str, conn: Conn, demo: tuple[int, int], job_state: str, command: str
) -> None:
    job_id = enqueue_defined(dsn)
    if job_state == "paused":
        assert_ok(cli(dsn, "pause", str(job_id)))
    elif job_state != "pending":  # a runner or a failure would put it there; simulate it
        conn.execute("UPDATE backfill.jobs SET state = %s WHERE id = %s", (job_state, job_id))
    before = state(conn)
    res = cli(dsn, command, str(job_id))
    assert_refused(res, 2, f"job {job_id}", job_state)
    assert state(conn) == before
    assert checksum(conn, "demo_orders") == demo


# -- dry run ------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(dsn: str, conn: Conn) -> None:
    make_demo(conn, 1000)
    before = checksum(conn, "demo_orders")
    res = assert_ok(cli(dsn, "run", DEFINED_JOB, "--dry-run"))
    out = res.stdout
    assert "nothing will be written" in out, res
    assert "public.demo_orders" in out, res
    assert "key:" in out, res
    assert "(id) bigint" in out, res
    assert "first batch:" in out, res
    assert "keys 1 .. 1000" in out, res
    assert "EXPLAIN" in out, res
    assert "Update on demo_orders" in out, res  # a plan line, not just the heading
    assert checksum(conn, "demo_orders") == before
    assert_no_jobs(conn)


def test_dry_run_json_writes_nothing(dsn: str, conn: Conn) -> None:
    make_demo(conn, 1000)
    before = checksum(conn, "demo_orders")
    res = assert_ok(cli(dsn, "run", DEFINED_JOB, "--dry-run", "--json"))
    plan = json.loads(res.stdout)
    assert plan["table"] == "public.demo_orders"
    assert plan["key"] == ["id"]
    assert plan["first_batch"] == ["1", "1000"]
    assert "Update on demo_orders" in plan["explain"]
    assert checksum(conn, "demo_orders") == before
    assert_no_jobs(conn)


def test_dry_run_of_an_enqueued_job_leaves_it_pending(dsn: str, conn: Conn, demo: tuple[int, int]) -> None:
    job_id = enqueue_defined(dsn)
    before = state(conn)
    res = assert_ok(cli(dsn, "run", str(job_id), "--dry-run"))
    assert "first batch:" in res.stdout, res
    assert state(conn) == before
    assert checksum(conn, "demo_orders") == demo
