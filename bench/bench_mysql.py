#!/usr/bin/env python3
"""MySQL/MariaDB → PostgreSQL benchmark (issue 18): pgloader 3.6 against backfill's resumable
copy on the same table, side by side in one run, then the catch-up's lag under a write load.

One throwaway MariaDB (binlog ROW, full images and metadata) holds ``bench.bench_t``, loaded
once (a realistic shape: bigint auto_increment key, int, decimal(12,2), varchar(64),
datetime(6), tinyint(1), a nullable text); one throwaway PostgreSQL (durable settings) takes
each run in a fresh database.

- ``pgloader``: the OS package's ``pgloader`` with its default casts, one process, timed from
  start to exit (it creates the schema, loads, builds the key's index, resets the sequence).
  It connects as a throwaway MySQL user with a password (in a 0600 load file).
- ``backfill``: ``backfill convert-schema --apply`` then ``backfill mysql copy`` as a user
  runs them (two processes, timed from the first's start to the second's exit); every batch
  commits with its checkpoint.

Repeats are interleaved (one run of each per round, the starting method rotated); the row
count is checked after every run. Then the lag run, on a fresh destination database: the
copy, then ``backfill mysql catch-up --follow`` in its own process while a load process
writes ``--rate`` single-row changes/s to the source (inserts, updates, deletes); the bench
samples ``measure_lag`` every 0.5 s for ``--load-seconds``, stops the load, waits for the
follower to drain, stops it (SIGINT) and runs ``verify_table``.

    .venv/bin/python bench/bench_mysql.py                          # 1M rows, 2 repeats, 30 s load
    .venv/bin/python bench/bench_mysql.py --rows 100000 --repeats 1 --load-seconds 10  # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backfill_dev.localpg import LocalPostgres, find_pg_bindir  # noqa: E402
from tests.integration.mysqlserver import MariaDB  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
DB = "bench"
TABLE = "bench_t"
METHODS = ("pgloader", "backfill")
TARGET_RATIO = 0.7
TARGET_LAG_S = 5.0
SAMPLE_EVERY_S = 0.5
DRAIN_TIMEOUT_S = 120.0

CREATE = f"""
CREATE TABLE {TABLE} (
    id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id int NOT NULL,
    amount decimal(12,2) NOT NULL,
    label varchar(64) NOT NULL,
    created_at datetime(6) NOT NULL,
    active tinyint(1) NOT NULL,
    note text NULL,
    KEY (account_id)
) ENGINE=InnoDB"""

# Deterministic values from MariaDB's sequence engine; every 4th note is NULL.
LOAD = f"""
INSERT INTO {TABLE} (id, account_id, amount, label, created_at, active, note)
SELECT seq, seq * 7919 % 100000, (seq * 104729 % 100000000) / 100,
       concat('customer-', seq % 50000, '-', left(md5(seq), 12)),
       TIMESTAMP '2024-01-01 00:00:00' + INTERVAL seq * 1234567 MICROSECOND,
       seq % 3 = 0,
       IF(seq % 4 = 0, NULL, concat('order ', md5(seq), ' ', repeat('x', seq % 40)))
FROM seq_1_to_{{rows}}"""


class BenchError(RuntimeError):
    """A run failed or produced wrong data: the benchmark stops."""


# -- servers -------------------------------------------------------------------------------------


class BenchMariaDB(MariaDB):
    """The test server's settings, with a buffer pool that holds the table (a source's
    working set is usually cached) and durable commits for the load's writes."""

    sizing = ("--innodb-buffer-pool-size=512M", "--innodb-log-file-size=256M",
              "--max-connections=200")

    def start(self) -> None:
        try:
            super().start()
        except AssertionError as exc:   # the test server's readiness check failed
            raise BenchError(f"MariaDB did not start: {exc}") from None


def mysql_setup(server: BenchMariaDB, rows: int) -> tuple[str, str]:
    """Create and load the table; a throwaway ``pgloader`` user with a password. Returns
    (its password, the source's checksum line)."""
    server.create_database(DB)
    conn = server.connect(DB)
    try:
        with conn.cursor() as cur:
            cur.execute(CREATE)
            cur.execute(LOAD.format(rows=int(rows)))
            cur.execute(f"ANALYZE TABLE {TABLE}")
            cur.fetchall()
            cur.execute(f"SELECT count(*), sum(amount), sum(note IS NULL) FROM {TABLE}")
            count, total, nulls = cur.fetchone()
    finally:
        conn.close()
    password = secrets.token_hex(12)
    server.root_sql(
        f"CREATE USER 'pgloader'@'127.0.0.1' IDENTIFIED BY '{password}';"
        f"GRANT SELECT, SHOW VIEW ON `{DB}`.* TO 'pgloader'@'127.0.0.1'")
    return password, f"{count} rows, sum(amount) {total}, {nulls} NULL notes"


