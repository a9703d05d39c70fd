#!/usr/bin/env python3
"""Engine benchmark: one whole-table UPDATE vs batched loops vs the backfill engine.

Methods, all computing ``total = qty::bigint * price`` over the whole table ``bench_t``:

- ``single``: one ``UPDATE`` over the whole table, one transaction (the throughput ceiling).
- ``naive``: ``UPDATE ... WHERE key IN (SELECT key ... WHERE total IS NULL LIMIT n)`` until no
  row changes, one transaction per batch (rescans the table from the start every time).
- ``keyset``: a hand-written keyset loop (probe ``LIMIT 1 OFFSET n-1`` past the cursor, then
  ``UPDATE ... WHERE key > lo AND key <= hi``), one transaction per batch.
- ``backfill``: the project's engine through its Python API, fixed batch size ``n``.
- ``backfill-adaptive``: the engine with default options (batch size adapts to its target).

Every measured run starts from a freshly loaded table (drop, create, load, VACUUM ANALYZE,
CHECKPOINT), runs in its own Python subprocess (so peak RSS growth is the run's own), and is
checked afterwards: every row must hold the right ``total``. Repeats are interleaved (one run of
each method per round, starting method rotated). See bench/README.md.

    .venv/bin/python bench/bench_engine.py --rows 100000 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

# Import the project from this checkout even when the installed (editable) package is stale.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backfill import Backfill, JobState, update  # noqa: E402
from backfill.core.db import redact_dsn  # noqa: E402
from backfill.core.logs import configure as configure_logs  # noqa: E402
from backfill_dev.localpg import LocalPostgres  # noqa: E402

TABLE = "bench_t"
BENCH_DB = "backfill_bench"
EXPR = "qty::bigint * price"
METHODS = ("single", "naive", "keyset", "backfill", "backfill-adaptive", "backfill-undo")
KEY_KINDS = ("bigint", "uuid", "composite")
TENANTS = 100
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DSN_ENV = "BACKFILL_BENCH_DSN"  # the child gets the DSN here, not on its command line
RESULT_MARK = "BENCH_RESULT "
TARGET_BACKFILL_VS_SINGLE = 0.9
EXPECTED_KEYSET_VS_SINGLE = 1.1
FLATNESS_TOLERANCE = 0.15


class BenchError(RuntimeError):
    """A run failed or produced wrong data: the benchmark stops."""


# -- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyKind:
    name: str
    columns: str  # CREATE TABLE body
    load: str  # INSERT ... generate_series; %(rows)s is the row count
    key: tuple[str, ...]

    @property
    def key_sql(self) -> str:
        return self.key[0] if len(self.key) == 1 else "(" + ", ".join(self.key) + ")"

    @property
    def key_list(self) -> str:
        return ", ".join(self.key)

    @property
    def placeholders(self) -> str:
        ph = ", ".join(["%s"] * len(self.key))
        return ph if len(self.key) == 1 else f"({ph})"

    def order(self, desc: bool = False) -> str:
        return ", ".join(f"{k} DESC" if desc else k for k in self.key)


# qty and price reach 100_000, so qty * price overflows int4: the ::bigint cast matters.
_VALUES = "1 + (g::bigint * 7919) %% 100000, 1 + (g::bigint * 104729) %% 100000"
KINDS: dict[str, KeyKind] = {
    "bigint": KeyKind(
        "bigint",
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty int NOT NULL, "
        "price int NOT NULL, total bigint",
        f"INSERT INTO {TABLE} (qty, price) SELECT {_VALUES} FROM generate_series(1, %(rows)s) g",
        ("id",),
    ),
    # Random key order, but the same keys after every reload (md5 of the row number).
    "uuid": KeyKind(
        "uuid",
        "id uuid PRIMARY KEY DEFAULT gen_random_uuid(), qty int NOT NULL, price int NOT NULL, "
        "total bigint",
        f"INSERT INTO {TABLE} (id, qty, price) SELECT md5('bench-' || g)::uuid, {_VALUES} "
        "FROM generate_series(1, %(rows)s) g",
        ("id",),
    ),
    # Tenants interleaved in the heap, as rows of a multi-tenant table arrive.
    "composite": KeyKind(
        "composite",
        "tenant int NOT NULL, seq bigint NOT NULL, qty int NOT NULL, price int NOT NULL, "
        "total bigint, PRIMARY KEY (tenant, seq)",
        f"INSERT INTO {TABLE} (tenant, seq, qty, price) SELECT g %% {TENANTS}, g / {TENANTS}, "
        f"{_VALUES} FROM generate_series(0, %(rows)s - 1) g",
        ("tenant", "seq"),
    ),
}


def reset_table(dsn: str, kind: KeyKind, rows: int) -> float:
    """Recreate and load the table, VACUUM ANALYZE, CHECKPOINT; returns seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} ({kind.columns})")
        conn.execute(kind.load, {"rows": rows})
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def check_table(dsn: str, rows: int, label: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*), count(*) FILTER (WHERE total IS DISTINCT FROM {EXPR}) FROM {TABLE}"
        ).fetchone()
    assert row is not None
    count, wrong = int(row[0]), int(row[1])
    if count != rows or wrong != 0:
        raise BenchError(
            f"CORRECTNESS FAILURE after {label}: {count} rows (expected {rows}), "
            f"{wrong} rows where total IS DISTINCT FROM {EXPR} (expected 0)"
        )


