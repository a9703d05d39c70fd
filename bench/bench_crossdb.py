#!/usr/bin/env python3
"""Cross-database copy benchmark: backfill's copy job (``--source``) against a plain
``psql -c "COPY … TO STDOUT" | psql -c "COPY … FROM STDIN"`` pipe between the same two
databases (one server, two databases), side by side in one run.

- ``pipe``: the peer, one COPY stream in one transaction (no checkpoints, no resumption).
- ``backfill``: ``backfill run`` of a copy job reading by keyset from the source and writing
  each batch with COPY into the destination, its checkpoint in the same transaction.

Each run starts from an empty destination table and is checked after (count and checksum).
Reported: rows/s (median, min-max over repeats) and backfill / pipe as a ratio per repeat.

    .venv/bin/python bench/bench_crossdb.py --rows 2000000 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backfill_dev.localpg import LocalPostgres, find_pg_bindir  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
COLUMNS = "id, kind, amount, note, at"


def setup(admin: str, rows: int) -> tuple[str, str]:
    with psycopg.connect(admin, autocommit=True) as c:
        for db in ("xsrc", "xdst"):
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    src, dst = make_conninfo(admin, dbname="xsrc"), make_conninfo(admin, dbname="xdst")
    with psycopg.connect(src, autocommit=True) as c:
        c.execute("""CREATE TABLE events (id bigint PRIMARY KEY, kind text, amount int,
                     note text, at timestamptz)""")
        c.execute("""INSERT INTO events SELECT g, 'k' || (g %% 7), g %% 100000,
                     repeat('x', 40), timestamptz '2024-01-01' + g * interval '1 s'
                     FROM generate_series(1, %s) g""", (rows,))
        c.execute("VACUUM ANALYZE events")
    return src, dst


def reset_dest(dst: str) -> None:
    with psycopg.connect(dst, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS archive")
        c.execute("""CREATE TABLE archive (id bigint PRIMARY KEY, kind text, amount int,
                     note text, at timestamptz)""")


def checksum(dsn: str, table: str) -> tuple[int, str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(sql.SQL("SELECT count(*), md5(string_agg(ROW({})::text, ',' ORDER BY id)) "
                                "FROM {}").format(sql.SQL(COLUMNS), sql.Identifier(table))).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def run_pipe(src: str, dst: str, psql: str) -> float:
    started = time.perf_counter()
    out = subprocess.Popen([psql, src, "-Xq", "-c", f"COPY events ({COLUMNS}) TO STDOUT"],
                           stdout=subprocess.PIPE)
    inp = subprocess.run([psql, dst, "-Xq", "-c", f"COPY archive ({COLUMNS}) FROM STDIN"],
                         stdin=out.stdout, check=True)
    assert out.stdout is not None
    out.stdout.close()
    if out.wait() != 0 or inp.returncode != 0:
        raise RuntimeError("the psql pipe failed")
    return time.perf_counter() - started


def run_backfill(src: str, dst: str) -> float:
    env_cli = [sys.executable, "-m", "backfill.cli.main", "--dsn", dst, "--log-level", "warning"]
    subprocess.run([*env_cli, "db", "upgrade"], check=True, capture_output=True)
    job = subprocess.run([*env_cli, "enqueue", "-t", "events", "--dest", "archive", "--source",
                          src, "--batch-size", "10000", "-q"], check=True, capture_output=True,
                         text=True).stdout.strip()
    started = time.perf_counter()
    subprocess.run([*env_cli, "run", job, "--no-progress", "--skip-preflight"], check=True,
                   capture_output=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    psql = str(Path(find_pg_bindir()) / "psql")
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-pg-", dir="/tmp"))
    tmp.chmod(0o755)
    pg = LocalPostgres(tmp / "data", fast=False)
    runs: list[dict[str, Any]] = []
    try:
        pg.init()
        pg.start()
        src, dst = setup(pg.dsn(), args.rows)
        expected = checksum(src, "events")
        for i in range(args.repeats):
            for method, fn in (("pipe", lambda: run_pipe(src, dst, psql)),
                               ("backfill", lambda: run_backfill(src, dst))):
                reset_dest(dst)
                with psycopg.connect(dst, autocommit=True) as c:
                    c.execute("DROP SCHEMA IF EXISTS backfill CASCADE")
                seconds = fn()
                if checksum(dst, "archive") != expected:
                    raise RuntimeError(f"{method}: the destination differs from the source")
                runs.append({"repeat": i, "method": method, "seconds": seconds,
                             "rows_per_s": args.rows / seconds})
                print(f"repeat {i + 1} {method:<9} {args.rows / seconds:>12,.0f} rows/s",
                      file=sys.stderr, flush=True)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    by = {m: [r["rows_per_s"] for r in runs if r["method"] == m] for m in ("pipe", "backfill")}
    ratios = [b / p for b, p in zip(by["backfill"], by["pipe"], strict=True)]
    print(f"\n{args.rows:,} rows, {args.repeats} repeats (one server, two databases)\n")
    print("| method | rows/s median | min - max | backfill / pipe |")
    print("|---|---|---|---|")
    for m in ("pipe", "backfill"):
        v = by[m]
        ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                 if m == "backfill" else "1.00x")
        print(f"| {m} | {statistics.median(v):,.0f} | {min(v):,.0f} - {max(v):,.0f} | {ratio} |")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"crossdb-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"rows": args.rows, "runs": runs}, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
