"""Both application versions at once (invariant 9): pgbench scripts for the old and the new
shape, at a fixed rate, prepared statements, no reconnects. The old version runs from before
start until complete begins (complete requires it gone), the new one from the end of start
(through the version schema's views) until after complete.

For split, merge, rename and change of type: 0 application errors, 0 lost writes (every
write is tagged and logged in its own transaction; the last write of each column must be
what both versions read, before complete, and what the new one reads after), the schema as
specified after complete, and a start -> rollback that leaves no trace before the start ->
complete that does the job. Each phase's max latency per version is printed (and written to
``$BACKFILL_TWO_VERSION_REPORT`` as JSON when set): docs/migrations.md quotes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backfill.migrate.executor import Migrator
from backfill.migrate.file import parse
from backfill.migrate.plan import version_schema
from backfill_dev.localpg import find_pg_bindir
from tests.integration.helpers import wait_for

# bench/bench_two_versions.py runs this test on a larger table through these variables.
_ENV = "BACKFILL_TWO_VERSION_"
ROWS = int(os.environ.get(_ENV + "ROWS", "20000"))
RATE = int(os.environ.get(_ENV + "RATE", "30"))   # transactions/s per version (several statements)
BASELINE_S = 2.0     # the old version alone, before start
#: The old version's whole run: baseline, start, both versions together.
OLD_S = float(os.environ.get(_ENV + "OLD_S", "9"))
AFTER_S = 3.0        # the new version alone after complete
#: Time allowed for complete (the gate re-verifies every backfill) in the new version's run.
COMPLETE_S = float(os.environ.get(_ENV + "COMPLETE_S", "2"))
#: start -> rollback first (no trace), then start -> complete; the bench skips the former.
ROLLBACK_FIRST = os.environ.get(_ENV + "ROLLBACK_FIRST", "1") == "1"

pytestmark = pytest.mark.timeout(int(os.environ.get(_ENV + "TIMEOUT", "180")))
#: What each logical column held before any write (an expression over ``id``).
SEED = {"bio": "'bio ' || id", "website": "'w' || id", "location": "'loc ' || id",
        "name": "'name ' || id", "score": "id::text"}

SETUP_USERS = f"""
CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name text NOT NULL, score int,
                    bio text, avatar_url text, location text, website text);
INSERT INTO users SELECT g, 'u' || g || '@x', 'name ' || g, g, 'bio ' || g, 'a' || g,
                         'loc ' || g, 'w' || g FROM generate_series(1, {ROWS}) g;
"""
SETUP_PROFILES = f"""
CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name text NOT NULL, score int);
CREATE TABLE user_profiles (id bigint PRIMARY KEY REFERENCES users, bio text, avatar_url text,
                            location text, website text);
INSERT INTO users SELECT g, 'u' || g || '@x', 'name ' || g, g FROM generate_series(1, {ROWS}) g;
INSERT INTO user_profiles SELECT g, 'bio ' || g, 'a' || g, 'loc ' || g, 'w' || g
    FROM generate_series(1, {ROWS}) g;
"""
SETUP_LOG = f"""
CREATE SEQUENCE tags;
CREATE SEQUENCE uids START {10 * ROWS};
CREATE TABLE app_writes (seq bigserial PRIMARY KEY, ver text NOT NULL, id bigint NOT NULL,
                         col text NOT NULL, val text);
ANALYZE;
"""
SETTINGS = """
[settings]
lock_timeout = "500ms"
retry_backoff = "50ms"
[backfill]
batch_size = 5000
"""


def _w(ver: str, col: str, statement: str) -> str:
    """A write and its log entry in one statement (one transaction): ``statement`` returns
    ``id`` and the column's new value."""
    return (f"WITH w AS ({statement} RETURNING id, {col}) INSERT INTO app_writes "
            f"(ver, id, col, val) SELECT '{ver}', id, '{col}', {col}::text FROM w;")


def _tag(ver: str) -> str:
    return f"'{ver[0]}' || nextval('tags')"


@dataclass(frozen=True)
class Case:
    name: str
    setup: str
    operations: str
    old: list[str]
    new: list[str]
    #: version -> logical column -> a query returning (id, value) in that version's shape
    reads: dict[str, dict[str, str]]
    after: list[tuple[str, Any]] = field(default_factory=list)   # query, expected

    @property
    def mid(self) -> str:
        return f"two-{self.name}"

    def migration(self) -> str:
        return f'id = "{self.mid}"\n{SETTINGS}\n{self.operations}'


