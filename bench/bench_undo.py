#!/usr/bin/env python3
"""Undo-log shapes (issue 16, item 3): what logging the old values costs per batch, by
statement shape, on one server, side by side.

Each shape runs the same job: ``total = qty::bigint * price`` over a freshly loaded
``bench_t`` (bigint key), in keyset batches of ``--batch-size`` rows, one transaction each.
The shapes:

- ``plain``: the update alone (no undo log): the baseline.
- ``fill``: what the engine does before PostgreSQL 18 (``engine/kinds.py``,
  ``_write_optimistic``): a batch whose written column is all NULL is updated and logged as
  (key, NULL, new) without reading the old values (``_update_logged_fill``, after counting
  the batch's rows and those holding a value); a batch holding values (``--filled``) runs
  ``logged`` instead, at once after the fill changed nothing or, after such a batch,
  without trying the fill.
- ``logged``: the engine's statement before 18 for a batch holding values
  (``_update_logged(optimistic=True)``): read every row's old value and version (ctid),
  update exactly those versions, insert (key, old, new) into the undo table.
- ``returning-old`` (18 and later): the engine's statement there, ``UPDATE … RETURNING old.…``
  into the undo table: one pass.
- ``insert-only``: the update plus the insert of (key, NULL, new): no old values read at all,
  so a floor for any shape that writes one undo row per changed row.
- ``trigger``: a statement-level ``AFTER UPDATE`` trigger with transition tables (old and new
  rows, joined by key) writing the undo rows: one pass, but DDL on the user's table.
- ``arrays``: the ``logged`` read, one undo row per batch holding three arrays.

Prints, per shape, the median seconds over ``--repeats`` (min-max) and the cost against
``plain`` (median of the per-round ratios; every shape runs once per round, in turn, so the
shared machine's noise hits them alike), and checks every row and every undo row.

    .venv/bin/python bench/bench_undo.py --rows 1000000 --repeats 3
    .venv/bin/python bench/bench_undo.py --bindir \
        "$(.venv/bin/python -c 'import backfill_dev.localpg as l; print(l.embedded_bindir())')"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backfill_dev.localpg import LocalPostgres  # noqa: E402

EXPR = "qty::bigint * price"
_VALUES = "1 + (g::bigint * 7919) %% 100000, 1 + (g::bigint * 104729) %% 100000"
RANGE = "id > %(lo)s AND id <= %(hi)s"
_PREV = (f'prev AS (SELECT tableoid AS oid, ctid AS tid, xmin AS xm, total AS "old:total" '
         f"FROM bench_t WHERE {RANGE})")
_UPD_PREV = (f"UPDATE bench_t SET total = {EXPR} FROM prev WHERE {RANGE} "
             "AND bench_t.ctid = prev.tid AND bench_t.tableoid = prev.oid AND bench_t.xmin = prev.xm "
             'RETURNING bench_t.id, prev."old:total" AS o, '
             "bench_t.total")
SHAPES: dict[str, str] = {
    "plain": f"UPDATE bench_t SET total = {EXPR} WHERE {RANGE}",
    "fill": (f"WITH batch AS (SELECT count(*) AS n, count(total) AS held FROM bench_t "
             f"WHERE {RANGE}), fill AS (UPDATE bench_t SET total = {EXPR} WHERE {RANGE} AND "
             "total IS NULL AND (SELECT held FROM batch) = 0 RETURNING id, total), "
             'ins AS (INSERT INTO undo_rows (id, "new:total") SELECT * FROM fill RETURNING 1) '
             "SELECT (SELECT n FROM batch), (SELECT held FROM batch), (SELECT count(*) FROM ins)"),
    "logged": (f"WITH {_PREV}, upd AS ({_UPD_PREV}), "
               "ins AS (INSERT INTO undo_rows SELECT * FROM upd RETURNING 1) "
               'SELECT (SELECT count(*) FROM prev), (SELECT count("old:total") FROM prev), '
               "(SELECT count(*) FROM ins)"),
    "returning-old": (f"WITH upd AS (UPDATE bench_t SET total = {EXPR} WHERE {RANGE} "
                      "RETURNING new.id, old.total, new.total) "
                      "INSERT INTO undo_rows SELECT * FROM upd"),
    "insert-only": (f"WITH upd AS (UPDATE bench_t SET total = {EXPR} WHERE {RANGE} "
                    "RETURNING id, NULL::bigint, total) INSERT INTO undo_rows SELECT * FROM upd"),
    "trigger": f"UPDATE bench_t SET total = {EXPR} WHERE {RANGE}",
    "arrays": (f"WITH {_PREV}, upd AS ({_UPD_PREV}) INSERT INTO undo_arrays "
               "SELECT array_agg(id), array_agg(o), array_agg(total) FROM upd"),
}
TRIGGER = """
CREATE FUNCTION bench_undo_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO undo_rows SELECT n.id, o.total, n.total FROM bench_old o JOIN bench_new n USING (id);
  RETURN NULL;
