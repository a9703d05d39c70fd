#!/usr/bin/env python3
"""Workers benchmark: the same UPDATE on one table by hand-written keyset loops, the inline
runner, and 1, 2 and 4 Celery workers (real Redis, real worker processes).

Methods, all computing ``total = qty::bigint * price`` over ``bench_t`` (bigint key), with a
fixed batch size so per-batch costs compare:

- ``keyset-1`` / ``keyset-2``: 1 or 2 processes, each a hand-written keyset loop over its share
  of the key range, one transaction per batch. ``keyset-2`` is the database's own write
  throughput with two writers: the ceiling 2 workers are compared with.
- ``inline``: ``backfill run`` in this process (one slice).
- ``workers-N``: N Celery workers (solo pool, one process each), the job with parallelism N,
  sent with ``dispatch``; timed from dispatch to the job's success (worker start-up excluded).

Reported per method: rows/s (median, min-max over repeats), ms per batch per writer
(elapsed x writers / batches), the overhead per batch against ``keyset-1`` (only meaningful
for one writer: ``inline`` and ``workers-1``), and the time per batch spent outside the batch's
own transaction (task dispatch, leases, state reads: elapsed x writers - sum of batch
durations, per batch). Every run starts from a freshly loaded table and is checked after.

    .venv/bin/python bench/bench_workers.py --rows 5000000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_engine import (  # noqa: E402
    BENCH_DB,
    EXPR,
    KINDS,
    RESULTS_DIR,
    TABLE,
    BenchError,
    check_table,
    human,
    machine_info,
    reset_table,
)

from backfill import Backfill, JobState, update  # noqa: E402
from backfill.core.logs import configure as configure_logs  # noqa: E402
from backfill_dev.localpg import LocalPostgres  # noqa: E402

METHODS = ("keyset-1", "keyset-2", "inline", "workers-1", "workers-2", "workers-4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- hand-written loops ------------------------------------------------------------------------


def keyset_range(args: tuple[str, int, int, int]) -> int:
    """Keyset loop over ids in (lo, hi]: probe the batch's last key, update, commit."""
    dsn, lo, hi, n = args
    batches = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = lo
        while cursor < hi:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT id FROM {TABLE} WHERE id > %s AND id <= %s ORDER BY id "
                    "LIMIT 1 OFFSET %s", (cursor, hi, n - 1)).fetchone()
                top = int(row[0]) if row else hi
                conn.execute(f"UPDATE {TABLE} SET total = {EXPR} WHERE id > %s AND id <= %s",
                             (cursor, top))
            batches += 1
            cursor = top
    return batches


def run_keyset(dsn: str, writers: int, rows: int, n: int) -> dict[str, Any]:
    cuts = [rows * i // writers for i in range(writers + 1)]
    parts = [(dsn, cuts[i], cuts[i + 1], n) for i in range(writers)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(writers) as pool:
        started = time.perf_counter()
        batches = sum(pool.map(keyset_range, parts))
        elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "batches": batches, "writers": writers, "sql_ms": None}


# -- the engine --------------------------------------------------------------------------------


def _job_stats(dsn: str, job_id: int) -> tuple[int, float]:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*), coalesce(sum(duration_ms), 0) FROM backfill.batches "
                        "WHERE job_id = %s", (job_id,)).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def run_inline(dsn: str, n: int) -> dict[str, Any]:
    bf = Backfill(dsn, actor="bench")
    job = bf.enqueue(update(TABLE, {"total": EXPR}, undo_log=False, batch_size=n, min_batch_size=n,
                            max_batch_size=n))
    started = time.perf_counter()
    done = bf.run(job.id)
    elapsed = time.perf_counter() - started
    if done.state != JobState.SUCCEEDED:
        raise BenchError(f"inline job ended {done.state}: {done.state_reason}")
    batches, sql_ms = _job_stats(dsn, job.id)
    return {"elapsed_s": elapsed, "batches": batches, "writers": 1, "sql_ms": sql_ms}


