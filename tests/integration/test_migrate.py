"""The migration workflow on a real PostgreSQL: expand/contract with both application versions
writing, crashes after every step, a killed concurrent index build, lock timeouts that retry
instead of queueing, the contract gate, rollback, split and merge."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backfill.core.errors import GateClosed, InvalidInput, MigrationError
from backfill.migrate.executor import Migrator
from backfill.migrate.file import parse
from backfill.migrate.steps import ordered_steps
from tests.integration.helpers import cli, cli_popen, scalar, wait_for

pytestmark = pytest.mark.timeout(240)

USERS = 3_000


def _users(dsn: str, rows: int = USERS) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL,
                     name varchar(50) NOT NULL, score int, bio text, team_id bigint)""")
        c.execute("CREATE TABLE teams (id bigint PRIMARY KEY, title text)")
        c.execute("INSERT INTO teams SELECT g, 't' || g FROM generate_series(1, 10) g")
        c.execute("""INSERT INTO users SELECT g, 'User' || g || '@Example.COM', 'name ' || g, g,
                     'bio ' || g, 1 + g %% 10 FROM generate_series(1, %s) g""", (rows,))
        c.execute("ANALYZE users")


FULL = """
id = "m-full"
description = "every operation kind on users"
[settings]
lock_timeout = "300ms"
retry_backoff = "50ms"
[backfill]
batch_size = 500

[[operations]]
op = "add_column"
table = "users"
column = "email_lower"
type = "text"
value = "lower(email)"
not_null = true

[[operations]]
op = "add_column"
table = "users"
column = "status"
type = "text"
default = "'active'"
not_null = true

[[operations]]
op = "rename_column"
table = "users"
column = "name"
to = "full_name"

[[operations]]
op = "change_type"
table = "users"
column = "score"
type = "bigint"

[[operations]]
op = "create_index"
table = "users"
columns = ["team_id"]

[[operations]]
op = "add_foreign_key"
table = "users"
columns = ["team_id"]
references = "teams"
on_delete = "set null"

[[operations]]
op = "add_check"
table = "users"
name = "users_score_positive"
check = "team_id > 0"

[[operations]]
op = "add_unique"
table = "users"
columns = ["email"]
"""


def _mig(text: str) -> Any:
    return parse(text, "test.toml")


def _schema(dsn: str) -> dict[str, Any]:
    """Columns, constraints, indexes, triggers and functions of the public schema."""
    with psycopg.connect(dsn, autocommit=True) as c:
        cols = c.execute(
            """SELECT table_name, column_name, data_type, is_nullable, column_default
               FROM information_schema.columns WHERE table_schema = 'public'
               ORDER BY 1, 2""").fetchall()
        cons = c.execute(
            """SELECT conrelid::regclass::text, conname, contype, convalidated
               FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"""
        ).fetchall()
        idx = c.execute(
            """SELECT indexrelid::regclass::text, indisvalid FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1""").fetchall()
        trg = c.execute("SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                        "WHERE NOT tgisinternal AND c.relnamespace = 'public'::regnamespace "
                        "ORDER BY 1").fetchall()
        fns = c.execute("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
                        "ORDER BY 1").fetchall()
    return {"columns": cols, "constraints": cons, "indexes": idx, "triggers": trg,
            "functions": fns}


def _events(dsn: str, mid: str) -> list[tuple[str, str | None, int | None, str, str]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            """SELECT kind, phase, step_no, message, actor FROM backfill.migration_events
               WHERE migration_id = %s ORDER BY id""", (mid,)).fetchall()


