#!/usr/bin/env python3
"""Fixed costs (issue 16, item 4): how long the command line takes for small work, process
start included, against a bare ``python`` and ``import typer`` timed in the same run.

Starts its own throwaway PostgreSQL. Each round runs, one after the other (so noise from the
shared machine hits every row alike): ``python -c pass``, ``python -c "import typer"``,
``backfill --help``, ``backfill enqueue --help``, then on a fresh database with a ``--rows``
table ``backfill db upgrade`` (the state schema from scratch), ``backfill enqueue -t t --set
"n = n + 1" -q`` and ``backfill run ID``. Prints the median and min-max over ``--repeats``
rounds, the sum of the three database commands, and each median as a multiple of ``import
typer`` (the floor of any Typer command line on this machine).

    .venv/bin/python bench/bench_startup.py              # 5 rounds, 1,000 rows
    .venv/bin/python bench/bench_startup.py --repeats 9 --rows 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backfill_dev.localpg import LocalPostgres  # noqa: E402

# How the console script starts (`backfill = "backfill.cli.main:main"`), without depending
# on which checkout the installed script points to.
BACKFILL = [sys.executable, "-c",
            "import sys; sys.argv[0] = 'backfill'; from backfill.cli.main import main; main()"]
DB_COMMANDS = ("db upgrade", "enqueue", "run")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall-clock seconds from spawn to exit, and stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[3:] if cmd[:3] == BACKFILL else cmd)} exited "
                 f"{proc.returncode}:\n{proc.stderr.strip()}")
    return elapsed, proc.stdout


def fresh_database(admin_dsn: str, name: str, rows: int) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, %s) g", (rows,))
        conn.execute("ANALYZE t")
    return dsn


def one_round(admin_dsn: str, name: str, rows: int, env: dict[str, str]) -> dict[str, float]:
    t: dict[str, float] = {}
    t["python -c pass"], _ = timed([sys.executable, "-c", "pass"], env)
    t["python -c 'import typer'"], _ = timed([sys.executable, "-c", "import typer"], env)
    t["backfill --help"], _ = timed([*BACKFILL, "--help"], env)
    t["backfill enqueue --help"], _ = timed([*BACKFILL, "enqueue", "--help"], env)
    db_env = {**env, "BACKFILL_DSN": fresh_database(admin_dsn, name, rows)}
    t["db upgrade"], _ = timed([*BACKFILL, "db", "upgrade"], db_env)
    t["enqueue"], out = timed([*BACKFILL, "enqueue", "-t", "t", "--set", "n = n + 1", "-q"], db_env)
    t["run"], _ = timed([*BACKFILL, "run", out.strip(), "--no-progress"], db_env)
    t["db upgrade + enqueue + run"] = sum(t[k] for k in DB_COMMANDS)
    with psycopg.connect(db_env["BACKFILL_DSN"]) as conn:  # the work was done
        changed = conn.execute("SELECT count(*) FROM t WHERE n = 1").fetchone()
    if changed is None or changed[0] != rows:
        sys.exit(f"run changed {changed} rows, not {rows}")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--rows", type=int, default=1000, help="rows in the table (default 1000)")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-startup-", dir="/tmp"))
    tmp.chmod(0o755)
    results: dict[str, list[float]] = {}
    try:
        with LocalPostgres(tmp / "data") as server:
            admin = server.dsn("postgres")
            one_round(admin, "bench_warmup", args.rows, env)  # compiles .pyc, warms the caches
            for i in range(args.repeats):
                for k, v in one_round(admin, f"bench_{i}", args.rows, env).items():
                    results.setdefault(k, []).append(v)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    typer_ms = statistics.median(results["python -c 'import typer'"]) * 1000
    print(f"\n{args.repeats} rounds, {args.rows:,} rows, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'command':<28} {'median ms':>10} {'min-max ms':>14} {'x typer':>8}")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        med = statistics.median(ms)
        print(f"{name:<28} {med:>10.0f} {f'{min(ms):.0f}-{max(ms):.0f}':>14} "
              f"{med / typer_ms:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
