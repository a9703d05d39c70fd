"""A MySQL/MariaDB table copied as a normal job (`backfill enqueue --kind copy --source
mysql://…`), against a real MariaDB and a real PostgreSQL: awkward values on a composite key,
a SIGKILL of the runner and a rerun that ends with exactly the source rows, bad input refused
at enqueue with nothing written, a refused value failing the job with its key and the cast,
verify, and the job's steering (show, list, pause, resume, cancel)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import psycopg
import pytest

from backfill import Backfill, JobState, copy
from tests.integration.helpers import cli, cli_popen, kill_run_after, scalar, wait_for
from tests.integration.mysqlhelpers import mysql_exec, mysql_rows

pytest_plugins = ["tests.integration.mysqlserver"]
pytestmark = pytest.mark.timeout(240)


def pg_all(dsn, query):
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(query).fetchall()


def jobs_count(dsn):
    return scalar(dsn, "SELECT count(*) FROM backfill.jobs")


def convert(dsn, mariadb, db, table, *extra):
    res = cli(dsn, "convert-schema", "--source", mariadb.dsn(db), "--tables", table,
              "--apply", *extra)
    assert res.returncode == 0, res.stderr


def enqueue(dsn, mariadb, db, table, dest, *extra):
    return cli(dsn, "enqueue", "--kind", "copy", "--source", mariadb.dsn(db), "-t", table,
               "--dest", dest, *extra)


AWKWARD = """
    CREATE TABLE ledger (region char(2) NOT NULL, at datetime(6) NOT NULL, n int NOT NULL,
      amount decimal(20,6), rate double, note varchar(40), ts timestamp(3) NULL,
      PRIMARY KEY (region, at, n)) CHARACTER SET utf8mb4"""


def test_a_composite_key_copy_runs_as_a_job_and_verifies(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, AWKWARD, """
        INSERT INTO ledger VALUES
         ('eu', '2024-02-29 23:59:59.999999', 1, 12345678901234.000001, 0.1, 'café ☕',
          '2024-03-10 02:30:00.001'),
         ('eu', '2024-02-29 23:59:59.999999', 2, -0.000001, NULL, NULL, NULL),
         ('eu', '2024-03-01 00:00:00.000000', 1, 0, 1e300, '', '1970-01-01 00:00:01'),
         ('EU', '2024-03-01 00:00:00.000001', 3, NULL, -2.5, 'Ünïcödé 𝄞', NULL),
         ('us', '2000-01-01 00:00:00', 7, 99999999999999.999999, 3.14159, 'x', NULL)""",
               "INSERT INTO ledger SELECT 'zz', '2024-01-01' + INTERVAL seq SECOND, seq, seq / 7, "
               "seq, concat('n', seq), NULL FROM seq_1_to_500")
    convert(dsn, mariadb, mysql_db, "ledger")
    res = enqueue(dsn, mariadb, mysql_db, "ledger", "ledger", "--batch-size", "7", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    rec = Backfill(dsn).get(job)
    assert rec.state == JobState.PENDING
    assert tuple(rec.key_columns) == ("region", "at", "n")
    assert rec.spec.source_plan["key"] == ["region", "at", "n"]
    assert pg_all(dsn, "SELECT count(*) FROM ledger") == [(0,)]   # enqueue writes nothing

    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert Backfill(dsn).get(job).state == JobState.SUCCEEDED
    rows = pg_all(dsn, "SELECT region, at, n, amount, rate, note, ts FROM ledger "
                       "WHERE region <> 'zz' ORDER BY n, region")
    assert (("eu", dt.datetime(2024, 2, 29, 23, 59, 59, 999999), 1,
             Decimal("12345678901234.000001"), 0.1, "café ☕",
             dt.datetime(2024, 3, 10, 2, 30, 0, 1000, tzinfo=dt.UTC)) in rows)
    assert ("eu", dt.datetime(2024, 2, 29, 23, 59, 59, 999999), 2, Decimal("-0.000001"),
            None, None, None) in rows
    assert ("EU", dt.datetime(2024, 3, 1, 0, 0, 0, 1), 3, None, -2.5, "Ünïcödé 𝄞", None) in rows
    assert pg_all(dsn, "SELECT count(*) FROM ledger") == [(505,)]
    assert scalar(dsn, "SELECT amount::text FROM ledger WHERE region = 'us'") == \
        "99999999999999.999999"

    for args in (("show", str(job)), ("list", "--all")):
        res = cli(dsn, *args)
        assert res.returncode == 0, res.stderr
        assert "ledger" in res.stdout
    res = cli(dsn, "verify", str(job), "--chunk", "50")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "505 rows" in res.stdout

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("UPDATE ledger SET amount = amount + 0.000001 WHERE region = 'zz' AND n = 250")
    res = cli(dsn, "verify", str(job), "--chunk", "50")
    assert res.returncode == 1
    assert "different: (zz, 2024-01-01 00:04:10, 250)" in res.stdout


def test_sigkill_mid_run_then_run_again_copies_each_row_once(mariadb, mysql_db, dsn):
    rows = 20_000
    mysql_exec(mariadb, mysql_db, """
        CREATE TABLE items (tenant int NOT NULL, seq bigint NOT NULL, name varchar(40) NOT NULL,
          amount decimal(12,2), UNIQUE KEY (tenant, seq))""", f"""
        INSERT INTO items SELECT seq % 7, seq, concat('item ', seq), seq / 100
        FROM seq_1_to_{rows}""")
    convert(dsn, mariadb, mysql_db, "items")
    res = enqueue(dsn, mariadb, mysql_db, "items", "items", "--batch-size", "200",
                  "--max-batch-size", "200", "--pause", "20ms", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    kill_run_after(dsn, job, 5)
    partial = scalar(dsn, "SELECT count(*) FROM items")
    assert 1000 <= partial < rows
    assert Backfill(dsn).progress(job).rows_affected == partial  # committed with the rows

    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    src = mysql_rows(mariadb, mysql_db, "SELECT tenant, seq, name, amount FROM items "
                                        "ORDER BY tenant, seq")
    dst = pg_all(dsn, "SELECT tenant, seq, name, amount FROM items ORDER BY tenant, seq")
    assert dst == [tuple(r) for r in src]
    res = cli(dsn, "verify", str(job))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("which", ["mariadb", "postgres"])
def test_a_run_survives_a_restart_of_either_server(which, mariadb, mysql_db, dsn, pg_server):
    if which == "postgres" and pg_server is None:
        pytest.skip("an external PostgreSQL (BACKFILL_TEST_DSN) is not ours to restart")
    rows = 12_000
    mysql_exec(mariadb, mysql_db, """
        CREATE TABLE r (id int NOT NULL PRIMARY KEY, v varchar(20) NOT NULL, n decimal(9,3))""",
               f"INSERT INTO r SELECT seq, concat('v', seq), seq / 8 FROM seq_1_to_{rows}")
    convert(dsn, mariadb, mysql_db, "r")
    res = enqueue(dsn, mariadb, mysql_db, "r", "r", "--batch-size", "200", "--max-batch-size",
                  "200", "--pause", "20ms", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    bf = Backfill(dsn)
    proc = cli_popen(dsn, "run", str(job), "--no-progress")
    try:
        wait_for(lambda: bf.progress(job).batches >= 5, timeout=60, what="some batches")
        if which == "mariadb":
            mariadb.restart()
        else:
            # A fast stop: it breaks every connection mid-batch as a crash does, but the shared
            # test server runs with synchronous_commit off, so a crash (immediate) could also
            # forget the last commits, which no client can keep.
            pg_server.restart(mode="fast")
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert scalar(dsn, "SELECT count(*) FROM r") == rows
    # the restart came mid-run: the batch it broke was retried after reconnecting
    assert scalar(dsn, "SELECT count(*) FROM backfill.events WHERE job_id = %s AND "
                       "kind = 'retry'", (job,)) >= 1
    res = cli(dsn, "verify", str(job))
    assert res.returncode == 0, res.stdout + res.stderr


def test_pause_resume_and_cancel_steer_the_job(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE p (id int PRIMARY KEY, v text)",
               "INSERT INTO p SELECT seq, repeat('v', seq % 50) FROM seq_1_to_3000")
    convert(dsn, mariadb, mysql_db, "p")
    bf = Backfill(dsn)
    job = bf.enqueue(copy("p", "p", source_dsn=mariadb.dsn(mysql_db), batch_size=100))
    plan = bf.plan(job.id)
    assert plan.statement == "COPY public.p (id, v) FROM STDIN"
    assert plan.key == ("id",)
    res = cli(dsn, "pause", str(job.id))
    assert res.returncode == 0, res.stderr
    res = cli(dsn, "resume", str(job.id))
    assert res.returncode == 0, res.stderr
    res = cli(dsn, "run", str(job.id), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert scalar(dsn, "SELECT count(*) FROM p") == 3000

    mysql_exec(mariadb, mysql_db, "CREATE TABLE q (id int PRIMARY KEY)")
    convert(dsn, mariadb, mysql_db, "q")
    other = bf.enqueue(copy("q", "q", source_dsn=mariadb.dsn(mysql_db)))
    res = cli(dsn, "cancel", str(other.id))
    assert res.returncode == 0, res.stderr
    assert bf.get(other.id).state == JobState.CANCELLED


def test_bad_input_is_refused_at_enqueue_with_nothing_written(mariadb, mysql_db, dsn):
    from tests.integration.servers import free_port

    mysql_exec(mariadb, mysql_db, "CREATE TABLE k (id int PRIMARY KEY, v int)",
               "CREATE TABLE nokey (id int, v int)")
    convert(dsn, mariadb, mysql_db, "k")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE nokey (id int, v int)")
    port = mariadb.dsn(mysql_db).split(":")[2].split("/")[0]
    cases = {
        "password": (["--kind", "copy", "--source",
                      f"mysql://backfill:hunter2@127.0.0.1:{port}/{mysql_db}", "-t", "k",
                      "--dest", "k"], "must not carry a password"),
        "no key": (["--kind", "copy", "--source", mariadb.dsn(mysql_db), "-t", "nokey",
                    "--dest", "nokey"], "has no usable key"),
        "unreachable": (["--kind", "copy", "--source",
                         f"mysql://backfill@127.0.0.1:{free_port()}/{mysql_db}"
                         f"?read_default_file={mariadb.option_file}&connect_timeout=2",
                         "-t", "k", "--dest", "k"], "cannot connect to MySQL"),
        "workers": (["--kind", "copy", "--source", mariadb.dsn(mysql_db), "-t", "k",
                     "--dest", "k", "--workers"], "runs inline"),
        "no destination": (["--kind", "copy", "--source", mariadb.dsn(mysql_db), "-t", "k",
                            "--dest", "missing"], "missing"),
    }
    for what, (args, message) in cases.items():
        res = cli(dsn, "enqueue", *args)
        assert res.returncode == 2, (what, res.stdout, res.stderr)
        assert message in res.stderr, (what, res.stderr)
        assert "hunter2" not in res.stdout + res.stderr
    assert jobs_count(dsn) == 0
    assert scalar(dsn, "SELECT count(*) FROM k") == 0


def test_a_refused_value_fails_the_job_naming_the_key_and_the_cast(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db,
               "CREATE TABLE u (id int PRIMARY KEY, raw varbinary(10))",
               "INSERT INTO u VALUES (1, 'ok'), (2, x'c328'), (3, 'fine')")
    convert(dsn, mariadb, mysql_db, "u", "--cast", "u.raw=text")
    res = enqueue(dsn, mariadb, mysql_db, "u", "u", "--cast", "u.raw=text", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode != 0
    rec = Backfill(dsn).get(job)
    assert rec.state == JobState.FAILED
    assert "u row (id=2), column raw: invalid UTF-8" in (rec.last_error or "")
    assert "--cast 'u.raw=bytea'" in (rec.last_error or "")
    assert scalar(dsn, "SELECT count(*) FROM u") == 0   # its batch committed nothing
    assert json.dumps(rec.spec.to_json())   # the stored plan is plain JSON


def test_a_migration_copies_from_mysql_with_a_copy_from_operation(mariadb, mysql_db, dsn,
                                                                  tmp_path):
    mysql_exec(mariadb, mysql_db,
               "CREATE TABLE m (a int NOT NULL, b varchar(10) NOT NULL, v decimal(8,3), "
               "PRIMARY KEY (a, b))",
               "INSERT INTO m SELECT seq % 13, concat('b', seq), seq / 3 FROM seq_1_to_2000")
    convert(dsn, mariadb, mysql_db, "m")
    path = tmp_path / "m.toml"
    path.write_text(f'id = "m-copy"\n[[operations]]\nop = "copy_from"\n'
                    f'source = "{mariadb.dsn(mysql_db)}"\ntable = "m"\ndest = "m"\n'
                    f'backfill = {{ batch_size = 300 }}\n')
    res = cli(dsn, "migrate", "start", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert scalar(dsn, "SELECT count(*) FROM m") == 2000
    job = scalar(dsn, "SELECT max(id) FROM backfill.jobs")
    assert Backfill(dsn).get(job).state == JobState.SUCCEEDED
    src = mysql_rows(mariadb, mysql_db, "SELECT a, b, v FROM m ORDER BY a, b")
    assert sorted(pg_all(dsn, "SELECT a, b, v FROM m")) == sorted(tuple(r) for r in src)

    bad = tmp_path / "bad.toml"
    bad.write_text(f'id = "m-bad"\n[[operations]]\nop = "copy_from"\n'
                   f'source = "mysql://u:secret@127.0.0.1/{mysql_db}"\ntable = "m"\n'
                   f'dest = "m"\n')
    res = cli(dsn, "migrate", "plan", str(bad))
    assert res.returncode == 2
    assert "must not carry a password" in res.stderr


def test_binary_decimal_and_timestamp_keys_resume_and_verify(mariadb, mysql_db, dsn):
    """The cursor round-trips every orderable key type through the job store (bytes as hex,
    decimals exactly, TIMESTAMP in UTC), batch after batch."""
    mysql_exec(mariadb, mysql_db, """
        CREATE TABLE kk (b varbinary(8) NOT NULL, d decimal(10,2) NOT NULL,
          ts timestamp(3) NOT NULL DEFAULT '2000-01-01', dt date NOT NULL, v int,
          PRIMARY KEY (b, d, ts, dt))""",
               "INSERT INTO kk SELECT unhex(lpad(hex(seq % 5), 4, '0')), seq / 4, "
               "'2024-01-01 00:00:00.001' + INTERVAL (seq % 3) SECOND, "
               "'2024-01-01' + INTERVAL (seq % 2) DAY, seq FROM seq_1_to_300")
    convert(dsn, mariadb, mysql_db, "kk")
    res = enqueue(dsn, mariadb, mysql_db, "kk", "kk", "--batch-size", "7", "--max-batch-size",
                  "7", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert scalar(dsn, "SELECT count(*) FROM kk") == 300
    assert scalar(dsn, "SELECT sum(v) FROM kk") == sum(range(1, 301))
    assert Backfill(dsn).progress(job).batches >= 300 // 7
    res = cli(dsn, "verify", str(job), "--chunk", "40")
    assert res.returncode == 0, res.stdout + res.stderr


def test_pause_mid_run_then_run_again_and_an_empty_table(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE w (id int PRIMARY KEY, u int NOT NULL, "
               "UNIQUE KEY (u))",
               "INSERT INTO w SELECT seq, 100000 - seq FROM seq_1_to_5000")
    convert(dsn, mariadb, mysql_db, "w")
    res = enqueue(dsn, mariadb, mysql_db, "w", "w", "--key", "u", "--batch-size", "100",
                  "--max-batch-size", "100", "--pause", "20ms", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    bf = Backfill(dsn)
    assert tuple(bf.get(job).key_columns) == ("u",)
    proc = cli_popen(dsn, "run", str(job), "--no-progress")
    try:
        wait_for(lambda: bf.progress(job).batches >= 3, timeout=60, what="some batches")
        res = cli(dsn, "pause", str(job))
        assert res.returncode == 0, res.stderr
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert bf.get(job).state == JobState.PAUSED
    partial = scalar(dsn, "SELECT count(*) FROM w")
    assert 0 < partial < 5000
    assert cli(dsn, "resume", str(job)).returncode == 0
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert scalar(dsn, "SELECT count(*) FROM w") == 5000
    assert scalar(dsn, "SELECT count(DISTINCT u) FROM w") == 5000

    mysql_exec(mariadb, mysql_db, "CREATE TABLE e (id int PRIMARY KEY)")
    convert(dsn, mariadb, mysql_db, "e")
    res = enqueue(dsn, mariadb, mysql_db, "e", "e", "-q")
    assert res.returncode == 0, res.stderr
    empty = int(res.stdout.strip())
    assert cli(dsn, "run", str(empty), "--no-progress").returncode == 0
    assert bf.get(empty).state == JobState.SUCCEEDED


def _run_until_changed(dsn, mariadb, mysql_db, table, change):
    """Run the job of ``table`` in its own process, ``change`` the source table after a few
    batches; the job's record once the run ends, and how long the run took after the change."""
    import subprocess
    import time

    from tests.integration.helpers import wait_for

    convert(dsn, mariadb, mysql_db, table)
    res = enqueue(dsn, mariadb, mysql_db, table, table, "--batch-size", "100",
                  "--max-batch-size", "100", "--pause", "30ms", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    bf = Backfill(dsn)
    proc = cli_popen(dsn, "run", str(job), "--no-progress", output=subprocess.DEVNULL)
    try:
        wait_for(lambda: bf.progress(job).batches >= 3, timeout=60, what="3 batches")
        mysql_exec(mariadb, mysql_db, change)
        changed = time.monotonic()
        assert proc.wait(timeout=60) != 0
        took = time.monotonic() - changed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return bf.get(job), took


def test_a_column_dropped_mid_job_fails_it_as_a_changed_table_at_once(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE dc (id int PRIMARY KEY, v int, w text)",
               "INSERT INTO dc SELECT seq, seq, 'w' FROM seq_1_to_5000")
    rec, took = _run_until_changed(dsn, mariadb, mysql_db, "dc", "ALTER TABLE dc DROP COLUMN w")
    assert rec.state == JobState.FAILED
    assert "changed since the job was planned" in (rec.last_error or "")
    assert "lost the connection" not in (rec.last_error or "")
    assert took < 20   # not retried for the reconnect timeout


def test_the_key_index_dropped_mid_job_fails_it_naming_the_change(mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, "CREATE TABLE dk (id int NOT NULL, v int, UNIQUE KEY uk (id))",
               "INSERT INTO dk SELECT seq, seq FROM seq_1_to_5000")
    rec, took = _run_until_changed(dsn, mariadb, mysql_db, "dk", "ALTER TABLE dk DROP KEY uk")
    assert rec.state == JobState.FAILED
    assert "the unique index on its key (id) was dropped or changed" in (rec.last_error or "")
    assert took < 20


@pytest.mark.parametrize(("rows", "shown"), [
    ("('2024-01-01', 1), ('0000-00-00', 2), ('2024-01-02', 3)", "d='0000-00-00', n=2"),
    ("('0000-00-00', 1)", "d='0000-00-00', n=1"),   # the whole range's upper key
])
def test_a_zero_date_in_a_key_fails_the_job_naming_the_row(rows, shown, mariadb, mysql_db, dsn):
    mysql_exec(mariadb, mysql_db, "SET SESSION sql_mode = ''",
               "CREATE TABLE zd (d date NOT NULL, n int NOT NULL, v int, PRIMARY KEY (d, n))",
               f"INSERT INTO zd (d, n) VALUES {rows}")
    convert(dsn, mariadb, mysql_db, "zd")
    res = enqueue(dsn, mariadb, mysql_db, "zd", "zd", "-q")
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip())
    res = cli(dsn, "run", str(job), "--no-progress")
    assert res.returncode != 0
    want = (f"zd row ({shown}), column d: a zero date in a key column, which has no "
            "PostgreSQL date")
    assert want in " ".join(res.stderr.split()), res.stderr
    assert "UPDATE zd SET d = ... WHERE d = '0000-00-00' AND n = " in " ".join(res.stderr.split())
    # Refused in a batch, or before the range is cut (the whole range's upper key): either
    # way the job fails, naming the row; it is not left running under a runner that has gone.
    rec = Backfill(dsn).get(job)
    assert rec.state == JobState.FAILED
    assert want in " ".join((rec.last_error or "").split())
    assert scalar(dsn, "SELECT count(*) FROM zd") == 0