def _write_file(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


class _Writers:
    """Old and new application versions writing while the migration runs."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Writers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        next_id = 1_000_000
        try:
            with psycopg.connect(self.dsn, autocommit=True) as c:
                c.execute("SET lock_timeout = '5s'")
                i = 0
                while not self.stop.is_set():
                    i += 1
                    # The old application knows none of the new columns.
                    c.execute("INSERT INTO users (id, email, name, score, team_id) "
                              "VALUES (%s, %s, %s, %s, 3)",
                              (next_id, f"Old{next_id}@App.COM", f"old {next_id}", i))
                    next_id += 1
                    c.execute("UPDATE users SET name = name || '!', score = score + 1 "
                              "WHERE id = %s", (1 + (i * 37) % USERS,))
                    c.execute("DELETE FROM users WHERE id = %s", (USERS - (i % 50),))
                    self.writes += 3
                    time.sleep(0.005)
        except BaseException as exc:
            self.errors.append(exc)


def test_expand_backfill_contract_while_both_application_versions_write(dsn: str) -> None:
    _users(dsn)
    m = Migrator(dsn, actor="tester")
    mig = _mig(FULL)
    with _Writers(dsn) as w:
        rec = m.start(mig)
        wait_for(lambda: w.writes > 30, timeout=20, what="old-app writes")
    assert not w.errors, w.errors
    assert rec.state == "started"
    with psycopg.connect(dsn, autocommit=True) as c:
        # Between start and complete: the new application writes the new columns only.
        c.execute("INSERT INTO users (id, email, email_lower, full_name, bf_new_score, team_id) "
                  "VALUES (2000000, 'New@App.COM', 'new@app.com', 'new app', 5, 2)")
        c.execute("UPDATE users SET full_name = 'renamed by new app' WHERE id = 10")
        # ...and the old one still writes the old ones.
        c.execute("UPDATE users SET name = 'renamed by old app', score = 42 WHERE id = 11")
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT id, name, full_name, score, bf_new_score, email_lower, status FROM users "
            "WHERE id IN (10, 11, 2000000) ORDER BY id")}
    assert rows[10][:2] == ("renamed by new app", "renamed by new app")
    assert rows[11][:4] == ("renamed by old app", "renamed by old app", 42, 42)
    assert rows[2000000][:2] == ("new app", "new app")
    assert rows[2000000][3] == 5
    assert rows[2000000][2] == 5
    rec = m.complete("m-full")
    assert rec.state == "completed"
    with psycopg.connect(dsn, autocommit=True) as c:
        bad = c.execute("""SELECT count(*) FROM users WHERE email_lower IS DISTINCT FROM lower(email)
                           OR status IS DISTINCT FROM 'active' OR full_name IS NULL
                           OR score IS NULL""").fetchone()
        assert bad == (0,)
        n = c.execute("SELECT count(*) FROM users").fetchone()
        assert n
        assert n[0] > USERS - 60
    s = _schema(dsn)
    cols = {(t, col): (typ, nullable) for t, col, typ, nullable, _ in s["columns"]}
    assert cols[("users", "email_lower")] == ("text", "NO")
    assert cols[("users", "status")] == ("text", "NO")
    assert cols[("users", "full_name")] == ("character varying", "NO")
    assert cols[("users", "score")] == ("bigint", "YES")
    assert ("users", "name") not in cols
    assert ("users", "bf_new_score") not in cols
    cons = {name: (kind, valid) for _, name, kind, valid in s["constraints"]}
    assert cons["bf_fk_users_team_id"] == ("f", True)
    assert cons["users_score_positive"] == ("c", True)
    assert cons["bf_uq_users_email"] == ("u", True)
    assert not any(name.startswith("bf_nn_") for name in cons)   # the NOT NULL proofs are gone
    assert all(valid for _, valid in s["indexes"])
    assert s["triggers"] == []
    assert s["functions"] == []
    kinds = [e[0] for e in _events(dsn, "m-full")]
    assert "gate" in kinds
    assert kinds[-1] == "state"
    assert {e[4] for e in _events(dsn, "m-full")} == {"tester"}


def test_a_crash_after_any_step_is_repaired_by_running_the_command_again(
        dsn: str, admin_dsn: str, tmp_path: Path) -> None:
    """Kill the process right after each step in turn (the effect applied, nothing else
    recorded); each re-run continues where the last stopped, and the end state is the same
    as an uninterrupted run's."""
    text = FULL.replace('id = "m-full"', 'id = "m-crash"')
    path = _write_file(tmp_path, text)
    _users(dsn, 800)
    m = Migrator(dsn, actor="tester")
    steps = m.plan(_mig(text))
    from backfill.migrate.steps import ordered_steps
    ordered = ordered_steps(steps)
    n_start, n_complete = len(ordered["start"]), len(ordered["complete"])
    for phase, count, cmd in (("start", n_start, ["migrate", "start", str(path)]),
                              ("complete", n_complete, ["migrate", "complete", "m-crash"])):
        for k in range(1, count + 1):
            r = cli(dsn, *cmd, env={"BACKFILL_FAILPOINT": f"migrate:{phase}:{k}"})
            assert r.returncode == 137, (phase, k, r.stdout, r.stderr)
            done = scalar(dsn, "SELECT count(*) FROM backfill.migration_steps WHERE "
                          "migration_id = 'm-crash' AND phase = %s AND state = 'done'", (phase,))
            # The step the crash followed is either recorded (transactional: it committed
            # with its mark) or not yet (concurrent, backfill): never anything after it.
            assert done in (k - 1, k), (phase, k, done)
        r = cli(dsn, *cmd)
        assert r.returncode == 0, r.stderr
    crashed = _schema(dsn)
    crashed_rows = scalar(dsn, "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u")
    # The same migration without crashes, on a fresh copy of the same table.
    from tests.conftest import _create_db, _db_dsn, _drop_db
    fresh_name = _create_db(admin_dsn, "bf_template")
    try:
        fresh = _db_dsn(admin_dsn, fresh_name)
        _users(fresh, 800)
        Migrator(fresh, actor="tester").start(_mig(text))
        Migrator(fresh, actor="tester").complete("m-crash")
        assert _schema(fresh) == crashed
        assert scalar(fresh, "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u") \
            == crashed_rows
    finally:
        _drop_db(admin_dsn, fresh_name)
    # Every step is recorded done exactly once, and each backfill ran one job.
    dones = [(e[1], e[2]) for e in _events(dsn, "m-crash")
             if e[0] == "step" and "already built" not in e[3]]
    assert len(dones) == len(set(dones)) == n_start + n_complete
    assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 3   # status needs no backfill


def test_a_killed_concurrent_build_leaves_an_invalid_index_that_start_drops_and_rebuilds(
        dsn: str, tmp_path: Path) -> None:
    _users(dsn, 500)
    path = _write_file(tmp_path, 'id = "m-idx"\n[[operations]]\nop = "create_index"\n'
                                 'table = "users"\ncolumns = ["email"]\nunique = true\n')
    # An open transaction holding a snapshot: the build waits for it to end.
    old = psycopg.connect(dsn)
    old.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    old.execute("SELECT count(*) FROM teams")
    proc = cli_popen(dsn, "migrate", "start", str(path))
    try:
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                "'CREATE UNIQUE INDEX CONCURRENTLY%%' AND wait_event_type = 'Lock'"),
                 timeout=30, what="the build waiting for the old transaction")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # client_connection_check_interval: the orphaned build notices and stops.
        wait_for(lambda: not scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query "
                                    "LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%%'"),
                 timeout=15, what="the orphaned build to end")
    finally:
        if proc.poll() is None:
            proc.kill()
        old.rollback()
        old.close()
    assert scalar(dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = "
                       "'bf_idx_users_email'::regclass") is False
    r = cli(dsn, "migrate", "start", str(path))
    assert r.returncode == 0, r.stderr
    assert "dropped INVALID index" in r.stderr
    assert scalar(dsn, "SELECT indisvalid FROM pg_index WHERE indexrelid = "
                       "'bf_idx_users_email'::regclass") is True
    assert any(e[0] == "cleanup" for e in _events(dsn, "m-idx"))


