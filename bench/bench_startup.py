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
    .venv/bin/python bench/bench_startup.py --checkout ../main --checkout .   # before/after
"""

from __future__ import annotations

import argparse
import os
import resource
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str],
          cwd: Path | None = None) -> tuple[tuple[float, float], str]:
    """Wall-clock and CPU (user + system) seconds of the process from spawn to exit, and its
    stdout; a failure stops the benchmark. CPU time is the steadier figure on a shared machine
    (the server's work is not in it: it runs in PostgreSQL's processes)."""
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[3:] if cmd[:3] == BACKFILL else cmd)} exited "
                 f"{proc.returncode}:\n{proc.stderr.strip()}")
    return (elapsed, cpu), proc.stdout


def fresh_database(admin_dsn: str, name: str, rows: int) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, %s) g", (rows,))
        conn.execute("ANALYZE t")
    return dsn


def one_round(admin_dsn: str, name: str, rows: int, env: dict[str, str],
              checkouts: list[Path]) -> dict[str, tuple[float, float]]:
    """One round: the baselines, then each checkout's commands (in the order given)."""
    t: dict[str, tuple[float, float]] = {}
    t["python -c pass"], _ = timed([sys.executable, "-c", "pass"], env)
    t["python -c 'import typer'"], _ = timed([sys.executable, "-c", "import typer"], env)
    for n, checkout in enumerate(checkouts):
        tag = f"{checkout.name}: " if len(checkouts) > 1 else ""
        # Its own modules first on the path (an editable install may point elsewhere; and
        # `python -c` puts the working directory first: the checkout's).
        c_env = {**env, "PYTHONPATH": os.pathsep.join(
            p for p in (str(checkout), env.get("PYTHONPATH")) if p)}

        def cli(*argv: str, env: dict[str, str] = c_env,
                at: Path = checkout) -> tuple[tuple[float, float], str]:
            return timed([*BACKFILL, *argv], env, cwd=at)

        t[f"{tag}backfill --help"], _ = cli("--help")
        t[f"{tag}backfill enqueue --help"], _ = cli("enqueue", "--help")
        db = f"{name}_{n}"
        db_env = {**c_env, "BACKFILL_DSN": fresh_database(admin_dsn, db, rows)}
        steps = [f"{tag}{k}" for k in DB_COMMANDS]
        t[steps[0]], _ = cli("db", "upgrade", env=db_env)
        t[steps[1]], out = cli("enqueue", "-t", "t", "--set", "n = n + 1", "-q", env=db_env)
        t[steps[2]], _ = cli("run", out.strip(), "--no-progress", env=db_env)
        t[f"{tag}db upgrade + enqueue + run"] = (sum(t[k][0] for k in steps),
                                                 sum(t[k][1] for k in steps))
        with psycopg.connect(db_env["BACKFILL_DSN"]) as conn:  # the work was done
            changed = conn.execute("SELECT count(*) FROM t WHERE n = 1").fetchone()
        if changed is None or changed[0] != rows:
            sys.exit(f"{checkout}: run changed {changed} rows, not {rows}")
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db)))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--rows", type=int, default=1000, help="rows in the table (default 1000)")
    ap.add_argument("--checkout", type=Path, action="append", default=None,
                    help="a checkout of backfill to time (repeatable: compared round by round, "
                         "e.g. --checkout ../main --checkout .); default: this one")
    args = ap.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [REPO]]

    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
    tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-startup-", dir="/tmp"))
    tmp.chmod(0o755)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with LocalPostgres(tmp / "data") as server:
            admin = server.dsn("postgres")
            one_round(admin, "bench_warmup", args.rows, env, checkouts)  # .pyc, caches
            for i in range(args.repeats):
                for k, v in one_round(admin, f"bench_{i}", args.rows, env, checkouts).items():
                    results.setdefault(k, []).append(v)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ms(name: str, which: int) -> list[float]:
        return [v[which] * 1000 for v in results[name]]

    typer_wall = statistics.median(ms("python -c 'import typer'", 0))
    typer_cpu = statistics.median(ms("python -c 'import typer'", 1))
    print(f"\n{args.repeats} rounds, {args.rows:,} rows, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; wall clock and CPU time (user + system) of each process, "
          "in ms; x typer: the median over `python -c 'import typer'`'s")
    print(f"{'command':<34} {'wall':>6} {'min-max':>11} {'x typer':>8}   {'cpu':>6} "
          f"{'min-max':>11} {'x typer':>8}")
    for name in results:
        wall, cpu = ms(name, 0), ms(name, 1)
        mw, mc = statistics.median(wall), statistics.median(cpu)
        print(f"{name:<34} {mw:>6.0f} {f'{min(wall):.0f}-{max(wall):.0f}':>11} "
              f"{mw / typer_wall:>8.1f}   {mc:>6.0f} {f'{min(cpu):.0f}-{max(cpu):.0f}':>11} "
              f"{mc / typer_cpu:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