END $$;
CREATE TRIGGER bench_undo AFTER UPDATE ON bench_t
  REFERENCING OLD TABLE AS bench_old NEW TABLE AS bench_new
  FOR EACH STATEMENT EXECUTE FUNCTION bench_undo_capture();
"""


def reset(dsn: str, rows: int, shape: str, filled: float = 0.0) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS bench_t, undo_rows, undo_arrays CASCADE")
        c.execute("DROP FUNCTION IF EXISTS bench_undo_capture()")
        c.execute("CREATE TABLE bench_t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                  "qty int NOT NULL, price int NOT NULL, total bigint)")
        c.execute(f"INSERT INTO bench_t (qty, price) SELECT {_VALUES} "
                  "FROM generate_series(1, %s) g", (rows,))
        if filled:   # rows the job finds holding a value already, spread evenly
            c.execute("UPDATE bench_t SET total = -1 WHERE id %% %s = 0", (round(1 / filled),))
        c.execute("VACUUM ANALYZE bench_t")
        # As the engine makes its undo tables: no key, no index, autovacuum off.
        c.execute('CREATE TABLE undo_rows (id bigint, "old:total" bigint, "new:total" bigint) '
                  "WITH (autovacuum_enabled = off)")
        c.execute("CREATE TABLE undo_arrays (ids bigint[], olds bigint[], news bigint[]) "
                  "WITH (autovacuum_enabled = off)")
        if shape == "trigger":
            c.execute(TRIGGER)
        c.execute("CHECKPOINT")


def run(dsn: str, rows: int, batch: int, shape: str, filled: float = 0.0) -> float:
    reset(dsn, rows, shape, filled)
    with psycopg.connect(dsn) as c:
        started = time.perf_counter()
        held = 0
        for lo in range(0, rows, batch):
            bounds = {"lo": lo, "hi": lo + batch}
            if shape != "fill" or held == 0:
                got = c.execute(SHAPES[shape].encode(), bounds)
                if shape == "fill":
                    held = got.fetchone()[1]  # type: ignore[index]
            if shape == "fill" and held:   # as the engine: the batch holds values
                held = c.execute(SHAPES["logged"].encode(), bounds).fetchone()[1]  # type: ignore[index]
            c.commit()
        elapsed = time.perf_counter() - started
        logged = c.execute("SELECT (SELECT count(*) FROM undo_rows) + (SELECT "
                           "coalesce(sum(cardinality(ids)), 0) FROM undo_arrays)").fetchone()
        wrong = c.execute(f"SELECT count(*) FROM bench_t WHERE total IS DISTINCT FROM {EXPR}"
                          ).fetchone()
    expected = 0 if shape == "plain" else rows
    if wrong is None or wrong[0] != 0 or logged is None or logged[0] != expected:
        raise SystemExit(f"{shape}: {wrong} rows wrong, {logged} undo rows (want {expected})")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--filled", type=float, default=0.0,
                   help="share of rows holding a value before the job (default 0: a new column)")
    p.add_argument("--dsn", help="an existing server (default: a throwaway one, durable)")
    p.add_argument("--bindir", type=Path,
                   help="server binaries for the throwaway server (default: as the tests find them)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-undo-", dir="/tmp") as tmp:
        pg = None
        if args.dsn:
            dsn = args.dsn
        else:
            Path(tmp).chmod(0o755)
            if args.bindir:
                os.environ["PG_BINDIR"] = str(args.bindir)   # what LocalPostgres starts
            pg = LocalPostgres(Path(tmp) / "data", fast=False)
            pg.init()
            pg.start()
            dsn = pg.dsn()
        try:
            with psycopg.connect(dsn) as c:
                version = c.info.server_version
            shapes = [s for s in args.shapes.split(",")
                      if not (s == "returning-old" and version < 180000)]
            if "plain" not in shapes:
                shapes.insert(0, "plain")
            times: dict[str, list[float]] = {s: [] for s in shapes}
            for r in range(args.repeats):
                for shape in shapes:
                    times[shape].append(run(dsn, args.rows, args.batch_size, shape, args.filled))
                    print(f"round {r + 1}: {shape:13s} {times[shape][-1]:7.2f} s", file=sys.stderr)
        finally:
            if pg is not None:
                pg.stop()
    print(f"\nPostgreSQL {version // 10000}, {args.rows:,} rows in batches of "
          f"{args.batch_size:,}, {args.filled:.0%} filled before, {args.repeats} rounds")
    print("| shape | seconds (median) | min-max | cost vs plain (median, min-max) |")
    print("|---|---|---|---|")
    for shape in shapes:
        xs = times[shape]
        ratios = [x / b - 1 for x, b in zip(xs, times["plain"], strict=True)]
        cost = ("-" if shape == "plain" else
                f"{statistics.median(ratios):+.0%} ({min(ratios):+.0%} to {max(ratios):+.0%})")
        print(f"| {shape} | {statistics.median(xs):.2f} | {min(xs):.2f}-{max(xs):.2f} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