def test_a_failed_unique_build_is_cleaned_up_and_reported(dsn: str) -> None:
    _users(dsn, 200)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET email = 'dup@x' WHERE id IN (1, 2)")
    m = Migrator(dsn, actor="tester")
    mig = _mig('id = "m-dup"\n[[operations]]\nop = "add_unique"\ntable = "users"\n'
               'columns = ["email"]\n')
    with pytest.raises(MigrationError, match=r"could not create unique index.*dropped"):
        m.start(mig)
    assert scalar(dsn, "SELECT to_regclass('bf_uq_users_email')") is None
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET email = 'unique@x' WHERE id = 2")
    assert m.start(mig).state == "started"
    assert scalar(dsn, "SELECT contype FROM pg_constraint WHERE conname = 'bf_uq_users_email'") \
        == "u"


@pytest.fixture
def blocker(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    _users(dsn, 200)
    c = psycopg.connect(dsn)
    c.execute("SELECT count(*) FROM users")      # holds ACCESS SHARE until rollback
    yield c
    c.rollback()
    c.close()


LOCKED = """
id = "m-lock"
[settings]
lock_timeout = "200ms"
retry_backoff = "100ms"
retry_backoff_max = "200ms"
lock_retries = {retries}
[[operations]]
op = "add_column"
table = "users"
column = "flag"
type = "boolean"
"""


def test_a_blocked_ddl_step_times_out_and_retries_instead_of_queueing_readers(
        dsn: str, blocker: psycopg.Connection[Any], tmp_path: Path) -> None:
    path = _write_file(tmp_path, LOCKED.format(retries=200))
    proc = cli_popen(dsn, "migrate", "start", str(path))
    try:
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM backfill.migration_events "
                                "WHERE kind = 'retry'") >= 3, timeout=30, what="retries")
        # Readers arriving meanwhile wait at most one lock_timeout behind the ALTER.
        with psycopg.connect(dsn, autocommit=True) as reader:
            reader.execute("SET statement_timeout = '2s'")
            for _ in range(10):
                t0 = time.monotonic()
                reader.execute("SELECT count(*) FROM users").fetchone()
                assert time.monotonic() - t0 < 1.0
        blocker.rollback()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert scalar(dsn, "SELECT count(*) FROM information_schema.columns WHERE column_name = "
                       "'flag'") == 1
    retry = scalar(dsn, "SELECT details FROM backfill.migration_events WHERE kind = 'retry' "
                        "ORDER BY id LIMIT 1")
    assert retry["holders"]
    assert retry["holders"][0]["pid"] == blocker.info.backend_pid


def test_when_retries_run_out_the_step_fails_clearly_and_a_rerun_continues(
        dsn: str, blocker: psycopg.Connection[Any], tmp_path: Path) -> None:
    path = _write_file(tmp_path, LOCKED.format(retries=2))
    r = cli(dsn, "migrate", "start", str(path))
    assert r.returncode == 1
    assert "could not take its lock in 3 attempts" in r.stderr
    assert f"held by pid {blocker.info.backend_pid}" in r.stderr
    assert "Traceback" not in r.stderr
    status = json.loads(cli(dsn, "migrate", "status", "m-lock", "--json").stdout)
    assert status["steps"][0]["state"] == "failed"
    blocker.rollback()
    r = cli(dsn, "migrate", "start", str(path))
    assert r.returncode == 0, r.stderr
    status = json.loads(cli(dsn, "migrate", "status", "m-lock", "--json").stdout)
    assert status["state"] == "started"
    assert status["last_error"] is None


GATED = """
id = "m-gate"
[[operations]]
op = "change_type"
table = "users"
column = "score"
type = "bigint"
down = false
[[operations]]
op = "create_index"
table = "users"
columns = ["team_id"]
"""


def test_the_gate_refuses_to_contract_until_the_backfill_is_done_and_verifies(
        dsn: str, tmp_path: Path) -> None:
    _users(dsn, 1000)
    path = _write_file(tmp_path, GATED)
    # The backfill goes to the workers (none run here): start stops, waiting.
    r = cli(dsn, "migrate", "start", str(path), "--workers", "--no-wait")
    assert r.returncode == 3, r.stderr
    r = cli(dsn, "migrate", "complete", "m-gate")
    assert r.returncode == 1
    assert "start has not finished" in r.stderr
    job = scalar(dsn, "SELECT id FROM backfill.jobs")
    with psycopg.connect(dsn, autocommit=True) as c:   # run the job here instead
        c.execute("UPDATE backfill.jobs SET runs_on = 'inline' WHERE id = %s", (job,))
    m = Migrator(dsn, actor="tester")
    assert m.start(_mig(GATED)).state == "started"
    # Drift: the new column no longer matches the old one, and the index is gone.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET bf_new_score = -1 WHERE id = 7")
        c.execute("DROP INDEX bf_idx_users_team_id")
    with pytest.raises(GateClosed) as info:
        m.complete("m-gate")
    assert "does not verify" in str(info.value)
    assert "no longer true: index bf_idx_users_team_id is valid" in str(info.value)
    assert scalar(dsn, "SELECT count(*) FROM backfill.migration_steps WHERE phase = 'complete' "
                       "AND state <> 'pending'") == 0
    assert scalar(dsn, "SELECT state FROM backfill.migrations") == "started"
    gate = [e for e in _events(dsn, "m-gate") if e[0] == "gate"]
    assert gate
    assert "complete refused" in gate[-1][3]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET bf_new_score = score WHERE id = 7")
        c.execute("CREATE INDEX bf_idx_users_team_id ON users (team_id)")
    assert m.complete("m-gate").state == "completed"