# -- one measured run (in a child process) -----------------------------------------------------


def maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def run_single(conn: psycopg.Connection[Any], kind: KeyKind, n: int) -> dict[str, Any]:
    del kind, n
    with conn.transaction():
        cur = conn.execute(f"UPDATE {TABLE} SET total = {EXPR}")
    return {"batches": 1, "rows_updated": cur.rowcount}


def run_naive(conn: psycopg.Connection[Any], kind: KeyKind, n: int) -> dict[str, Any]:
    stmt = (
        f"UPDATE {TABLE} SET total = {EXPR} WHERE {kind.key_sql} IN "
        f"(SELECT {kind.key_list} FROM {TABLE} WHERE total IS NULL LIMIT %s)"
    )
    batches = updated = 0
    while True:
        with conn.transaction():
            cur = conn.execute(stmt, (n,))
        batches += 1  # the last, empty statement counts: the loop has to run it
        if cur.rowcount == 0:
            break
        updated += cur.rowcount
    return {"batches": batches, "rows_updated": updated}


def run_keyset(conn: psycopg.Connection[Any], kind: KeyKind, n: int) -> dict[str, Any]:
    key, ph, order = kind.key_sql, kind.placeholders, kind.order()
    first_probe = f"SELECT {kind.key_list} FROM {TABLE} ORDER BY {order} LIMIT 1 OFFSET %s"
    probe = (
        f"SELECT {kind.key_list} FROM {TABLE} WHERE {key} > {ph} ORDER BY {order} "
        "LIMIT 1 OFFSET %s"
    )
    first_write = f"UPDATE {TABLE} SET total = {EXPR} WHERE {key} <= {ph}"
    write = f"UPDATE {TABLE} SET total = {EXPR} WHERE {key} > {ph} AND {key} <= {ph}"
    # Snapshot the upper bound once, as the engine does, so the last batch is not an empty one.
    top = conn.execute(
        f"SELECT {kind.key_list} FROM {TABLE} ORDER BY {kind.order(desc=True)} LIMIT 1"
    ).fetchone()
    if top is None:
        return {"batches": 0, "rows_updated": 0}
    upper = tuple(top)
    lo: tuple[Any, ...] | None = None
    batches = updated = 0
    while True:
        with conn.transaction():
            if lo is None:
                row = conn.execute(first_probe, (n - 1,)).fetchone()
            else:
                row = conn.execute(probe, (*lo, n - 1)).fetchone()
            hi = tuple(row) if row is not None else upper
            cur = (conn.execute(first_write, hi) if lo is None
                   else conn.execute(write, (*lo, *hi)))
        batches += 1
        updated += cur.rowcount
        if hi == upper:
            break
        lo = hi
    return {"batches": batches, "rows_updated": updated}