def _cols(table: str, names: list[str]) -> dict[str, str]:
    return {c: f"SELECT id, {c}::text FROM {table}" for c in names}


CASES = [
    Case(
        "split", SETUP_USERS,
        """[[operations]]
op = "split_table"
table = "users"
into = "user_profiles"
columns = ["bio", "avatar_url", "location", "website"]

[[operations]]
op = "add_foreign_key"
table = "user_profiles"
columns = ["id"]
references = "users"
on_delete = "cascade"
""",
        old=[_w("old", "bio", f"UPDATE users SET bio = {_tag('old')} WHERE id = :id"),
             _w("old", "website", f"UPDATE users SET website = {_tag('old')} WHERE id = :id"),
             _w("old", "location", "INSERT INTO users (id, email, name, location) VALUES "
                f"(nextval('uids'), 'old@x', 'old', {_tag('old')})"),
             "SELECT id, name, bio, location, website FROM users WHERE id = :id;"],
        new=[_w("new", "bio", f"UPDATE user_profiles SET bio = {_tag('new')} WHERE id = :id"),
             _w("new", "location",
                f"UPDATE user_profiles SET location = {_tag('new')} WHERE id = :id"),
             _w("new", "name", f"UPDATE users SET name = {_tag('new')} WHERE id = :id"),
             "BEGIN;",
             "INSERT INTO users (id, email, name) VALUES (nextval('uids'), 'new@x', 'new');",
             _w("new", "bio", "INSERT INTO user_profiles (id, bio) VALUES "
                f"(currval('uids'), {_tag('new')})"),
             "COMMIT;",
             "SELECT * FROM users WHERE id = :id;",
             "SELECT u.name, p.bio, p.location FROM users u JOIN user_profiles p USING (id) "
             "WHERE u.id = :id;"],
        reads={"old": _cols("users", ["bio", "website", "location", "name"]),
               "new": {**_cols("user_profiles", ["bio", "website", "location"]),
                       **_cols("users", ["name"])}},
        after=[("SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' "
                "AND column_name IN ('bio', 'avatar_url', 'location', 'website')", 0),
               ("SELECT (SELECT count(*) FROM users) = (SELECT count(*) FROM user_profiles)",
                True),
               ("SELECT convalidated FROM pg_constraint WHERE conname = 'bf_fk_user_profiles_id'",
                True)]),
    Case(
        "merge", SETUP_PROFILES,
        """[[operations]]
op = "merge_tables"
table = "users"
from = "user_profiles"
""",
        old=[_w("old", "bio", f"UPDATE user_profiles SET bio = {_tag('old')} WHERE id = :id"),
             _w("old", "website",
                f"UPDATE user_profiles SET website = {_tag('old')} WHERE id = :id"),
             "BEGIN;",
             "INSERT INTO users (id, email, name) VALUES (nextval('uids'), 'old@x', 'old');",
             _w("old", "location", "INSERT INTO user_profiles (id, location) VALUES "
                f"(currval('uids'), {_tag('old')})"),
             "COMMIT;",
             "SELECT u.name, p.bio FROM users u JOIN user_profiles p USING (id) "
             "WHERE u.id = :id;"],
        new=[_w("new", "bio", f"UPDATE users SET bio = {_tag('new')} WHERE id = :id"),
             _w("new", "location", f"UPDATE users SET location = {_tag('new')} WHERE id = :id"),
             _w("new", "website", "INSERT INTO users (id, email, name, website) VALUES "
                f"(nextval('uids'), 'new@x', 'new', {_tag('new')})"),
             "SELECT * FROM users WHERE id = :id;"],
        reads={"old": _cols("user_profiles", ["bio", "website", "location"]),
               "new": _cols("users", ["bio", "website", "location"])},
        after=[("SELECT to_regclass('user_profiles') IS NULL", True)]),
    Case(
        "rename", SETUP_USERS,
        """[[operations]]
op = "rename_column"
table = "users"
column = "name"
to = "full_name"
""",
        old=[_w("old", "name", f"UPDATE users SET name = {_tag('old')} WHERE id = :id"),
             _w("old", "name", "INSERT INTO users (id, email, name) VALUES "
                f"(nextval('uids'), 'old@x', {_tag('old')})"),
             "SELECT id, name, email FROM users WHERE id = :id;"],
        new=[_w("new", "full_name", f"UPDATE users SET full_name = {_tag('new')} "
                "WHERE id = :id").replace("'full_name'", "'name'"),
             _w("new", "full_name", "INSERT INTO users (id, email, full_name) VALUES "
                f"(nextval('uids'), 'new@x', {_tag('new')})").replace("'full_name'", "'name'"),
             "SELECT * FROM users WHERE id = :id;"],
        reads={"old": _cols("users", ["name"]),
               "new": {"name": "SELECT id, full_name FROM users"}},
        after=[("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass "
                "AND attname = 'full_name'", True),
               ("SELECT count(*) FROM pg_attribute WHERE attrelid = 'users'::regclass "
                "AND attname = 'name' AND NOT attisdropped", 0)]),
    Case(
        "change_type", SETUP_USERS,
        """[[operations]]
op = "change_type"
table = "users"
column = "score"
type = "bigint"
""",
        old=[_w("old", "score", "UPDATE users SET score = nextval('tags') WHERE id = :id"),
             "SELECT id, score FROM users WHERE id = :id;"],
        new=[_w("new", "score", "UPDATE users SET score = nextval('tags') WHERE id = :id"),
             _w("new", "score", "INSERT INTO users (id, email, name, score) VALUES "
                "(nextval('uids'), 'new@x', 'new', nextval('tags'))"),
             "SELECT id, score FROM users WHERE id = :id;",
             "SELECT * FROM users WHERE id = :id;"],
        reads={"old": _cols("users", ["score"]), "new": _cols("users", ["score"])},
        after=[("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                "'users'::regclass AND attname = 'score'", "bigint")]),
]


# -- the harness ------------------------------------------------------------------------------


def _trace(dsn: str) -> dict[str, Any]:
    """What a migration could leave behind: schemas, and the public schema's columns,
    constraints, indexes, triggers, functions and views; and the application's data."""
    with psycopg.connect(dsn, autocommit=True) as c:
        q = {
            "schemas": "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                       "AND nspname NOT IN ('information_schema', 'backfill') ORDER BY 1",
            "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default "
                       "FROM information_schema.columns WHERE table_schema = 'public' "
                       "ORDER BY 1, ordinal_position",
            "constraints": "SELECT conrelid::regclass::text, conname, convalidated "
                           "FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
                           "ORDER BY 1, 2",
            "indexes": "SELECT indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON "
                       "c.oid = i.indexrelid WHERE c.relnamespace = 'public'::regnamespace "
                       "ORDER BY 1",
            "triggers": "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                        "WHERE NOT tgisinternal AND c.relnamespace = 'public'::regnamespace "
                        "ORDER BY 1",
            "functions": "SELECT proname FROM pg_proc WHERE pronamespace = "
                         "'public'::regnamespace ORDER BY 1",
            "views": "SELECT schemaname, viewname FROM pg_views WHERE schemaname NOT IN "
                     "('pg_catalog', 'information_schema') ORDER BY 1, 2",
            "users": "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u",
        }
        out = {k: c.execute(v).fetchall() for k, v in q.items()}
        if c.execute("SELECT to_regclass('user_profiles')").fetchone() != (None,):
            out["profiles"] = c.execute("SELECT md5(string_agg(p::text, ',' ORDER BY id)) "
                                        "FROM user_profiles p").fetchall()
        return out


class Bench:
    """One pgbench run of a script at a fixed rate; its per-transaction log read back."""

    def __init__(self, dsn: str, tmp: Path, ver: str, script: list[str], seconds: float,
                 search_path: str | None) -> None:
        self.ver = ver
        path = tmp / f"{ver}.sql"
        path.write_text(f"\\set id random(1, {ROWS})\n" + "\n".join(script) + "\n")
        self.prefix = tmp / f"log_{ver}"
        info = conninfo_to_dict(dsn)
        env = dict(os.environ, PGHOST=str(info.get("host", "")),
                   PGPORT=str(info.get("port", "5432")), PGUSER=str(info.get("user", "")),
                   PGDATABASE=str(info["dbname"]), PGPASSWORD=str(info.get("password", "")))
        if search_path:
            env["PGOPTIONS"] = f"-c search_path={search_path}"
        pgbench = find_pg_bindir() / "pgbench"
        self.proc = subprocess.Popen(
            [str(pgbench), "-n", "-c", "2", "-j", "1", "-M", "prepared", "-R", str(RATE),
             "-T", str(max(1, round(seconds))), "-f", str(path), "-l",
             "--log-prefix", str(self.prefix)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = ""

    def wait(self, timeout: float) -> None:
        out, err = self.proc.communicate(timeout=timeout)
        self.out = out + err
        failed = [line for line in self.out.splitlines()
                  if "failed transactions" in line and not line.split(":")[1].strip()
                  .startswith("0 ")]
        errors = (self.proc.returncode != 0 or "ERROR" in self.out or "aborted" in self.out
                  or bool(failed))
        assert not errors, f"{self.ver} version's pgbench had errors:\n{self.out[-3000:]}"

    def latencies(self) -> list[tuple[float, float]]:
        """(completion time, latency in ms) of every transaction."""
        out = []
        for f in self.prefix.parent.glob(self.prefix.name + ".*"):
            for line in f.read_text().splitlines():
                p = line.split()
                out.append((int(p[4]) + int(p[5]) / 1e6, int(p[2]) / 1000.0))
        return out


def _lost(dsn: str, case: Case, versions: tuple[str, ...], schema: str) -> dict[str, int]:
    """Per version: how many (row, column) pairs do not read as their last logged write,
    and how many untouched seed rows changed; also how many pairs were checked. One snapshot
    for all, so a write in flight is either in the log and the tables, or in neither."""
    res: dict[str, int] = {}
    with psycopg.connect(dsn) as c:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for ver in versions:
            c.execute(f"SET LOCAL search_path = {schema if ver == 'new' else 'public'}, public")
            for col, read in case.reads[ver].items():
                row = c.execute(
                    f"""WITH last AS (SELECT DISTINCT ON (id) id, val FROM public.app_writes
                                      WHERE col = %s ORDER BY id, seq DESC)
                        SELECT count(*), count(*) FILTER (WHERE r.val IS DISTINCT FROM last.val)
                        FROM last LEFT JOIN ({read}) AS r (id, val) USING (id)""",
                    (col,)).fetchone()
                assert row is not None
                res[f"{ver}.{col}.checked"] = int(row[0])
                res[f"{ver}.{col}.lost"] = int(row[1])
                untouched = c.execute(
                    f"""SELECT count(*) FILTER (WHERE val IS DISTINCT FROM {SEED[col]})
                        FROM ({read}) AS r (id, val) WHERE id <= {ROWS} AND NOT EXISTS
                        (SELECT 1 FROM public.app_writes w WHERE w.id = r.id
                         AND w.col = %s)""", (col,)).fetchone()
                assert untouched is not None
                res[f"{ver}.{col}.seed_changed"] = int(untouched[0])
        c.rollback()
    return res


def _phases(bench: Bench, marks: dict[str, float]) -> dict[str, dict[str, float]]:
    bounds = [("baseline", 0.0, marks["start_begin"]),
              ("start", marks["start_begin"], marks["start_end"]),
              ("both", marks["start_end"], marks["complete_begin"]),
              ("complete", marks["complete_begin"], marks["complete_end"]),
              ("after", marks["complete_end"], float("inf"))]
    out = {}
    lat = bench.latencies()
    for name, lo, hi in bounds:
        xs = [ms for at, ms in lat if lo <= at < hi]
        if xs:
            xs.sort()
            out[name] = {"n": len(xs), "max_ms": round(xs[-1], 1),
                         "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 1)}
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_versions_write_through_start_and_complete(
        dsn: str, tmp_path: Path, case: Case) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(case.setup)
        c.execute(SETUP_LOG)
    mig = parse(case.migration(), f"{case.mid}.toml")
    schema = version_schema(case.mid)
    m = Migrator(dsn, actor="tester")

    # start -> rollback leaves no trace.
    if ROLLBACK_FIRST:
        before = _trace(dsn)
        m.start(mig)
        assert schema in [r[0] for r in _trace(dsn)["schemas"]]
        m.rollback(case.mid)
        assert _trace(dsn) == before

    # start -> complete with both versions at work.
    marks: dict[str, float] = {}
    old = Bench(dsn, tmp_path, "old", case.old, OLD_S, None)
    old_end = time.time() + OLD_S
    time.sleep(BASELINE_S)   # the old version's baseline: nothing else to wait for
    marks["start_begin"] = time.time()
    m.start(mig)
    marks["start_end"] = time.time()
    assert marks["start_end"] < old_end - 1, "start took too long for this test's timeline"
    new = Bench(dsn, tmp_path, "new", case.new, old_end - time.time() + COMPLETE_S + AFTER_S + 3,
                f"{schema},public")
    old.wait(timeout=OLD_S + 60)
    # The old version is gone; both versions read every write (the new one still writing).
    lost_before = _lost(dsn, case, ("old", "new"), schema)
    marks["complete_begin"] = time.time()
    m.complete(case.mid)
    marks["complete_end"] = time.time()
    new.wait(timeout=OLD_S + COMPLETE_S + AFTER_S + 60)
    assert time.time() - marks["complete_end"] >= 1, "no new-version run after complete"
    lost_after = _lost(dsn, case, ("new",), schema)

    report = {"case": case.name, "rows": ROWS, "rate_per_version": RATE,
              "phase_s": {"start": round(marks["start_end"] - marks["start_begin"], 2),
                          "complete": round(marks["complete_end"] - marks["complete_begin"], 2)},
              "old": _phases(old, marks), "new": _phases(new, marks),
              "checks_before_complete": lost_before, "checks_after_complete": lost_after}
    print(json.dumps(report))
    if os.environ.get("BACKFILL_TWO_VERSION_REPORT"):
        with open(os.environ["BACKFILL_TWO_VERSION_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")

    for checks in (lost_before, lost_after):
        bad = {k: v for k, v in checks.items() if not k.endswith(".checked") and v}
        assert not bad, (bad, checks)
        assert all(v > 0 for k, v in checks.items() if k.endswith(".checked")), checks
    # Both versions really ran in every phase they were meant to.
    assert {"baseline", "start", "both"} <= set(report["old"]), report["old"]
    assert {"both", "complete", "after"} <= set(report["new"]) or \
        {"both", "after"} <= set(report["new"]), report["new"]
    # The shape complete leaves, and nothing of the migration's machinery.
    t = _trace(dsn)
    assert schema not in [r[0] for r in t["schemas"]]
    assert t["triggers"] == []
    assert t["functions"] == []
    assert t["views"] == []
    for query, expected in case.after:
        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute(query).fetchone() == (expected,), query


# -- the same rules, one write at a time ------------------------------------------------------


def _sessions(dsn: str, schema: str) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
    old = psycopg.connect(dsn, autocommit=True)
    new = psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema},public")
    return old, new


def test_split_each_version_writes_its_own_shape_and_reads_the_others(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP_USERS.replace(str(ROWS), "200"))
    mid = "one-split"
    schema = version_schema(mid)
    m = Migrator(dsn, actor="tester")
    m.start(parse(f'id = "{mid}"\n{SETTINGS}\n{CASES[0].operations}'))
    old, new = _sessions(dsn, schema)
    with old, new:
        # The new version inserts a user, then its profile: no row made for it collides.
        new.execute("INSERT INTO users (id, email, name) VALUES (1000, 'n@x', 'n')")
        new.execute("INSERT INTO user_profiles (id, bio) VALUES (1000, 'new bio')")
        assert old.execute("SELECT bio FROM users WHERE id = 1000").fetchone() == ("new bio",)
        # A new-version write is not undone by the old version's next update of the row...
        new.execute("UPDATE user_profiles SET location = 'new loc' WHERE id = 5")
        old.execute("UPDATE users SET bio = 'old bio', name = 'old name' WHERE id = 5")
        assert new.execute("SELECT bio, location FROM user_profiles WHERE id = 5").fetchone() \
            == ("old bio", "new loc")
        assert old.execute("SELECT bio, location, name FROM users WHERE id = 5").fetchone() \
            == ("old bio", "new loc", "old name")
        # ...and the new version reads the source through its view, without the moved columns.
        assert [d.name for d in new.execute("SELECT * FROM users LIMIT 0").description] \
            == ["id", "email", "name", "score"]
        # An old-version insert and delete reach the new table.
        old.execute("INSERT INTO users (id, email, name, website) VALUES (1001, 'o', 'o', 'w')")
        assert new.execute("SELECT website FROM user_profiles WHERE id = 1001").fetchone() \
            == ("w",)
        old.execute("DELETE FROM users WHERE id = 1001")   # the foreign key does not refuse it
        assert new.execute("SELECT count(*) FROM user_profiles WHERE id = 1001").fetchone() \
            == (0,)
    m.complete(mid)


def _complete_meets_a_new_version_transaction(dsn: str, setup: str, case: int, mid: str,
                                              hold: str, write: str) -> None:
    """Start migration ``case`` on a 50-row table, then force the interleaving: a new-version
    transaction runs ``hold``, complete starts and waits for a lock, the transaction runs
    ``write`` and commits. Complete must finish without an error or a retry (a deadlock
    would make one of the two its victim)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(setup.replace(str(ROWS), "50"))
    m = Migrator(dsn, actor="tester")
    m.start(parse(f'id = "{mid}"\n{SETTINGS.replace("500ms", "20s")}\n{CASES[case].operations}'))
    errors: list[BaseException] = []

    def complete() -> None:
        try:
            Migrator(dsn, actor="tester").complete(mid)
        except BaseException as exc:
            errors.append(exc)

    def waiting() -> bool:
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND (query LIKE 'DROP TRIGGER%%' OR query LIKE "
                            "'LOCK TABLE%%')").fetchone()
            return row == (1,)

    with psycopg.connect(dsn, options=f"-c search_path={version_schema(mid)},public") as new:
        new.execute(hold)
        step = threading.Thread(target=complete, daemon=True)
        step.start()
        wait_for(waiting, timeout=20, what="complete's step waiting for a lock")
        new.execute(write)
        new.commit()
    step.join(60)
    assert errors == []
    with psycopg.connect(dsn, autocommit=True) as c:
        retries = c.execute("SELECT message FROM backfill.migration_events WHERE migration_id "
                            "= %s AND kind = 'retry'", (mid,)).fetchall()
        assert retries == []


def test_merges_complete_locks_the_target_before_the_source_as_the_new_versions_writes_do(
        dsn: str) -> None:
    """Issue 14, item 2, at complete: the new version updates the merged table (locking it),
    then its trigger writes the source. Complete's step must take the target first too: taking
    the source first (dropping its trigger) and then waiting for the target deadlocks with
    such a write, forced here: a new-version transaction holds the target, complete waits,
    then the transaction writes a merged column."""
    _complete_meets_a_new_version_transaction(
        dsn, SETUP_PROFILES, 1, "one-merge-lock",
        hold="UPDATE users SET email = email WHERE id = 1",     # holds users only
        write="UPDATE users SET bio = 'held' WHERE id = 1")     # its trigger writes the source
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT bio FROM users WHERE id = 1").fetchone() == ("held",)


def test_splits_complete_cannot_deadlock_with_a_new_version_write_of_the_new_table(
        dsn: str) -> None:
    """Issue 14, item 2, at complete: a new-version write to the new table locks it, then (its
    trigger, and the foreign key's check) the source; a new-version delete of a source row
    locks the source, then (its trigger) the new table. No order of the two suits both, so
    complete drops the new table's trigger in a transaction of its own, before the source's.
    Forced: a new-version transaction holds its profile row, complete waits for it, then the
    transaction updates the profile."""
    _complete_meets_a_new_version_transaction(
        dsn, SETUP_USERS, 0, "one-split-lock",
        hold="SELECT bio FROM user_profiles WHERE id = 1 FOR UPDATE",
        write="UPDATE user_profiles SET bio = 'held' WHERE id = 1")
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT bio FROM user_profiles WHERE id = 1").fetchone() == ("held",)


def test_a_type_change_is_the_new_versions_from_start_and_its_prepared_queries_survive_complete(
        dsn: str) -> None:
    """Issue 14, item 5: a prepared SELECT of the retyped column, in a new-version session
    that stays connected from start to after complete, never changes its result type."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP_USERS.replace(str(ROWS), "200"))
    mid = "one-type"
    schema = version_schema(mid)
    m = Migrator(dsn, actor="tester")
    m.start(parse(f'id = "{mid}"\n{SETTINGS}\n{CASES[3].operations}'))
    old, new = _sessions(dsn, schema)
    with old, new:
        q = "SELECT score, pg_typeof(score)::text FROM users WHERE id = %s"
        assert new.execute(q, (7,), prepare=True).fetchone() == (7, "bigint")
        assert old.execute(q, (7,), prepare=True).fetchone() == (7, "integer")
        new.execute("UPDATE users SET score = 70 WHERE id = 7")
        assert old.execute(q, (7,), prepare=True).fetchone() == (70, "integer")
        old.close()   # the old version is gone before complete
        m.complete(mid)
        for _ in range(3):   # prepared by now (psycopg prepares after a few runs, or at once)
            assert new.execute(q, (7,), prepare=True).fetchone() == (70, "bigint")
        assert new.execute("SELECT * FROM users WHERE id = 7", prepare=True).fetchone() \
            is not None


def test_a_computed_column_follows_the_old_versions_writes_and_keeps_the_new_versions(
        dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP_USERS.replace(str(ROWS), "200"))
    mid = "one-add"
    m = Migrator(dsn, actor="tester")
    m.start(parse(f'id = "{mid}"\n{SETTINGS}\n[[operations]]\nop = "add_column"\n'
                  'table = "users"\ncolumn = "email_lower"\ntype = "text"\n'
                  'value = "lower(email)"\nnot_null = true\n'))
    old, new = _sessions(dsn, version_schema(mid))
    with old, new:
        # The new version reads and writes users through the version schema's view (and the
        # fill trigger knows it by its search_path); the old one reads the table.
        assert new.execute("SELECT relkind FROM pg_class WHERE oid = 'users'::regclass") \
            .fetchone() == ("v",)
        assert old.execute("SELECT relkind FROM pg_class WHERE oid = 'users'::regclass") \
            .fetchone() == ("r",)
        old.execute("UPDATE users SET email = 'Changed@X' WHERE id = 3")
        assert new.execute("SELECT email_lower FROM users WHERE id = 3").fetchone() \
            == ("changed@x",)
        new.execute("UPDATE users SET email = 'Mixed@X', email_lower = 'own' WHERE id = 4")
        assert new.execute("SELECT email_lower FROM users WHERE id = 4").fetchone() == ("own",)
        # The new version owns the column: its write of the input alone is not recomputed
        # over it (the trigger tells the versions apart), as the old version's is.
        new.execute("UPDATE users SET email = 'Only@X' WHERE id = 6")
        assert old.execute("SELECT email_lower FROM users WHERE id = 6").fetchone() == ("u6@x",)
        new.execute("INSERT INTO users (id, email, name) VALUES (1000, 'A@B', 'n')")
        assert old.execute("SELECT email_lower FROM users WHERE id = 1000").fetchone() \
            == ("a@b",)
    m.complete(mid)


def test_the_version_schema_carries_the_tables_grants_to_other_roles(dsn: str) -> None:
    import uuid

    role = f"bf_app_{uuid.uuid4().hex[:8]}"   # roles are the server's: a unique one, dropped
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SETUP_USERS.replace(str(ROWS), "20"))
        c.execute(f"CREATE ROLE {role}")
        c.execute(f"GRANT SELECT, UPDATE ON users TO {role}")
    mid = "one-grant"
    schema = version_schema(mid)
    m = Migrator(dsn, actor="tester")
    try:
        m.start(parse(f'id = "{mid}"\n{SETTINGS}\n{CASES[2].operations}'))
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"SET ROLE {role}")
            c.execute(f"SET search_path = {schema}, public")
            c.execute("UPDATE users SET full_name = 'as the app' WHERE id = 1")
            assert c.execute("SELECT full_name FROM users WHERE id = 1").fetchone() \
                == ("as the app",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("INSERT INTO users (id, email, full_name) VALUES (99, 'x', 'y')")
        m.rollback(mid)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


def test_a_new_version_insert_that_leaves_a_renamed_column_out_gets_its_default(
        dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE t (id bigint PRIMARY KEY, state text NOT NULL DEFAULT 'new')")
        c.execute("INSERT INTO t SELECT g, 's' || g FROM generate_series(1, 10) g")
    mid = "one-default"
    m = Migrator(dsn, actor="tester")
    m.start(parse(f'id = "{mid}"\n{SETTINGS}\n[[operations]]\nop = "rename_column"\n'
                  'table = "t"\ncolumn = "state"\nto = "status"\n'))
    old, new = _sessions(dsn, version_schema(mid))
    with old, new:
        new.execute("INSERT INTO t (id) VALUES (100)")
        assert old.execute("SELECT state, status FROM t WHERE id = 100").fetchone() \
            == ("new", "new")
        new.execute("INSERT INTO t (id, status) VALUES (101, 'given')")
        assert old.execute("SELECT state FROM t WHERE id = 101").fetchone() == ("given",)
    m.complete(mid)
    assert scalar_default(dsn) == "'new'::text"


def scalar_default(dsn: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT column_default FROM information_schema.columns "
                        "WHERE table_name = 't' AND column_name = 'status'").fetchone()
        return None if row is None else str(row[0])