def test_rollback_undoes_whatever_start_did_and_is_refused_after_complete(
        dsn: str, tmp_path: Path) -> None:
    _users(dsn, 600)
    before = _schema(dsn)
    text = FULL.replace('id = "m-full"', 'id = "m-rb"')
    path = _write_file(tmp_path, text)
    # Stop start in the middle (right after the concurrent index build), then roll back.
    r = cli(dsn, "migrate", "start", str(path), env={"BACKFILL_FAILPOINT": "migrate:start:10"})
    assert r.returncode == 137
    r = cli(dsn, "migrate", "rollback", str(path))
    assert r.returncode == 0, r.stderr
    assert _schema(dsn) == before
    assert scalar(dsn, "SELECT state FROM backfill.migrations") == "rolled_back"
    # A rolled-back migration can start again, and once complete it cannot be rolled back.
    m = Migrator(dsn, actor="tester")
    m.start(_mig(text))
    assert _schema(dsn) != before
    # Rolling back a fully started migration restores the schema too, even when the process
    # dies after each rollback step in turn.
    n = scalar(dsn, "SELECT count(*) FROM backfill.migration_steps WHERE phase = 'rollback'")
    for k in range(1, n + 1):
        r = cli(dsn, "migrate", "rollback", "m-rb", env={"BACKFILL_FAILPOINT": f"migrate:rollback:{k}"})
        assert r.returncode == 137, (k, r.stderr)
    assert cli(dsn, "migrate", "rollback", "m-rb").returncode == 0
    assert _schema(dsn) == before
    assert scalar(dsn, "SELECT to_regnamespace('bf_v_m_rb')") is None   # the version schema
    r = cli(dsn, "migrate", "start", str(path))
    assert r.returncode == 0, r.stderr
    assert "search_path = bf_v_m_rb, public" in r.stdout
    m.complete("m-rb")
    assert scalar(dsn, "SELECT to_regnamespace('bf_v_m_rb')") is None
    with pytest.raises(MigrationError, match="no automatic rollback"):
        m.rollback("m-rb")


SPLIT = """
id = "m-split"
[[operations]]
op = "split_table"
table = "users"
into = "user_profiles"
columns = ["bio", "team_id"]
"""

MERGE = """
id = "m-merge"
depends_on = ["m-split"]
[[operations]]
op = "merge_tables"
table = "users"
from = "user_profiles"
"""


def test_split_then_merge_a_table_while_the_application_writes(dsn: str) -> None:
    _users(dsn, 1500)
    m = Migrator(dsn, actor="tester")
    with pytest.raises(MigrationError, match="depends on migrations that are not completed"):
        m.start(_mig(MERGE))
    with _Writers(dsn) as w:
        m.start(_mig(SPLIT))
        wait_for(lambda: w.writes > 30, timeout=20, what="writes")
    assert not w.errors, w.errors
    same = """SELECT count(*) FROM users u FULL JOIN user_profiles p USING (id)
              WHERE u.id IS NULL OR p.id IS NULL
                 OR u.bio IS DISTINCT FROM p.bio OR u.team_id IS DISTINCT FROM p.team_id"""
    assert scalar(dsn, same) == 0
    m.complete("m-split")
    assert scalar(dsn, "SELECT count(*) FROM information_schema.columns WHERE table_name = "
                       "'users' AND column_name IN ('bio', 'team_id')") == 0
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE user_profiles SET bio = 'before merge' WHERE id = 5")
    m.start(_mig(MERGE))
    with psycopg.connect(dsn, autocommit=True) as c:   # writes to the source are mirrored
        c.execute("UPDATE user_profiles SET bio = 'during merge' WHERE id = 6")
    m.complete("m-merge")
    assert scalar(dsn, "SELECT to_regclass('user_profiles')") is None
    assert scalar(dsn, "SELECT bio FROM users WHERE id = 5") == "before merge"
    assert scalar(dsn, "SELECT bio FROM users WHERE id = 6") == "during merge"