def run_backfill(dsn: str, method: str, n: int) -> dict[str, Any]:
    configure_logs(json=True, level="info")  # as a production run would; logs go to stderr
    bf = Backfill(dsn, actor="bench")
    bf.upgrade()
    # "backfill" and "backfill-adaptive" without the undo log (comparable with the hand
    # loops); "backfill-undo": fixed batches like "backfill", with the undo log (the default).
    if method in ("backfill", "backfill-undo"):
        spec = update(TABLE, {"total": EXPR}, batch_size=n, min_batch_size=n, max_batch_size=n,
                      undo_log=method == "backfill-undo")
    else:
        spec = update(TABLE, {"total": EXPR}, undo_log=False)
    rss_before = maxrss_kib()
    started = time.perf_counter()
    job = bf.enqueue(spec)
    enqueued = time.perf_counter()
    done = bf.run(job.id)
    elapsed = time.perf_counter() - started
    rss_after = maxrss_kib()
    prog = bf.progress(job.id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), "
            "min(batch_size), max(batch_size) FROM backfill.batches WHERE job_id = %s",
            (job.id,),
        ).fetchone()
    assert row is not None
    return {
        "elapsed_s": elapsed,
        "enqueue_s": enqueued - started,
        "batches": prog.batches,
        "rows_updated": prog.rows_affected,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "job_id": done.id,
        "job_state": str(done.state),
        "job_reason": done.state_reason,
        "job_error": done.last_error,
        "engine_batch_ms_median": float(row[0]) if row[0] is not None else None,
        "engine_batch_size_min": row[1],
        "engine_batch_size_max": row[2],
    }


def run_one(method: str, key_kind: str, batch_size: int) -> dict[str, Any]:
    dsn = os.environ[DSN_ENV]
    kind = KINDS[key_kind]
    if method.startswith("backfill"):
        return run_backfill(dsn, method, batch_size)
    runner = {"single": run_single, "naive": run_naive, "keyset": run_keyset}[method]
    with psycopg.connect(dsn, autocommit=True) as conn:
        rss_before = maxrss_kib()
        started = time.perf_counter()
        out = runner(conn, kind, batch_size)
        elapsed = time.perf_counter() - started
        rss_after = maxrss_kib()
    return {**out, "elapsed_s": elapsed, "rss_before_kib": rss_before, "rss_after_kib": rss_after}


