#!/usr/bin/env python3
"""Application latency benchmark: each method through its command line, under an application
load on the same table, with a streaming replica (issue 16).

A throwaway primary (durable settings) and a streaming replica. For every method the table
``bench_t`` (bigint key) is freshly loaded, the replica caught up, then a pgbench load starts
(``--clients`` clients at ``--tps`` transactions/s in all, each transaction updating one random
row of ``bench_t`` and reading another) and, a second later, the method runs as a subprocess,
timed from its process start to its exit:

- ``single``: ``psql -c "UPDATE bench_t SET total = …"`` (one transaction);
- ``keyset``: a hand-written keyset loop (10k rows per commit) in a Python process;
- ``backfill``: ``backfill db upgrade``, ``backfill enqueue -t bench_t --set …``,
  ``backfill run`` with the defaults (undo log on);
- ``backfill-no-undo``: the same with ``--no-undo-log``;
- ``backfill-10k``: ``--no-undo-log --batch-size 10000`` fixed (min = max = 10k).

Per method: rows/s ÷ the single UPDATE's (median, min-max over repeats), the application's
p50/p99/max latency over the transactions due while the method ran (from pgbench's
per-transaction log; with ``--rate`` pgbench counts from each transaction's scheduled start,
as an application's user would: a request held back behind a blocked one counts its wait),
and the replica's max lag (an independent heartbeat every 0.25 s). Every run is checked:
every row holds the right total.

    .venv/bin/python bench/bench_app_latency.py --rows 1000000 --repeats 2
    .venv/bin/python bench/bench_app_latency.py --rows 100000 --repeats 1      # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_controller import Sampler, caught_up  # noqa: E402
from bench_engine import (  # noqa: E402
    BENCH_DB,
    EXPR,
    KINDS,
    RESULTS_DIR,
    TABLE,
    check_table,
    human,
    machine_info,
    reset_table,
    run_keyset,
)

from backfill_dev.localpg import LocalPostgres, find_pg_bindir  # noqa: E402

METHODS = ("single", "keyset", "backfill", "backfill-no-undo", "backfill-10k")
LABELS = {
    "single": "one UPDATE of the whole table",
    "keyset": "hand-written keyset loop, 10k rows per commit",
    "backfill": "`backfill run`, defaults (undo log on)",
    "backfill-no-undo": "`backfill run --no-undo-log` (enqueue option)",
    "backfill-10k": "`backfill`, fixed 10k batches, no undo log",
}
#: The application: update one random row, read another, one transaction.
APP_SCRIPT = f"""\\set a random(1, :rows)
\\set b random(1, :rows)
BEGIN;
UPDATE {TABLE} SET qty = qty WHERE id = :a;
SELECT total FROM {TABLE} WHERE id = :b;
END;
"""
DSN_ENV = "BACKFILL_DSN"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "backfill.cli.main", *args]


def method_commands(method: str, bindir: Path, batch: int,
                    enqueue_args: tuple[str, ...] = ()) -> list[list[str]]:
    """The commands a user types, run one after another (each its own process)."""
    set_ = ["-t", TABLE, "--set", f"total = {EXPR}"]
    if method == "single":
        return [[str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                 f"UPDATE {TABLE} SET total = {EXPR}"]]
    if method == "keyset":
        return [[sys.executable, __file__, "--_keyset", str(batch)]]
    extra = {"backfill": [], "backfill-no-undo": ["--no-undo-log"],
             "backfill-10k": ["--no-undo-log", "--batch-size", str(batch), "--min-batch-size",
                              str(batch), "--max-batch-size", str(batch)]}[method]
    return [_cli("db", "upgrade"), _cli("enqueue", *set_, *extra, *enqueue_args, "-q"),
            _cli("run", "{job}", "--no-progress")]


def _child_env(dsn: str) -> dict[str, str]:
    env = dict(os.environ)
    env[DSN_ENV] = dsn
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.setdefault("BACKFILL_LOG_FORMAT", "json")
    return env


def run_method(method: str, dsn: str, bindir: Path, batch: int,
               enqueue_args: tuple[str, ...] = ()) -> tuple[float, list[str]]:
    """Seconds from the first process's start to the last one's exit."""
    env = _child_env(dsn)
    env["PGDATABASE"] = BENCH_DB
    env["PGHOST"], env["PGPORT"], env["PGUSER"] = _conninfo(dsn)
    outputs = []
    started = time.perf_counter()
    job = ""
    for template in method_commands(method, bindir, batch, enqueue_args):
        cmd = [a.replace("{job}", job) for a in template]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600,
                              check=False)
        outputs.append(proc.stdout[-2000:])
        if "-q" in cmd:
            job = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{method}: {' '.join(cmd[:4])}… exited {proc.returncode}:\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started, outputs


def _conninfo(dsn: str) -> tuple[str, str, str]:
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(dsn)
    return str(d.get("host", "")), str(d.get("port", "")), str(d.get("user", ""))


class AppLoad:
    """pgbench running the application script; its per-transaction log read afterwards."""

    def __init__(self, bindir: Path, dsn: str, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        script = workdir / "script.sql"
        script.write_text(APP_SCRIPT)
        host, port, user = _conninfo(dsn)
        self.prefix = workdir / "app"
        cmd = [str(bindir / "pgbench"), "-n", "-f", str(script), "-D", f"rows={args.rows}",
               "-c", str(args.clients), "-j", str(min(2, args.clients)), "-R", str(args.tps),
               "-T", "36000", "-l", f"--log-prefix={self.prefix}", "-h", host, "-p", port,
               "-U", user, BENCH_DB]
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        # pgbench writes its log through stdio buffers: what is lost on the kill is the
        # last few hundred transactions, finished after the measured window (--drain).
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def latencies_ms(self, t0: float, t1: float) -> list[float]:
        """Latency (ms) of every transaction due within [t0, t1] (epoch seconds): with
        --rate, pgbench's latency counts from the scheduled start, so a transaction held
        back behind a blocked client counts with its whole delay."""
        out: list[float] = []
        for path in self.workdir.glob("app.*"):
            for line in path.read_text().splitlines():
                f = line.split()
                if len(f) < 6:
                    continue
                latency = int(f[2]) / 1e6
                due = int(f[4]) + int(f[5]) / 1e6 - latency
                if t0 <= due <= t1:
                    out.append(latency * 1000.0)
            path.unlink()
        return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def one_run(method: str, dsn: str, rdsn: str, bindir: Path, tmp: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    reset_table(dsn, KINDS["bigint"], args.rows)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS backfill CASCADE")  # `db upgrade` is part of the run
    caught_up(dsn, rdsn)
    work = tmp / f"app-{method}-{time.monotonic_ns()}"
    work.mkdir()
    work.chmod(0o777)
    app = AppLoad(bindir, dsn, work, args)
    sampler = Sampler(dsn, rdsn, 0.25)
    lagger = threading.Thread(target=sampler.run, daemon=True)
    lagger.start()
    try:
        time.sleep(args.warmup)
        t0 = time.time()
        elapsed, outputs = run_method(method, dsn, bindir, args.batch_size,
                                      tuple(args.enqueue_args.split()))
        t1 = time.time()
        # pgbench writes its log through an 8 kB stdio buffer per thread and dies on the
        # kill without flushing it: run on until the window's lines are surely written.
        time.sleep(args.drain)
    finally:
        sampler.stop.set()
        app.stop()
        lagger.join(10)
    if app.proc.returncode not in (0, -signal.SIGINT, 130, 2) and app.proc.stderr:
        print(app.proc.stderr.read()[-2000:], file=sys.stderr)
    lat = app.latencies_ms(t0, t1)
    check_table(dsn, args.rows, method)
    batches: dict[str, Any] = {}
    if method.startswith("backfill"):
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute("SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY "
                            "batch_size), percentile_cont(0.5) WITHIN GROUP (ORDER BY "
                            "duration_ms) FROM backfill.batches").fetchone()
        if row:
            batches = {"batches": row[0], "batch_size_median": row[1],
                       "batch_ms_median": row[2]}
    lags = [lag for t, lag, _ in sampler.samples if t >= args.warmup - 0.3]
    return {"method": method, "elapsed_s": elapsed, "rows_per_s": args.rows / elapsed,
            "app_tx": len(lat), "app_p50_ms": percentile(lat, 0.50),
            "app_p99_ms": percentile(lat, 0.99), "app_max_ms": max(lat) if lat else None,
            "lag_max_s": max(lags) if lags else None, "output_tail": outputs[-1][-300:],
            **batches}


def keyset_child(batch: int) -> int:
    dsn = os.environ[DSN_ENV]
    with psycopg.connect(dsn, autocommit=True) as conn:
        run_keyset(conn, KINDS["bigint"], batch)
    return 0


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=10_000,
                   help="Rows per commit of the keyset loop and backfill-10k.")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tps", type=float, default=200, help="Application transactions/s, in all.")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=6.0,
                   help="Seconds the app load runs on after each method (pgbench's log).")
    p.add_argument("--enqueue-args", default="",
                   help="More `backfill enqueue` options for the backfill methods, e.g. "
                   "'--lock-wait-budget 50ms'")
    p.add_argument("--bindir", type=Path, default=None,
                   help="PostgreSQL binaries (default: as backfill_dev.localpg finds them)")
    p.add_argument("--_keyset", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._keyset is not None:
        return keyset_child(args._keyset)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        p.error(f"methods are {', '.join(METHODS)}")
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-app-", dir="/tmp"))
    tmp.chmod(0o755)
    if args.bindir:
        os.environ["PG_BINDIR"] = str(args.bindir)
    primary = LocalPostgres(tmp / "primary", fast=False)
    replica: LocalPostgres | None = None
    runs: list[dict[str, Any]] = []
    try:
        primary.init()
        primary.start()
        bindir = find_pg_bindir()
        with psycopg.connect(primary.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {BENCH_DB}")
            version = str(c.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        dsn = primary.dsn(BENCH_DB)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE bench_hb (at timestamptz NOT NULL)")
            c.execute("INSERT INTO bench_hb VALUES (clock_timestamp())")
        replica = primary.make_replica(tmp / "replica")
        replica.start()
        rdsn = replica.dsn(BENCH_DB)
        for rep in range(args.repeats):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]
            for method in order:
                r = one_run(method, dsn, rdsn, bindir, tmp, args)
                r["repeat"] = rep
                runs.append(r)
                print(f"{method:<18} {r['rows_per_s']:>10,.0f} rows/s  app p99 "
                      f"{_fmt(r['app_p99_ms'], '.1f')} ms ({r['app_tx']} tx)  max lag "
                      f"{_fmt(r['lag_max_s'], '.2f')} s"
                      + (f"  {r['batches']} batches, median {r['batch_size_median']:,.0f} rows "
                         f"{r['batch_ms_median']:.0f} ms" if r.get("batches") else ""),
                      file=sys.stderr, flush=True)
    finally:
        for server in (replica, primary):
            if server is not None:
                server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    by: dict[str, list[dict[str, Any]]] = {m: [r for r in runs if r["method"] == m]
                                          for m in methods}
    single = statistics.median(r["rows_per_s"] for r in by["single"]) if by.get("single") \
        else None
    lines = [f"{human(args.rows)} rows, PostgreSQL {version} + streaming replica, app: "
             f"pgbench {args.clients} clients at {args.tps:g} tx/s (update + read a random "
             f"row), {args.repeats} repeat(s); median (min-max)", "",
             "| method | rows/s ÷ single UPDATE | rows/s | app p99 during the run | app max | "
             "replica max lag |", "|---|---|---|---|---|---|"]
    for m in methods:
        rs = by[m]
        rps = [r["rows_per_s"] for r in rs]
        ratio = "—"
        if single:
            ratio = f"{statistics.median(rps) / single:.2f} ({min(rps) / single:.2f}-" \
                    f"{max(rps) / single:.2f})"
        p99s = [r["app_p99_ms"] for r in rs if r["app_p99_ms"] is not None]
        maxes = [r["app_max_ms"] for r in rs if r["app_max_ms"] is not None]
        lags = [r["lag_max_s"] for r in rs if r["lag_max_s"] is not None]
        lines.append(
            f"| {LABELS[m]} | {ratio} | {statistics.median(rps):,.0f} | "
            + (f"{statistics.median(p99s):,.0f} ms ({min(p99s):,.0f}-{max(p99s):,.0f})"
               if p99s else "—")
            + f" | {_fmt(max(maxes) if maxes else None)} ms | "
            + (f"{max(lags):.2f} s" if lags else "—") + " |")
    print("\n".join(lines))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"app-latency-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "runs": runs}, indent=2,
                              default=str) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