@pytest.mark.parametrize(("text", "message"), [
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "nope"\ncolumn = "c"\ntype = "int"\n',
     "table 'nope' does not exist"),
    ('id = "x"\n[[operations]]\nop = "rename_column"\ntable = "users"\ncolumn = "nope"\n'
     'to = "b"\n', "column 'nope' does not exist in public.users"),
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "users"\ncolumn = "c"\n'
     'type = "int"\nnot_null = true\n', "needs a `default` or a `value`"),
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "users"\ncolumn = "c"\n'
     'type = "int"\ncolour = "red"\n', "unknown field(s) colour"),
    ('id = "x"\n[[operations]]\nop = "teleport"\n', "unknown op 'teleport'"),
    ('id = "x"\n[[operations]]\nop = "sql"\nup = "CREATE INDEX i ON users (email)"\n',
     "index-not-concurrent"),
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "users"\ncolumn = "email"\n'
     'type = "int"\n', "already exists"),
    ('id = "x"\n[settings]\nlock_timeout = "0s"\n[[operations]]\nop = "drop_table"\n'
     'table = "users"\n', "lock_timeout must be > 0"),
    ('id = "bad id!"\n[[operations]]\nop = "drop_table"\ntable = "users"\n', "`id` must be"),
    ("id = \n", "not valid TOML"),
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "users"\ncolumn = "c"\n'
     'type = "text"\nvalue = "lower(emial)"\n', 'column "emial" does not exist'),
    ('id = "x"\n[[operations]]\nop = "add_column"\ntable = "users"\ncolumn = "c"\n'
     'type = "txet"\n', 'type "txet" does not exist'),
    ('id = "x"\n[[operations]]\nop = "change_type"\ntable = "users"\ncolumn = "score"\n'
     'type = "bigint"\nusing = "score + )"\n', "syntax error"),
    ('id = "x"\n[[operations]]\nop = "add_check"\ntable = "users"\nname = "users_pkey"\n'
     'check = "score > 0"\n', "a constraint named users_pkey already exists"),
    ('id = "x"\n[[operations]]\nop = "create_index"\ntable = "users"\nname = "teams"\n'
     'columns = ["email"]\n', "a relation named teams already exists"),
    ('id = "x"\n[backfill]\nbatch_size = "lots"\n[[operations]]\nop = "add_column"\n'
     'table = "users"\ncolumn = "c"\ntype = "int"\nvalue = "1"\n', "batch_size"),
    ('id = "x"\n[[operations]]\nop = "create_index"\ntable = "users"\ncolumns = ["email"]\n'
     '[[operations]]\nop = "create_index"\ntable = "users"\ncolumns = ["email"]\n',
     "creates relation bf_idx_users_email too"),
])
def test_bad_migration_files_are_refused_before_anything_is_written(
        dsn: str, tmp_path: Path, text: str, message: str) -> None:
    _users(dsn, 10)
    path = _write_file(tmp_path, text)
    for cmd in ("plan", "start"):
        r = cli(dsn, "migrate", cmd, str(path))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM backfill.migrations") == 0
    assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 0
    assert scalar(dsn, "SELECT count(*) FROM information_schema.columns WHERE "
                       "table_name = 'users'") == 6


def test_an_edited_file_and_an_unknown_id_are_refused(dsn: str, tmp_path: Path) -> None:
    _users(dsn, 10)
    path = _write_file(tmp_path, GATED)
    assert cli(dsn, "migrate", "start", str(path)).returncode == 0
    path.write_text(GATED.replace('"bigint"', '"numeric"'))
    r = cli(dsn, "migrate", "start", str(path))
    assert r.returncode == 1
    assert "changed since migration m-gate started" in r.stderr
    r = cli(dsn, "migrate", "complete", "no-such-migration")
    assert r.returncode == 2
    assert "no migration 'no-such-migration'" in r.stderr


def test_plan_prints_goal_impact_risk_rollback_and_an_estimate(dsn: str, tmp_path: Path) -> None:
    _users(dsn, 2000)
    path = _write_file(tmp_path, FULL)
    r = cli(dsn, "migrate", "plan", str(path))
    assert r.returncode == 0, r.stderr
    for heading in ("Goal", "Impact", "Risk", "Rollback", "Dependencies",
                    "start (expand + backfill)", "complete (contract"):
        assert heading in r.stdout
    assert "public.users: ~2,000 rows" in r.stdout
    # No job has run here yet: the rate is sampled, not assumed.
    assert "2,000 rows at " in r.stdout
    assert "rows/s (sampled: a rolled-back update" in r.stdout
    assert "(assumed)" not in r.stdout
    doc = json.loads(cli(dsn, "migrate", "plan", str(path), "--json").stdout)
    assert doc["risk"] == "high"
    assert any("users.name" in x for x in doc["irreversible_on_complete"])
    # 2,000 rows at a sampled rate may round to 0.0 s; every backfill still says its basis.
    assert doc["phases"]["start"]["estimated_s"] >= 0
    assert all("rows at" in st["estimate_basis"] for st in doc["phases"]["start"]["steps"]
               if st["mode"] == "backfill")
    assert scalar(dsn, "SELECT count(*) FROM backfill.migrations") == 0


def test_what_start_runs_passes_our_own_linter(dsn: str) -> None:
    """The expand phase is what runs while the application serves traffic: every statement
    it issues must be one the linter calls safe (under the lock_timeout the executor sets)."""
    from backfill.migrate.lint import lint_sql
    from backfill.migrate.steps import ordered_steps

    _users(dsn, 100)
    text = FULL + SPLIT.replace('id = "m-split"', "").replace('"bio", "team_id"', '"bio"')
    steps = ordered_steps(Migrator(dsn, actor="tester").plan(_mig(text)))["start"]
    statements = [st for s in steps if s.mode in ("tx", "concurrent") for st in s.statements]
    assert len(statements) > 15
    findings = lint_sql("SET lock_timeout = '2s';\n" + ";\n".join(statements) + ";")
    assert findings == []


VIEW = """
id = "m-view"
[[operations]]
op = "rename_column"
table = "users"
column = "name"
to = "full_name"
view_schema = "app_v1"
"""