def measure(dsn: str, method: str, kind: KeyKind, rows: int, batch_size: int) -> dict[str, Any]:
    """Run one method in a fresh subprocess and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", method,
           "--_key", kind.name, "--batch-size", str(batch_size)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, DSN_ENV: dsn}, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise BenchError(
            f"{method} on {kind.name}/{rows:,} rows: child exited {proc.returncode}\n"
            f"command: {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK):])
    if "job_state" in result and result["job_state"] != JobState.SUCCEEDED:
        raise BenchError(
            f"{method} on {kind.name}/{rows:,} rows: job {result['job_id']} ended "
            f"{result['job_state']!r} (reason: {result['job_reason']!r}, "
            f"error: {result['job_error']!r})\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    if result["rows_updated"] != rows:
        raise BenchError(
            f"{method} on {kind.name}/{rows:,} rows reports {result['rows_updated']:,} rows "
            "updated"
        )
    return result


# -- the orchestrator --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: KeyKind
    rows: int

    @property
    def label(self) -> str:
        return f"{self.kind.name} {human(self.rows)}"


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.3g}{unit}"
    return f"{n:.0f}"


def plan_cases(rows: list[int], keys: list[str], all_sizes: bool) -> list[Case]:
    smallest = min(rows)
    cases = []
    for kind in keys:
        for n in rows:
            if kind == "bigint" or all_sizes or n == smallest:
                cases.append(Case(KINDS[kind], n))
    return cases


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib,
        "platform": platform.platform(), "python": platform.python_version(),
        "psycopg": psycopg.__version__,
    }


SETTINGS = ("server_version", "shared_buffers", "fsync", "synchronous_commit",
            "full_page_writes", "wal_level", "max_wal_size", "checkpoint_timeout",
            "work_mem", "effective_io_concurrency")


def server_info(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        info = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}  # type: ignore[index]
        info["version"] = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
    return info


def summarize(case: Case, runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in runs:
        by_method[r["method"]].append(r)
    out = []
    for m in methods:
        rs = by_method[m]
        rates = [case.rows / r["elapsed_s"] for r in rs]
        per_batch = [r["elapsed_s"] * 1000 / r["batches"] for r in rs if r["batches"]]
        out.append({
            "key": case.kind.name, "rows": case.rows, "method": m, "runs": len(rs),
            "rows_per_s_median": statistics.median(rates),
            "rows_per_s_min": min(rates), "rows_per_s_max": max(rates),
            "elapsed_s_median": statistics.median(r["elapsed_s"] for r in rs),
            "batches": statistics.median(r["batches"] for r in rs),
            "ms_per_batch_median": statistics.median(per_batch) if per_batch else None,
            "rss_growth_kib_max": max(r["rss_after_kib"] - r["rss_before_kib"] for r in rs),
            "engine_batch_ms_median": (
                statistics.median(r["engine_batch_ms_median"] for r in rs)
                if rs and rs[0].get("engine_batch_ms_median") is not None else None
            ),
            "batch_size_range": (
                [min(r["engine_batch_size_min"] for r in rs),
                 max(r["engine_batch_size_max"] for r in rs)]
                if rs and "engine_batch_size_min" in rs[0] else None
            ),
        })
    single = next((s for s in out if s["method"] == "single"), None)
    keyset = next((s for s in out if s["method"] == "keyset"), None)
    for s in out:
        s["vs_single"] = (s["rows_per_s_median"] / single["rows_per_s_median"]
                          if single else None)
        s["overhead_vs_keyset_ms"] = (
            s["ms_per_batch_median"] - keyset["ms_per_batch_median"]
            if s["method"] == "backfill" and keyset and s["ms_per_batch_median"] is not None
            else None
        )
    return out


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    head = ("| table | method | rows/s (median) | min-max | vs single | batches | ms/batch "
            "| backfill - keyset ms/batch | peak RSS growth |")
    lines = [head, "|" + "---|" * 9]
    for s in summary:
        rss = f"{s['rss_growth_kib_max'] / 1024:.1f} MiB" if s["method"].startswith(
            "backfill") else "—"
        batches = f"{s['batches']:,.0f}"
        if s["batch_size_range"] and s["method"] == "backfill-adaptive":
            lo, hi = s["batch_size_range"]
            batches += f" ({human(lo)}-{human(hi)} rows)"
        lines.append(
            f"| {s['key']} {human(s['rows'])} | {s['method']} "
            f"| {s['rows_per_s_median']:,.0f} "
            f"| {human(s['rows_per_s_min'])}-{human(s['rows_per_s_max'])} "
            f"| {fmt(s['vs_single'], '.2f', 'x')} | {batches} "
            f"| {fmt(s['ms_per_batch_median'], '.1f')} "
            f"| {fmt(s['overhead_vs_keyset_ms'], '+.2f')} | {rss} |"
        )
    return "\n".join(lines)


def targets(summary: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines = []
    found: dict[str, Any] = {"cases": []}
    cases = sorted({(s["key"], s["rows"]) for s in summary})
    for key, rows in cases:
        get = {s["method"]: s for s in summary if s["key"] == key and s["rows"] == rows}
        parts = []
        entry: dict[str, Any] = {"key": key, "rows": rows}
        if "backfill" in get and get["backfill"]["vs_single"] is not None:
            v = get["backfill"]["vs_single"]
            ok = v >= TARGET_BACKFILL_VS_SINGLE
            entry["backfill_vs_single"] = v
            entry["backfill_vs_single_ok"] = ok
            parts.append(f"backfill {v:.2f}x single (target ≥ {TARGET_BACKFILL_VS_SINGLE}x: "
                         f"{'ok' if ok else 'MISSED'})")
        if "keyset" in get and get["keyset"]["vs_single"] is not None:
            v = get["keyset"]["vs_single"]
            entry["keyset_vs_single"] = v
            parts.append(f"keyset {v:.2f}x single (expected ≈ {EXPECTED_KEYSET_VS_SINGLE}x)")
        if parts:
            lines.append(f"- {key} {human(rows)}: " + "; ".join(parts))
        found["cases"].append(entry)

    bigint = sorted((s["rows"], s) for s in summary
                    if s["key"] == "bigint" and s["method"] == "backfill"
                    and s["ms_per_batch_median"] is not None)
    if len(bigint) >= 2:
        (small_n, small), (big_n, big) = bigint[0], bigint[-1]
        ratio = big["ms_per_batch_median"] / small["ms_per_batch_median"]
        ok = abs(ratio - 1) <= FLATNESS_TOLERANCE
        found["flatness"] = {"small_rows": small_n, "large_rows": big_n, "ratio": ratio,
                             "ok": ok}
        lines.append(
            f"- per-batch cost flat from {human(small_n)} to {human(big_n)}: backfill "
            f"{big['ms_per_batch_median']:.2f} / {small['ms_per_batch_median']:.2f} ms per batch "
            f"= {ratio:.2f}x (target within ±{FLATNESS_TOLERANCE:.0%}: {'ok' if ok else 'MISSED'})"
        )
    else:
        found["flatness"] = None
        lines.append("- per-batch cost flatness: needs bigint at two or more --rows sizes")
    return lines, found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--dsn", help="server DSN of a superuser (or a role with CREATEDB and "
                   f"pg_checkpoint): the script creates its own database {BENCH_DB} and drops "
                   "it after a successful run. Default: a throwaway local server with durable "
                   "settings (fsync on), stopped at the end")
    p.add_argument("--rows", default="1000000,10000000",
                   help="comma-separated table sizes (default: %(default)s)")
    p.add_argument("--keys", default=",".join(KEY_KINDS),
                   help="key kinds: bigint runs at every size, the others at the smallest size "
                   "only (default: %(default)s)")
    p.add_argument("--keys-at-all-sizes", action="store_true",
                   help="run every key kind at every size")
    p.add_argument("--methods", default=",".join(METHODS), help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=10_000,
                   help="rows per batch for naive, keyset and backfill (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method (default: %(default)s)")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_key", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [int(x.replace("_", "")) for x in args.rows.split(",") if x.strip()]
    args.keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for k in args.keys:
        if k not in KINDS:
            p.error(f"unknown key kind {k!r} (known: {', '.join(KEY_KINDS)})")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    if not args.rows or min(args.rows) <= 0 or args.batch_size <= 0 or args.repeats <= 0:
        p.error("--rows, --batch-size and --repeats must be positive")
    return args


def run_benchmark(args: argparse.Namespace, server_dsn: str, report: dict[str, Any]) -> None:
    """Run every case; ``report`` is filled as runs finish (written even if one fails)."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(BENCH_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BENCH_DB)))
    dsn = make_conninfo(server_dsn, dbname=BENCH_DB)
    Backfill(dsn, actor="bench").upgrade()

    machine, server = machine_info(), server_info(dsn)
    report |= {"machine": machine, "server": server}
    print(f"# backfill engine benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"machine: nproc={machine['nproc']}, {machine['cpu'] or platform.machine()}, "
          f"{machine['mem_gib']} GiB RAM, Python {machine['python']}, psycopg {machine['psycopg']}")
    print(f"server:  PostgreSQL {server['server_version']} at {redact_dsn(dsn)}; "
          f"shared_buffers={server['shared_buffers']} fsync={server['fsync']} "
          f"synchronous_commit={server['synchronous_commit']} "
          f"full_page_writes={server['full_page_writes']} max_wal_size={server['max_wal_size']}")
    cases = plan_cases(args.rows, args.keys, args.keys_at_all_sizes)
    print(f"cases:   {', '.join(c.label for c in cases)}; methods {', '.join(args.methods)}; "
          f"batch size {args.batch_size:,}; {args.repeats} repeat(s), interleaved\n",
          flush=True)

    runs: list[dict[str, Any]] = report["runs"]
    summary: list[dict[str, Any]] = report["summary"]
    bench_started = time.perf_counter()
    for case in cases:
        case_runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            shift = rep % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                load_s = reset_table(dsn, case.kind, case.rows)
                result = measure(dsn, method, case.kind, case.rows, args.batch_size)
                check_table(dsn, case.rows, f"{method} on {case.label} (repeat {rep + 1})")
                result |= {"method": method, "key": case.kind.name, "rows": case.rows,
                           "repeat": rep + 1, "load_s": load_s}
                case_runs.append(result)
                runs.append(result)
                rss = ""
                if method.startswith("backfill"):
                    growth = result["rss_after_kib"] - result["rss_before_kib"]
                    rss = f", RSS +{growth / 1024:.1f} MiB"
                print(f"  {case.label:>14} #{rep + 1} {method:<17} "
                      f"{result['elapsed_s']:8.2f} s  {case.rows / result['elapsed_s']:>12,.0f} "
                      f"rows/s  {result['batches']:>6,} batches{rss}  [load {load_s:.1f} s]",
                      flush=True)
        summary += summarize(case, case_runs, args.methods)
    total_s = time.perf_counter() - bench_started

    table = markdown_table(summary)
    target_lines, target_data = targets(summary)
    print(f"\n{table}\n")
    print("Targets:")
    print("\n".join(target_lines))
    print(f"\nrows/s = table rows / wall time of the run; ms/batch = wall time / batches "
          f"(amortized: probe, write, checkpoint, commit, control); medians over "
          f"{args.repeats} run(s). Total benchmark time {total_s / 60:.1f} min.")
    report |= {"total_s": total_s, "targets": target_data, "markdown": table}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._one:
        result = run_one(args._one, args._key, args.batch_size)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    report: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "args": {"rows": args.rows, "keys": args.keys, "methods": args.methods,
                 "batch_size": args.batch_size, "repeats": args.repeats,
                 "keys_at_all_sizes": args.keys_at_all_sizes, "external_server": bool(args.dsn)},
        "runs": [], "summary": [],
    }
    pg: LocalPostgres | None = None
    tmp: Path | None = None
    status = 0
    try:
        if args.dsn:
            server_dsn = args.dsn
        else:
            # The data directory goes one level down: as root, localpg hands it to the postgres
            # user, which must be able to traverse its parent (mkdtemp makes it mode 0700).
            tmp = Path(tempfile.mkdtemp(prefix="backfill-bench-pg-", dir="/tmp"))
            tmp.chmod(0o755)
            pg = LocalPostgres(tmp / "data", fast=False)
            print(f"starting a throwaway PostgreSQL server in {pg.datadir} (durable settings)",
                  file=sys.stderr, flush=True)
            pg.init()
            pg.start()
            server_dsn = pg.dsn()
        run_benchmark(args, server_dsn, report)
        if args.dsn:
            with psycopg.connect(server_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(BENCH_DB)))
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        status = 1
    finally:
        if pg is not None:
            pg.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"engine-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {out}" + (" (partial: the benchmark failed)" if status else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