def start_workers(dsn: str, broker: str, k: int, logdir: Path) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, BACKFILL_DSN=dsn, BACKFILL_BROKER_URL=broker,
               BACKFILL_LOG_FORMAT="json", PYTHONPATH=str(REPO))
    procs = []
    for i in range(k):
        log = logdir / f"worker{i}.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo",
             "-n", f"bench{i}@%h", "-Q", "backfill", "--without-gossip", "--without-mingle",
             "--loglevel", "INFO"],
            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while not all("ready." in (logdir / f"worker{i}.log").read_text() for i in range(k)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise BenchError("workers did not start:\n" + "\n".join(
                (logdir / f"worker{i}.log").read_text()[-2000:] for i in range(k)))
        time.sleep(0.1)
    return procs


def run_workers(dsn: str, broker: str, k: int, n: int, logdir: Path) -> dict[str, Any]:
    from workers import app as app_module
    from workers.tasks import dispatch

    app_module.app.conf.broker_url = broker
    bf = Backfill(dsn, actor="bench")
    job = bf.enqueue(update(TABLE, {"total": EXPR}, undo_log=False, batch_size=n, min_batch_size=n,
                            max_batch_size=n, parallelism=k))
    procs = start_workers(dsn, broker, k, logdir)
    # One connection, polled every 50 ms: a connection per poll would steal CPU from the
    # workers on a small machine.
    watch = psycopg.connect(dsn, autocommit=True)
    try:
        started = time.perf_counter()
        dispatch(dsn, job.id, actor="bench")
        while True:
            row = watch.execute("SELECT state FROM backfill.jobs WHERE id = %s",
                                (job.id,)).fetchone()
            state = JobState(row[0]) if row else JobState.FAILED
            if state != JobState.RUNNING:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        watch.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    if state != JobState.SUCCEEDED:
        raise BenchError(f"workers-{k} job ended {state}: {bf.get(job.id).state_reason}")
    batches, sql_ms = _job_stats(dsn, job.id)
    return {"elapsed_s": elapsed, "batches": batches, "writers": k, "sql_ms": sql_ms}


# -- orchestration -----------------------------------------------------------------------------


def summarize(rows: int, runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    out = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        rates = [rows / r["elapsed_s"] for r in rs]
        per_batch = [r["elapsed_s"] * 1000 * r["writers"] / r["batches"] for r in rs]
        outside = [(r["elapsed_s"] * 1000 * r["writers"] - r["sql_ms"]) / r["batches"]
                   for r in rs if r["sql_ms"] is not None]
        out.append({
            "method": m, "runs": len(rs), "rows_per_s_median": statistics.median(rates),
            "rows_per_s_min": min(rates), "rows_per_s_max": max(rates),
            "batches": statistics.median(r["batches"] for r in rs),
            "ms_per_batch_per_writer": statistics.median(per_batch),
            "outside_sql_ms_per_batch": statistics.median(outside) if outside else None,
            "outside_min_max": [min(outside), max(outside)] if outside else None,
        })
    base = {s["method"]: s for s in out}
    k1, k2 = base.get("keyset-1"), base.get("keyset-2")
    for s in out:
        s["vs_keyset_2"] = (s["rows_per_s_median"] / k2["rows_per_s_median"]) if k2 else None
        one_writer = s["method"] in ("inline", "workers-1")
        s["overhead_vs_keyset_1_ms"] = (s["ms_per_batch_per_writer"]
                                        - k1["ms_per_batch_per_writer"]
                                        if k1 and one_writer else None)
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = ["| method | rows/s (median) | min-max | vs keyset-2 | batches | ms/batch/writer "
             "| minus keyset-1 ms/batch | outside-SQL ms/batch (min-max) |", "|" + "---|" * 8]
    for s in summary:
        mm = s["outside_min_max"]
        outside = (f"{s['outside_sql_ms_per_batch']:.2f} ({mm[0]:.2f}-{mm[1]:.2f})"
                   if mm else "—")
        lines.append(
            f"| {s['method']} | {s['rows_per_s_median']:,.0f} | {human(s['rows_per_s_min'])}-"
            f"{human(s['rows_per_s_max'])} | {f(s['vs_keyset_2'], '.2f')}x "
            f"| {s['batches']:,.0f} | {s['ms_per_batch_per_writer']:.2f} "
            f"| {f(s['overhead_vs_keyset_1_ms'], '+.2f')} | {outside} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        p.error("redis-server is not installed (apt-get install -y redis-server)")
    configure_logs(json=True, level="warning")
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-workers-", dir="/tmp"))
    tmp.chmod(0o755)
    pg = LocalPostgres(tmp / "data", fast=False)
    port = free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save",
                              "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    report: dict[str, Any] = {"started_at": dt.datetime.now(dt.UTC).isoformat(),
                              "args": vars(args), "machine": machine_info(), "runs": []}
    status = 0
    try:
        pg.init()
        pg.start()
        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {BENCH_DB}")
        dsn = pg.dsn(dbname=BENCH_DB)
        Backfill(dsn).upgrade()
        for rnd in range(args.repeats):
            order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
            for m in order:
                reset_table(dsn, KINDS["bigint"], args.rows)
                if m.startswith("keyset-"):
                    r = run_keyset(dsn, int(m.split("-")[1]), args.rows, args.batch_size)
                elif m == "inline":
                    r = run_inline(dsn, args.batch_size)
                else:
                    logdir = tmp / f"{m}-{rnd}"
                    logdir.mkdir()
                    r = run_workers(dsn, broker, int(m.split("-")[1]), args.batch_size, logdir)
                check_table(dsn, args.rows, m)
                r |= {"method": m, "round": rnd}
                report["runs"].append(r)
                print(f"round {rnd + 1}/{args.repeats} {m:<10} {args.rows / r['elapsed_s']:>10,.0f}"
                      f" rows/s  {r['batches']} batches", file=sys.stderr, flush=True)
        summary = summarize(args.rows, report["runs"], methods)
        report["summary"] = summary
        table = markdown(summary)
        report["markdown"] = table
        print(f"\n{human(args.rows)} rows, batch size {args.batch_size:,}, {args.repeats} "
              f"repeat(s), {os.cpu_count()} CPUs\n\n{table}")
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        status = 1
    finally:
        redis.terminate()
        redis.wait(timeout=30)
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"workers-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