def test_a_rename_through_a_compatibility_view_serves_the_old_name(dsn: str) -> None:
    _users(dsn, 100)
    old_app = psycopg.connect(dsn, autocommit=True)
    old_app.execute("SET search_path = app_v1, public")    # set before start, as documented
    try:
        assert old_app.execute("SELECT name FROM users WHERE id = 1").fetchone() == ("name 1",)
        m = Migrator(dsn, actor="tester")
        m.start(_mig(VIEW))
        # Old application, through the view: reads, inserts and updates by the old name.
        assert old_app.execute("SELECT name FROM users WHERE id = 1").fetchone() == ("name 1",)
        old_app.execute("INSERT INTO users (id, email, name) VALUES (500, 'v@x', 'via view')")
        old_app.execute("UPDATE users SET name = 'changed' WHERE id = 2")
        assert scalar(dsn, "SELECT full_name FROM public.users WHERE id = 500") == "via view"
        assert scalar(dsn, "SELECT full_name FROM public.users WHERE id = 2") == "changed"
        assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 0   # instant: no backfill
        m.rollback("m-view")
        assert old_app.execute("SELECT name FROM users WHERE id = 500").fetchone() == ("via view",)
        assert scalar(dsn, "SELECT to_regclass('app_v1.users')") is None
        m.start(_mig(VIEW))
        m.complete("m-view")
        assert scalar(dsn, "SELECT to_regclass('app_v1.users')") is None
        assert scalar(dsn, "SELECT full_name FROM users WHERE id = 500") == "via view"
    finally:
        old_app.close()



