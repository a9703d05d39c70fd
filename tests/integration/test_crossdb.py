"""Copy between two databases: keyset reads on the source, COPY into the destination, the
checkpoint in the destination's state committing with the rows."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from backfill import Backfill, update
from backfill.job.spec import JobSpec
from tests.conftest import _create_db, _db_dsn, _drop_db
from tests.integration.helpers import cli, kill_run_after, scalar

pytestmark = pytest.mark.timeout(180)

ROWS = 60_000


@pytest.fixture
def source(admin_dsn: str) -> Iterator[str]:
    name = _create_db(admin_dsn, "template0")
    src = _db_dsn(admin_dsn, name)
    with psycopg.connect(src, autocommit=True) as c:
        c.execute("""CREATE TABLE events (id bigint PRIMARY KEY, kind text, amount int,
                     tags text[], at timestamptz, note text)""")
        c.execute("""INSERT INTO events SELECT g, 'k' || (g %% 5), g, ARRAY['t', g::text],
                     timestamptz '2024-01-01' + g * interval '1 s',
                     CASE WHEN g %% 9 = 0 THEN NULL ELSE 'n' || g END
                     FROM generate_series(1, %s) g""", (ROWS,))
        c.execute("ANALYZE events")
    try:
        yield src
    finally:
        _drop_db(admin_dsn, name)


def _dest(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        # amount widened to bigint, kind renamed category, no note column.
        c.execute("""CREATE TABLE archive (id bigint PRIMARY KEY, category text, amount bigint,
                     tags text[], at timestamptz)""")


def _sum(dsn: str, table: str, cols: str) -> str:
    return str(scalar(dsn, f"SELECT md5(string_agg(ROW({cols})::text, ',' ORDER BY id)) "
                           f"FROM {table}"))


def test_a_copy_between_databases_with_a_column_map_verifies(dsn: str, source: str) -> None:
    _dest(dsn)
    r = cli(dsn, "enqueue", "-t", "events", "--dest", "archive", "--source", source,
            "--map", "category=kind", "--batch-size", "5000", "-q")
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.strip())
    r = cli(dsn, "run", str(job), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM archive") == ROWS
    assert _sum(dsn, "archive", "id, category, amount, tags, at") == \
        _sum(source, "events", "id, kind, amount, tags, at")
    r = cli(dsn, "verify", str(job))
    assert r.returncode == 0, r.stdout + r.stderr
    # The job's state is in the destination; the source has no backfill schema.
    assert scalar(source, "SELECT to_regnamespace('backfill')") is None
    # A difference on either side is found.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE archive SET amount = -1 WHERE id = 777")
    r = cli(dsn, "verify", str(job))
    assert r.returncode == 1


def test_a_killed_copy_resumes_without_duplicates(dsn: str, source: str) -> None:
    _dest(dsn)
    bf = Backfill(dsn)
    job = bf.enqueue(JobSpec("copy", "events", dest="archive", source_dsn=source,
                             column_map=(("category", "kind"),)).with_options(
        batch_size=500, min_batch_size=500, max_batch_size=500))
    kill_run_after(dsn, job.id, 10)
    r = cli(dsn, "run", str(job.id), "--no-progress", "--takeover-after", "1")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM archive") == ROWS   # a duplicate would fail COPY
    assert bf.verify(job.id).ok


@pytest.mark.parametrize(("args", "message"), [
    (["--map", "category=nope"], "column 'nope' does not exist"),
    (["--map", "nope=kind"], "column 'nope' does not exist"),
    (["--workers"], "runs inline"),
    (["--on-conflict", "nothing"], "on_conflict must be error"),
    (["--columns", "id,colour"], "column 'colour' of public.archive has no source column"),
])
def test_bad_cross_database_copies_are_refused(dsn: str, source: str, args: list[str],
                                               message: str) -> None:
    _dest(dsn)
    r = cli(dsn, "enqueue", "-t", "events", "--dest", "archive", "--source", source, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM backfill.jobs") == 0


def test_bad_sources_are_refused(dsn: str, source: str) -> None:
    _dest(dsn)
    for src, message in ((source + " password=secret", "must not carry a password"),
                         (source, "table 'missing' does not exist")):
        table = "missing" if "missing" in message else "events"
        r = cli(dsn, "enqueue", "-t", table, "--dest", "archive", "--source", src)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr
        assert "secret" not in r.stderr
    r = cli(dsn, "enqueue", "-t", "events", "--dest", "nowhere", "--source", source)
    assert r.returncode == 2
    assert "table 'nowhere' does not exist" in r.stderr
    r = cli(dsn, "enqueue", "-t", "archive", "--dest", "archive", "--source", dsn)
    assert r.returncode == 2
    assert "the destination is the source table itself" in r.stderr


def _whole_dest(dsn: str) -> None:
    _dest(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:   # a move must keep every column
        c.execute("ALTER TABLE archive ADD COLUMN note text")


def test_a_move_between_databases_deletes_only_what_arrived_unchanged(
        dsn: str, source: str) -> None:
    _whole_dest(dsn)
    with psycopg.connect(source, autocommit=True) as c:
        c.execute("DELETE FROM events WHERE id > 20000")
    bf = Backfill(dsn)
    r = cli(dsn, "enqueue", "--kind", "move", "-t", "events", "--dest", "archive", "--source",
            source, "--map", "category=kind", "--batch-size", "2000", "-q")
    assert r.returncode == 0, r.stderr
    move = int(r.stdout.strip())
    expected = _sum(source, "events", "id, kind, amount, tags, at")
    r = cli(dsn, "run", str(move), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM archive") == 20_000
    assert _sum(dsn, "archive", "id, category, amount, tags, at") == expected
    assert scalar(source, "SELECT count(*) FROM events") == 0
    phase2 = [j for j in bf.list(include_finished=True) if j.name.startswith(f"move job {move}")]
    assert len(phase2) == 1
    assert phase2[0].state == "succeeded"
    assert bf.verify(phase2[0].id).ok
    assert bf.move_phase2(move) == phase2[0]
    assert f"phase 2   job {phase2[0].id} (succeeded)" in cli(dsn, "show", str(move)).stdout


def test_a_move_from_a_partitioned_source_deletes_only_the_rows_it_moved(
        dsn: str, source: str) -> None:
    """ctids repeat across a partitioned table's partitions: the second phase deletes each
    row by (partition, ctid), so rows of other partitions sharing a ctid (here: the rows
    the filter keeps out, and rows arriving after the copy) stay."""
    _whole_dest(dsn)
    with psycopg.connect(source, autocommit=True) as c:
        c.execute("CREATE TABLE pevents (LIKE events INCLUDING ALL) PARTITION BY HASH (id)")
        for r in range(3):
            c.execute(f"CREATE TABLE pevents_{r} PARTITION OF pevents "
                      f"FOR VALUES WITH (MODULUS 3, REMAINDER {r})")
        c.execute("INSERT INTO pevents SELECT * FROM events WHERE id <= 6000")
    r = cli(dsn, "enqueue", "--kind", "move", "-t", "pevents", "--dest", "archive", "--source",
            source, "--map", "category=kind", "--where", "amount % 2 = 0",
            "--batch-size", "500", "-q")
    assert r.returncode == 0, r.stderr
    move = int(r.stdout.strip())
    kept = _sum(source, "pevents WHERE amount % 2 = 1", "id, kind, amount, tags, at, note")
    r = cli(dsn, "run", str(move), "--no-progress", "--skip-preflight")
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM archive") == 3_000
    assert scalar(source, "SELECT count(*) FROM pevents WHERE amount % 2 = 0") == 0
    assert scalar(source, "SELECT count(*) FROM pevents") == 3_000
    assert _sum(source, "pevents", "id, kind, amount, tags, at, note") == kept


def test_a_move_whose_phase_2_was_not_created_resumes_with_run(dsn: str, source: str) -> None:
    """The moment between the copy's end and the delete phase's creation fails (the process
    killed, the source unreachable): `run MOVE` later creates phase 2 and finishes it."""
    _whole_dest(dsn)
    with psycopg.connect(source, autocommit=True) as c:
        c.execute("DELETE FROM events WHERE id > 3000")
    bf = Backfill(dsn)
    move = bf.enqueue(JobSpec("move", "events", dest="archive", source_dsn=source,
                              column_map=(("category", "kind"),)).with_options(batch_size=1000))
    from backfill.engine.runner import Runner
    assert Runner(dsn, move.id, actor="tester").run().state == "succeeded"   # copy only
    assert bf.move_phase2(move.id) is None
    assert scalar(source, "SELECT count(*) FROM events") == 3000   # in both databases
    shown = cli(dsn, "show", str(move.id)).stdout
    assert f"phase 2   not started: `backfill run {move.id}` starts it" in shown
    r = cli(dsn, "run", str(move.id), "--no-progress", "--skip-preflight")
    assert r.returncode == 0, r.stderr
    assert scalar(source, "SELECT count(*) FROM events") == 0
    assert scalar(dsn, "SELECT count(*) FROM archive") == 3000
    phase2 = bf.move_phase2(move.id)
    assert phase2 is not None
    assert phase2.state == "succeeded"
    # Run again: both phases are done, nothing to do, no third job.
    r = cli(dsn, "run", str(move.id), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert bf.move_phase2(move.id) == bf.get(phase2.id)


def test_a_move_of_a_quoted_table_finishes_and_a_lookalike_job_proves_nothing(
        dsn: str, source: str) -> None:
    """Phase 2 names the source as SQL reads it (a quoted name with a space and capitals), and
    is found by the event that recorded it on the move, not by a job named alike."""
    with psycopg.connect(source, autocommit=True) as c:
        c.execute('CREATE TABLE "Sales Data" (id bigint PRIMARY KEY, v int)')
        c.execute('INSERT INTO "Sales Data" SELECT i, i FROM generate_series(1, 500) i')
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute('CREATE TABLE "Sales Archive" (id bigint PRIMARY KEY, v int)')
        c.execute("CREATE TABLE decoy (id bigint PRIMARY KEY, note text)")
        c.execute("INSERT INTO decoy SELECT i FROM generate_series(1, 10) i")
    bf = Backfill(dsn)
    move = bf.enqueue(JobSpec("move", '"Sales Data"', dest='"Sales Archive"',
                              source_dsn=source).with_options(batch_size=200))
    # A job named like the move's second phase, done: it must not pass for it.
    decoy = bf.enqueue(update("decoy", {"note": "'x'"},
                              name=f"move job {move.id}, phase 2: the source rows go"))
    assert bf.run(decoy.id, skip_preflight=True).state == "succeeded"
    assert bf.run(move.id, skip_preflight=True).state == "succeeded"
    assert scalar(source, 'SELECT count(*) FROM "Sales Data"') == 0
    assert scalar(dsn, 'SELECT count(*) FROM "Sales Archive"') == 500
    phase2 = bf.move_phase2(move.id)
    assert phase2 is not None
    assert phase2.id != decoy.id
    assert phase2.state == "succeeded"


def test_a_move_refuses_to_delete_rows_changed_since_the_copy(dsn: str, source: str) -> None:
    _whole_dest(dsn)
    with psycopg.connect(source, autocommit=True) as c:
        c.execute("DELETE FROM events WHERE id > 5000")
    bf = Backfill(dsn)
    move = bf.enqueue(JobSpec("move", "events", dest="archive", source_dsn=source,
                              column_map=(("category", "kind"),)).with_options(batch_size=1000))
    # Phase 1 only (the runner alone), then a change on the source, then phase 2.
    from backfill.engine.runner import Runner
    assert Runner(dsn, move.id, actor="tester").run().state == "succeeded"
    with psycopg.connect(source, autocommit=True) as c:
        c.execute("UPDATE events SET amount = -5 WHERE id = 3500")
    phase2 = bf._move_delete_phase(bf.get(move.id))
    done = bf.run(phase2.id, skip_preflight=True)
    assert done.state == "failed"
    assert "their contents differ" in (done.last_error or "")
    # The range holding the changed row, and every later one, stay; earlier ones are gone.
    assert scalar(source, "SELECT amount FROM events WHERE id = 3500") == -5
    assert scalar(source, "SELECT count(*) FROM events WHERE id > 3500") == 1500
    assert scalar(source, "SELECT count(*) FROM events") < 5000


def test_different_session_settings_on_the_two_sides_change_nothing(
        dsn: str, source: str) -> None:
    """COPY text and checksums are made under the same settings on both sides."""
    dbname = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    with psycopg.connect(source, autocommit=True) as c:
        c.execute(f"ALTER DATABASE {dbname} SET DateStyle = 'SQL, DMY'")
        c.execute(f"ALTER DATABASE {dbname} SET TimeZone = 'Europe/Paris'")
        c.execute(f"ALTER DATABASE {dbname} SET extra_float_digits = 0")
        c.execute("CREATE TABLE readings (id bigint PRIMARY KEY, d date, f float8, "
                  "iv interval, t timestamp)")
        c.execute("""INSERT INTO readings SELECT g, date '2024-03-05' + g, 1.0 / 3 + g,
                     make_interval(days => -g, hours => 2), timestamp '2024-01-01' + g * interval '1 h'
                     FROM generate_series(1, 3000) g""")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE readings (id bigint PRIMARY KEY, d date, f float8, "
                  "iv interval, t timestamptz)")    # t retyped on the way
    r = cli(dsn, "enqueue", "--kind", "move", "-t", "readings", "--dest", "readings",
            "--source", source, "--batch-size", "500", "-q")
    assert r.returncode == 0, r.stderr
    r = cli(dsn, "run", r.stdout.strip(), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert scalar(source, "SELECT count(*) FROM readings") == 0       # phase 2 matched all
    assert scalar(dsn, "SELECT count(*) FROM readings") == 3000
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'")
        row = c.execute("SELECT d::text, f, iv::text, t::text FROM readings WHERE id = 1"
                        ).fetchone()
    # The date is not day/month swapped, the float keeps every digit, the interval its sign,
    # and the timestamp taken as UTC (the copy's session zone), not Paris.
    assert row == ("2024-03-06", 1.0 / 3 + 1, "-1 days +02:00:00", "2024-01-01 01:00:00+00")


def test_column_maps_are_checked(dsn: str, source: str) -> None:
    _dest(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("ALTER TABLE archive ADD COLUMN kind text")
    r = cli(dsn, "enqueue", "-t", "events", "--dest", "archive", "--source", source,
            "--map", "category=kind")
    assert r.returncode == 2
    assert "would be copied twice" in r.stderr
    r = cli(dsn, "enqueue", "-t", "archive", "--dest", "archive", "--map", "category=kind")
    assert r.returncode == 2
    assert "is for copies from another database" in r.stderr
    r = cli(dsn, "enqueue", "--kind", "move", "-t", "events", "--dest", "archive", "--source",
            source, "--columns", "id,category,amount,tags,at", "--map", "category=kind")
    assert r.returncode == 2
    assert "would not be copied" in r.stderr