def fresh_db(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        c.execute("CHECKPOINT")
    return make_conninfo(admin, dbname=name)


def drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def count_rows(dsn: str) -> int:
    """Rows of ``bench_t`` in whichever schema the tool put it (pgloader: one named after the
    MySQL database)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        found = c.execute("SELECT n.nspname FROM pg_class t JOIN pg_namespace n"
                          " ON n.oid = t.relnamespace WHERE t.relname = %s AND t.relkind = 'r'",
                          (TABLE,)).fetchall()
        if len(found) != 1:
            raise BenchError(f"expected one table {TABLE} in the destination, found {found}")
        row = c.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(found[0][0], TABLE))).fetchone()
    assert row is not None
    return int(row[0])


# -- the two methods ----------------------------------------------------------------------------


def run_pgloader(server: BenchMariaDB, password: str, dest: str, tmp: Path) -> tuple[float, str]:
    d = conninfo_to_dict(dest)
    load = tmp / "bench.load"
    load.write_text(
        f"LOAD DATABASE\n FROM mysql://pgloader:{password}@127.0.0.1:{server.port}/{DB}\n"
        f" INTO postgresql://{d['user']}@{d['host']}:{d['port']}/{d['dbname']};\n")
    load.chmod(0o600)
    started = time.perf_counter()
    res = subprocess.run(["pgloader", "--no-ssl-cert-verification", str(load)],
                         capture_output=True, text=True, cwd=tmp, check=False)
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        raise BenchError(f"pgloader exited {res.returncode}:\n{res.stdout[-3000:]}"
                         f"\n{res.stderr[-3000:]}")
    return seconds, res.stdout + res.stderr


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BACKFILL_CLI_PLUGINS"] = "backfill.cli.mysql"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def backfill_cmd(dest: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "backfill.cli.main", "--dsn", dest, "--log-level", "warning", *args]


def run_backfill(source_dsn: str, dest: str, batch_size: int) -> tuple[float, float]:
    """(seconds in all, seconds of the convert-schema process)."""
    env = cli_env()
    started = time.perf_counter()
    res = subprocess.run(backfill_cmd(dest, "convert-schema", "--source", source_dsn,
                                      "--tables", TABLE, "--apply"),
                         capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if res.returncode != 0:
        raise BenchError(f"backfill convert-schema exited {res.returncode}:\n"
                         f"{res.stderr[-3000:]}")
    schema_s = time.perf_counter() - started
    res = subprocess.run(backfill_cmd(dest, "mysql", "copy", "--source", source_dsn, "--tables",
                                      TABLE, "--batch-size", str(batch_size)),
                         capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        raise BenchError(f"backfill mysql copy exited {res.returncode}:\n{res.stderr[-3000:]}")
    return seconds, schema_s


# -- the write load --------------------------------------------------------------------------------


def load_process(port: int, password: str, rate: float, max_id: int, stop: Any,
                 counts: Any) -> None:
    """Single-row autocommit writes at ``rate``/s, paced on a schedule: 40 % inserts,
    40 % updates, 20 % deletes of random existing ids."""
    import pymysql  # type: ignore[import-untyped]

    conn = pymysql.connect(host="127.0.0.1", port=port, user="backfill", password=password,
                           database=DB, autocommit=True, charset="utf8mb4")
    rng = random.Random(18)
    interval = 1.0 / rate
    next_at = time.monotonic()
    n = 0
    with conn.cursor() as cur:
        while not stop.is_set():
            r = rng.random()
            if r < 0.4:
                cur.execute(f"INSERT INTO {TABLE} (account_id, amount, label, created_at, active,"
                            " note) VALUES (%s, %s, %s, now(6), %s, %s)",
                            (rng.randrange(100000), f"{rng.randrange(10**8) / 100:.2f}",
                             f"load-{n}", rng.random() < 0.5,
                             None if rng.random() < 0.25 else f"load note {n}"))
            elif r < 0.8:
                cur.execute(f"UPDATE {TABLE} SET amount = amount + 1, note = %s,"
                            " created_at = now(6) WHERE id = %s",
                            (f"updated {n}", rng.randrange(1, max_id + 1)))
            else:
                cur.execute(f"DELETE FROM {TABLE} WHERE id = %s", (rng.randrange(1, max_id + 1),))
            n += 1
            counts.value = n
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    conn.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run_lag(server: BenchMariaDB, source_dsn: str, admin: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    from backfill.mysql import schema
    from backfill.mysql.binlog import measure_lag
    from backfill.mysql.schema import CastOptions
    from backfill.mysql.source import MySQLSource, connect
    from backfill.mysql.verify import verify_table

    dest = fresh_db(admin, "bench_lag")
    copy_s, _ = run_backfill(source_dsn, dest, args.batch_size)
    print(f"lag run: copied in {copy_s:.1f} s; following under {args.rate:g} changes/s "
          f"for {args.load_seconds:g} s", file=sys.stderr, flush=True)
    source = MySQLSource.parse(source_dsn)
    mconn = connect(source, raw=False)
    try:
        plans = schema.convert(mconn, DB, [TABLE], CastOptions.from_specs([]))
    finally:
        mconn.close()
    follower = subprocess.Popen(backfill_cmd(dest, "mysql", "catch-up", "--source", source_dsn,
                                             "--tables", TABLE, "--follow"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(), cwd=REPO)
    stop = mp.Event()
    counts = mp.Value("q", 0)
    loader = mp.Process(target=load_process, args=(server.port, server.password, args.rate,
                                                   args.rows, stop, counts), daemon=True)
    samples: list[dict[str, float]] = []
    try:
        loader.start()
        t0 = time.monotonic()
        next_at = t0
        while time.monotonic() - t0 < args.load_seconds:
            lag = measure_lag(source, dest, plans)
            samples.append({"t": round(time.monotonic() - t0, 3), "seconds": lag.seconds,
                            "events": lag.events})
            if follower.poll() is not None:
                raise BenchError(f"the follower exited {follower.returncode}: "
                                 f"{follower.stderr.read()[-2000:] if follower.stderr else ''}")
            next_at += SAMPLE_EVERY_S
            time.sleep(max(0.0, next_at - time.monotonic()))
        stop.set()
        loader.join(timeout=30)
        written = int(counts.value)
        load_s = time.monotonic() - t0
        stopped = time.monotonic()
        while True:
            lag = measure_lag(source, dest, plans)
            if lag.events == 0:
                break
            if time.monotonic() - stopped > DRAIN_TIMEOUT_S:
                raise BenchError(f"the follower did not drain: {lag}")
            time.sleep(0.2)
        drain_s = time.monotonic() - stopped
    finally:
        stop.set()
        if loader.is_alive():
            loader.terminate()
        if follower.poll() is None:
            follower.send_signal(signal.SIGINT)
            try:
                follower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
    started = time.monotonic()
    report = verify_table(source, dest, plans[0])
    verify_s = time.monotonic() - started
    if not report.ok:
        raise BenchError(f"verify found differences: {report}")
    lag_s = [s["seconds"] for s in samples]
    lag_ev = [s["events"] for s in samples]
    drop_db(admin, "bench_lag")
    return {"copy_seconds": copy_s, "load_seconds": load_s, "changes_written": written,
            "changes_per_s": written / load_s, "samples": samples,
            "lag_s_max": max(lag_s), "lag_s_p95": pct(lag_s, 0.95),
            "lag_events_max": max(lag_ev), "lag_events_p95": pct(lag_ev, 0.95),
            "drain_seconds": drain_s, "verify_seconds": verify_s, "verified_rows":
            report.source_rows,
            "verified": report.ok}


# -- main ---------------------------------------------------------------------------------------


def fmt(values: list[float]) -> tuple[str, str]:
    return (f"{statistics.median(values):,.0f}", f"{min(values):,.0f} - {max(values):,.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=10_000, help="backfill's (its default)")
    ap.add_argument("--load-seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=200.0, help="source changes/s in the lag run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-lag", action="store_true", help="skip the lag run")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if shutil.which("pgloader") is None and "pgloader" in methods:
        print("pgloader is not installed: apt-get install -y pgloader", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-mysql-", dir="/tmp"))
    tmp.chmod(0o755)
    pg = LocalPostgres(tmp / "pg", fast=False)
    my = BenchMariaDB(tmp / "mariadb")
    runs: list[dict[str, Any]] = []
    lag: dict[str, Any] | None = None
    info: dict[str, Any] = {}
    t_all = time.monotonic()
    try:
        pg.init()
        pg.start()
        my.base.mkdir(parents=True, exist_ok=True)
        my.init()
        my.start()
        my.create_user()
        t = time.monotonic()
        password, source_sum = mysql_setup(my, args.rows)
        print(f"source loaded in {time.monotonic() - t:.1f} s: {source_sum}", file=sys.stderr,
              flush=True)
        admin = pg.dsn()
        source_dsn = my.dsn(DB)
        pgl = subprocess.run(["pgloader", "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()
        info = {"pgloader": pgl[0] if pgl else "?",
                "mariadb": my.root_sql("SELECT version()").strip(),
                "postgresql": str(find_pg_bindir()), "python": platform.python_version(),
                "cpus": os.cpu_count(), "source": source_sum}
        for rep in range(args.repeats):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]
            for method in order:
                name = f"bench_{method}_{rep}"
                dest = fresh_db(admin, name)
                schema_s = None
                if method == "pgloader":
                    seconds, _out = run_pgloader(my, password, dest, tmp)
                else:
                    seconds, schema_s = run_backfill(source_dsn, dest, args.batch_size)
                n = count_rows(dest)
                if n != args.rows:
                    raise BenchError(f"{method}: {n} rows in the destination, not {args.rows}")
                drop_db(admin, name)
                runs.append({"repeat": rep, "method": method, "seconds": seconds,
                             "rows_per_s": args.rows / seconds,
                             "schema_seconds": schema_s})
                print(f"repeat {rep + 1} {method:<9} {seconds:7.2f} s "
                      f"{args.rows / seconds:>10,.0f} rows/s", file=sys.stderr, flush=True)
        if not args.no_lag:
            lag = run_lag(my, source_dsn, admin, args)
    finally:
        my.cleanup()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        write_results(args, info, runs, lag, time.monotonic() - t_all)
    return 0


def write_results(args: argparse.Namespace, info: dict[str, Any], runs: list[dict[str, Any]],
                  lag: dict[str, Any] | None, total_s: float) -> None:
    by = {m: [r["rows_per_s"] for r in runs if r["method"] == m] for m in METHODS}
    ratios = []
    for rep in sorted({r["repeat"] for r in runs}):
        per = {r["method"]: r["rows_per_s"] for r in runs if r["repeat"] == rep}
        if "pgloader" in per and "backfill" in per:
            ratios.append(per["backfill"] / per["pgloader"])
    summary: dict[str, Any] = {}
    if runs:
        print(f"\n{args.rows:,} rows, {args.repeats} repeat(s), fresh destination database per "
              f"run; MariaDB {info.get('mariadb', '?')}, {info.get('pgloader', '?')}; "
              f"{info.get('cpus')} shared CPUs (noisy: read the ratios)\n")
        print("| method | rows/s median | min - max | seconds median | vs pgloader |")
        print("|---|---|---|---|---|")
        for m in METHODS:
            if not by[m]:
                continue
            med, rng = fmt(by[m])
            secs = statistics.median(r["seconds"] for r in runs if r["method"] == m)
            ratio = "1.00x" if m == "pgloader" else (
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                if ratios else "-")
            print(f"| {m} | {med} | {rng} | {secs:.1f} | {ratio} |")
        schema = [r["schema_seconds"] for r in runs if r["schema_seconds"] is not None]
        if schema:
            print(f"\nbackfill's seconds include the convert-schema --apply process: "
                  f"{statistics.median(schema):.2f} s (median)")
        if ratios:
            r = statistics.median(ratios)
            summary["ratio_median"] = r
            summary["ratio_min"], summary["ratio_max"] = min(ratios), max(ratios)
            print(f"\nbackfill / pgloader (per repeat): {', '.join(f'{x:.2f}' for x in ratios)}; "
                  f"goal >= {TARGET_RATIO}x: {'met' if r >= TARGET_RATIO else 'NOT met'}")
    if lag is not None:
        print(f"\ncatch-up lag, following for {lag['load_seconds']:.0f} s under "
              f"{lag['changes_per_s']:.0f} changes/s ({lag['changes_written']} written), "
              f"sampled every {SAMPLE_EVERY_S} s ({len(lag['samples'])} samples)\n")
        print("| lag | max | p95 |")
        print("|---|---|---|")
        print(f"| seconds | {lag['lag_s_max']:.1f} | {lag['lag_s_p95']:.1f} |")
        print(f"| row changes | {lag['lag_events_max']} | {lag['lag_events_p95']:.0f} |")
        ok = lag["lag_s_max"] < TARGET_LAG_S
        print(f"\ndrained {lag['drain_seconds']:.1f} s after the load stopped; verify_table: "
              f"{'equal' if lag['verified'] else 'DIFFERENT'} ({lag['verify_seconds']:.0f} s); "
              f"goal max lag < {TARGET_LAG_S:g} s: {'met' if ok else 'NOT met'}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"mysql-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"args": vars(args), "info": info, "runs": runs,
                               "summary": summary, "lag": lag,
                               "total_seconds": total_s}, indent=2, default=str) + "\n")
    print(f"\nresults: {out} (whole run {total_s:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