def test_complete_keeps_the_old_applications_writes_while_validate_scans(dsn: str) -> None:
    """The sync trigger stays until the one-transaction swap: an application writing the
    old column through complete loses nothing and is never refused."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE prices (id bigint PRIMARY KEY, price int NOT NULL)")
        c.execute("INSERT INTO prices SELECT g, g FROM generate_series(1, 50000) g")
    mig = _mig('id = "m-price"\n[[operations]]\nop = "change_type"\ntable = "prices"\n'
               'column = "price"\ntype = "bigint"\n')
    m = Migrator(dsn, actor="tester")
    m.start(mig)
    written: dict[int, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    key = 1 + (i * 7919) % 50000
                    # The application's own column name stays valid across the swap.
                    c.execute("UPDATE prices SET price = %s WHERE id = %s", (-i, key))
                    c.execute("INSERT INTO prices (id, price) VALUES (%s, %s)", (100000 + i, i))
                    written[key] = -i
                    written[100000 + i] = i
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(written) > 50, timeout=20, what="writes before complete")
        m.complete("m-price")
        n = len(written)
        wait_for(lambda: len(written) > n + 50, timeout=20, what="writes after complete")
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors, errors
    with psycopg.connect(dsn, autocommit=True) as c:
        got = dict(c.execute("SELECT id, price FROM prices WHERE id = ANY(%s)",
                             (list(written),)).fetchall())
        typ = c.execute("SELECT data_type, is_nullable FROM information_schema.columns "
                        "WHERE table_name = 'prices' AND column_name = 'price'").fetchone()
    assert got == written
    assert typ == ("bigint", "NO")


def test_a_rename_keeps_both_sides_right_when_the_old_column_has_a_default(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE tickets (id bigint PRIMARY KEY, status text NOT NULL "
                  "DEFAULT 'new')")
        c.execute("INSERT INTO tickets SELECT g, 'open' FROM generate_series(1, 100) g")
    m = Migrator(dsn, actor="tester")
    m.start(_mig('id = "m-status"\n[[operations]]\nop = "rename_column"\ntable = "tickets"\n'
                 'column = "status"\nto = "state"\n'))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO tickets (id, status) VALUES (1001, 'old-app')")
        c.execute("INSERT INTO tickets (id, state) VALUES (1002, 'new-app')")
        c.execute("INSERT INTO tickets (id) VALUES (1003)")
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT id, status, state FROM tickets WHERE id > 1000 ORDER BY id")}
    assert rows == {1001: ("old-app", "old-app"), 1002: ("new-app", "new-app"),
                    1003: ("new", "new")}
    m.complete("m-status")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO tickets (id) VALUES (1004)")
        assert c.execute("SELECT state FROM tickets WHERE id = 1004").fetchone() == ("new",)


def test_quoted_names_and_a_check_on_a_column_the_migration_fills(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute('CREATE TABLE "Orders" (id bigint PRIMARY KEY, "Qty" int NOT NULL)')
        c.execute('INSERT INTO "Orders" SELECT g, g FROM generate_series(1, 500) g')
    # Names in a migration file are read as SQL reads them: quotes keep the case.
    mig = _mig('id = "m-quoted"\n'
               '[[operations]]\nop = "add_column"\ntable = \'"Orders"\'\ncolumn = \'"Total"\'\n'
               'type = "bigint"\nvalue = \'"Qty" * 2\'\n'
               '[[operations]]\nop = "add_check"\ntable = \'"Orders"\'\n'
               'name = \'"Total positive"\'\n'
               'check = \'"Total" IS NOT NULL AND "Total" > 0\'\n'
               '[[operations]]\nop = "create_index"\ntable = \'"Orders"\'\n'
               'columns = [\'"Total"\']\n')
    m = Migrator(dsn, actor="tester")
    m.start(mig)     # VALIDATE runs after the backfill that makes it true
    m.complete("m-quoted")
    assert scalar(dsn, 'SELECT count(*) FROM "Orders" WHERE "Total" = "Qty" * 2') == 500
    assert scalar(dsn, "SELECT convalidated FROM pg_constraint WHERE conname = "
                       "'Total positive'") is True


def test_merge_refuses_source_rows_without_a_target_and_pulls_late_inserts(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE people (id bigint PRIMARY KEY, name text)")
        c.execute("CREATE TABLE bios (id bigint PRIMARY KEY, bio text)")
        c.execute("INSERT INTO people SELECT g, 'p' || g FROM generate_series(1, 100) g")
        c.execute("INSERT INTO bios SELECT g, 'b' || g FROM generate_series(1, 100) g")
        c.execute("INSERT INTO bios VALUES (500, 'orphan')")
    text = ('id = "m-bios"\n[[operations]]\nop = "merge_tables"\ntable = "people"\n'
            'from = "bios"\n')
    m = Migrator(dsn, actor="tester")
    with pytest.raises(MigrationError, match=r"every row of public\.bios is in public\.people"):
        m.start(_mig(text))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO people VALUES (500, 'late')")     # pulls the orphan's bio
        c.execute("INSERT INTO bios VALUES (600, 'early')")       # before its person
        c.execute("INSERT INTO people VALUES (600, 'later')")
    m.start(_mig(text))
    m.complete("m-bios")
    assert scalar(dsn, "SELECT bio FROM people WHERE id = 500") == "orphan"
    assert scalar(dsn, "SELECT bio FROM people WHERE id = 600") == "early"
    assert scalar(dsn, "SELECT count(*) FROM people WHERE bio = 'b' || id") == 100


def _undo_tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [r[0] for r in c.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'backfill'::regnamespace "
            "AND relkind = 'r' AND relname LIKE 'undo\\_%' ORDER BY 1").fetchall()]


UNDO = """
id = "m-undo"
[backfill]
batch_size = 100
undo_log = UNDO
[[operations]]
op = "rename_column"
table = "users"
column = "name"
to = "full_name"
[[operations]]
op = "change_type"
table = "users"
column = "score"
type = "bigint"
[[operations]]
op = "backfill"
table = "users"
set = { bio = "upper(bio)" }
"""


def test_undo_logs_of_a_migrations_fills_are_dropped_at_complete_and_rollback(dsn: str) -> None:
    _users(dsn, 300)
    m = Migrator(dsn, actor="tester")
    m.start(_mig(UNDO.replace("UNDO", "true")))
    assert len(_undo_tables(dsn)) == 3
    m.complete("m-undo")
    # The fills' logs are gone; the backfill operation's (the application's old bios) stays.
    assert len(_undo_tables(dsn)) == 1
    assert sum("dropped the undo log" in e[3] for e in _events(dsn, "m-undo")) == 2

    m.start(_mig(UNDO.replace("UNDO", "true").replace('"m-undo"', '"m-undo2"')
                 .replace('"name"', '"full_name"').replace('to = "full_name"', 'to = "nm"')))
    assert len(_undo_tables(dsn)) == 4
    m.rollback("m-undo2")
    assert len(_undo_tables(dsn)) == 2


def test_undo_log_false_is_accepted_and_fills_keep_no_log_by_default(dsn: str) -> None:
    _users(dsn, 300)
    m = Migrator(dsn, actor="tester")
    m.start(_mig(UNDO.replace("UNDO", "false")))
    assert _undo_tables(dsn) == []
    m.rollback("m-undo")
    m.start(_mig(UNDO.replace("undo_log = UNDO\n", "").replace('"m-undo"', '"m-undo3"')))
    assert len(_undo_tables(dsn)) == 1   # only the backfill operation's


PROFILE_FK = """
id = "m-fk"
[settings]
lock_timeout = "LOCK_TIMEOUT"
[[operations]]
op = "add_foreign_key"
table = "user_profiles"
columns = ["id"]
references = "users"
ON_DELETE
"""


def test_a_foreign_key_needs_an_explicit_on_delete_and_the_plan_says_what_the_old_app_must_do(
        dsn: str) -> None:
    _users(dsn, 50)
    m = Migrator(dsn, actor="tester")
    m.start(_mig(SPLIT))
    fk = PROFILE_FK.replace("LOCK_TIMEOUT", "2s")
    with pytest.raises(InvalidInput, match=r'`on_delete` is required .*"cascade"'):
        m.plan(_mig(fk.replace("ON_DELETE", "")))
    with pytest.raises(InvalidInput, match="on_delete must be one of"):
        m.plan(_mig(fk.replace("ON_DELETE", 'on_delete = "drop"')))
    plans = m.plan(_mig(fk.replace("ON_DELETE", 'on_delete = "no action"')))
    warning = " ".join(plans[0].warnings)
    assert "DELETE on public.users" in warning
    assert "the old version must delete" in warning
    plans = m.plan(_mig(fk.replace("ON_DELETE", 'on_delete = "cascade"')))
    assert "also deletes the rows of public.user_profiles" in " ".join(plans[0].warnings)

    # With no action, a referencing row blocks the delete; the split's own table does not:
    # its sync trigger deletes the mirrored row first (a BEFORE trigger, ahead of the check)...
    m.start(_mig(fk.replace("ON_DELETE", 'on_delete = "no action"')))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM users WHERE id = 8")
        assert c.execute("SELECT count(*) FROM user_profiles WHERE id = 8").fetchone() == (0,)
    # ...and with cascade it goes through too.
    m.rollback("m-fk")
    m.start(_mig(fk.replace("ON_DELETE", 'on_delete = "cascade"').replace("m-fk", "m-fk2")))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM users WHERE id = 7")
        assert c.execute("SELECT count(*) FROM user_profiles WHERE id = 7").fetchone() == (0,)


def _waiting(dsn: str, like: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        return bool(c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", (like,)).fetchone() == (1,))


def test_a_foreign_key_step_waits_for_the_application_instead_of_deadlocking(dsn: str) -> None:
    """The interleaving that deadlocked, forced: a session holds the child (user_profiles),
    so the foreign-key step waits; meanwhile the application inserts into the parent (users),
    whose split trigger writes the child. Locking the parent first, the step makes the
    application wait for it instead of the two waiting for each other."""
    _users(dsn, 50)
    m = Migrator(dsn, actor="tester")
    m.start(_mig(SPLIT))
    errors: list[BaseException] = []

    def run(fn: Any) -> threading.Thread:
        def target() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        th = threading.Thread(target=target, daemon=True)
        th.start()
        return th

    def app_insert() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("INSERT INTO users (id, email, name, bio) VALUES (9000, 'a@b', 'a', 'x')")

    fk = PROFILE_FK.replace("LOCK_TIMEOUT", "20s").replace("ON_DELETE", 'on_delete = "cascade"')
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE user_profiles IN ROW EXCLUSIVE MODE")
        step = run(lambda: Migrator(dsn, actor="tester").start(_mig(fk)))
        wait_for(lambda: _waiting(dsn, "%user_profiles%MODE%")
                 or _waiting(dsn, "ALTER TABLE%user_profiles%"), timeout=20,
                 what="the foreign-key step waiting for user_profiles")
        app = run(app_insert)
        wait_for(lambda: _waiting(dsn, "INSERT INTO users%"), timeout=20,
                 what="the application's insert waiting")
    # The holder commits: the step goes on, then the application's insert.
    step.join(30)
    app.join(30)
    assert errors == []
    assert [e for e in _events(dsn, "m-fk") if e[0] == "retry"] == []
    assert scalar(dsn, "SELECT count(*) FROM user_profiles WHERE id = 9000") == 1


NARROW = """
id = "m-narrow"
[[operations]]
op = "change_type"
table = "users"
column = "bio"
type = "varchar(200)"
USING
"""


def test_a_narrowing_type_change_is_checked_against_the_data_and_never_truncates(
        dsn: str, tmp_path: Path) -> None:
    _users(dsn, 100)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET bio = repeat('x', 415) || id WHERE id <= 20")
    m = Migrator(dsn, actor="tester")
    plain = NARROW.replace("USING", "")
    # plan shows how many values would not survive; start refuses, writing nothing.
    r = cli(dsn, "migrate", "plan", str(_write_file(tmp_path, plain)))
    assert r.returncode == 0, r.stderr
    assert "start refuses" in r.stdout
    assert "20 value(s) of public.users.bio" in r.stdout
    with pytest.raises(InvalidInput, match=r"20 value\(s\) .* until `using` says"):
        m.start(_mig(plain))
    assert scalar(dsn, "SELECT count(*) FROM backfill.migrations") == 0

    # The fill raises rather than truncates: its expression, over a value that does not fit.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE users SET bio = left(bio, 150) WHERE id <= 20")
    steps = ordered_steps(m.plan(_mig(plain)))["start"]
    (fill,) = [s.job for s in steps if s.job]
    expr = fill["set"][0][1]
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute(f"SELECT ({expr}) FROM users WHERE id = 1").fetchone() == ("x" * 150,)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="would change"):
            c.execute(f"SELECT ({expr}) FROM (SELECT repeat('y', 300) AS bio) AS users")

    # The gate compares the round trip: a truncated copy (as the old fill wrote) is refused.
    m.start(_mig(plain))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET session_replication_role = replica")   # no trigger: a bad copy
        c.execute("UPDATE users SET bio = repeat('z', 415), bf_new_bio = repeat('z', 200) "
                  "WHERE id = 5")
    with pytest.raises(GateClosed, match="reads back as bio"):
        m.complete("m-narrow")
    m.rollback("m-narrow")

    # A conversion with no plain cast at all is `using`'s alone: nothing to compare.
    assert m.plan(_mig(NARROW.replace('"bio"', '"score"').replace('"varchar(200)"', '"date"')
                       .replace("USING", "using = \"date '2020-01-01' + score\"\ndown = false")))
    # With `using` saying what to do, it goes through.
    m.start(_mig(NARROW.replace("USING", 'using = "left(bio, 200)"')
                 .replace("m-narrow", "m-narrow2")))
    m.complete("m-narrow2")
    assert scalar(dsn, "SELECT max(length(bio)) FROM users") == 200


def test_plan_estimates_from_measured_rates_and_filled_sizes_and_says_what_a_copy_costs(
        dsn: str, tmp_path: Path) -> None:
    _users(dsn, 3000)
    m = Migrator(dsn, actor="tester")
    m.start(_mig(SPLIT))
    # Every step's time is its own: a transactional step's start is not its commit.
    assert scalar(dsn, "SELECT count(*) FROM backfill.migration_steps WHERE state = 'done' "
                  "AND NOT finished_at > started_at") == 0
    m.rollback("m-split")
    fk = PROFILE_FK.replace("LOCK_TIMEOUT", "2s").replace("ON_DELETE", 'on_delete = "cascade"')
    text = SPLIT + fk[fk.index("[[operations]]"):] + """
[[operations]]
op = "change_type"
table = "users"
column = "score"
type = "bigint"
"""
    doc = json.loads(cli(dsn, "migrate", "plan", str(_write_file(tmp_path, text)),
                         "--json").stdout)
    steps = doc["phases"]["start"]["steps"]
    (validate,) = [s for s in steps if s["description"].startswith("validate bf_fk_")]
    # The foreign key is validated on the table the split fills: its size once filled.
    assert "once filled" in validate["estimate_basis"]
    assert "scans 0.0 MB" not in validate["estimate_basis"]
    assert validate["estimated_s"] >= 0
    # The jobs of the split this database ran are its measured rate.
    fills = [s for s in steps if s["mode"] == "backfill"]
    assert all("measured on this database" in s["estimate_basis"] for s in fills)
    warnings = " ".join(doc["warnings"])
    assert "the copy rewrites every row of public.users" in warnings
    assert "score is the last column of public.users" in warnings
    r = cli(dsn, "migrate", "plan", str(_write_file(tmp_path, text)))
    assert "public.user_profiles: created by this migration; ~3,000 rows" in r.stdout
