"""Splitting a job's range into slices of about equal row counts, by sampling the table.

Boundaries come from a sample of rows, not from the key space, so skewed keys (most rows in a
narrow range, a few far away) still give slices of similar size. The sample is sorted by the
database, in the key's own collation, so the boundaries agree with the keyset probes.
"""

from __future__ import annotations

from psycopg import sql

from backfill.catalog import Conn
from backfill.keyset import Key, Keyset

#: Table pages to sample per slice (more: better balance, slower start), and at most in all.
PAGES_PER_SLICE = 500
MAX_SAMPLE_PAGES = 10_000
#: Below this many rows, boundaries are exact (keyset probes at count/n offsets).
EXACT_BELOW = 200_000


def boundaries(conn: Conn, keyset: Keyset, upper: Key, parts: int,
               rows_estimate: int | None) -> list[Key]:
    """Up to ``parts - 1`` ascending keys, all below ``upper``, that cut ``(-inf, upper]`` into
    ``parts`` ranges of about equal row counts (fewer if the table has fewer distinct keys)."""
    if parts <= 1:
        return []
    if rows_estimate is None or rows_estimate < EXACT_BELOW:
        # Estimates can be stale or missing: count, but never past the threshold.
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} WHERE {p} LIMIT %(cap)s) s").format(
                t=keyset.table, p=keyset.predicate(lower=False)),
            {**keyset.params(None, upper), "cap": EXACT_BELOW + 1},
        ).fetchone()
        rows_estimate = int(row[0]) if row else 0
    if rows_estimate < EXACT_BELOW:
        cuts = _exact(conn, keyset, upper, parts)
    else:
        cuts = _sampled(conn, keyset, upper, parts, rows_estimate)
    out: list[Key] = []
    for key in cuts:
        if key != upper and (not out or key != out[-1]):
            out.append(key)
    return out


def _exact(conn: Conn, keyset: Keyset, upper: Key, parts: int) -> list[Key]:
    row = conn.execute(keyset.count_query(lower=False), keyset.params(None, upper)).fetchone()
    total = int(row[0]) if row else 0
    cuts: list[Key] = []
    previous: Key | None = None
    done = 0
    for i in range(1, parts):
        target = total * i // parts
        step = target - done
        if step <= 0:
            continue
        key = keyset.probe(conn, previous, upper, step - 1)
        if key is None:
            break
        cuts.append(key)
        previous, done = key, target
    return cuts


def _sampled(conn: Conn, keyset: Keyset, upper: Key, parts: int, rows_estimate: int) -> list[Key]:
    # SYSTEM sampling reads whole pages, and a page holds neighbouring keys: balance depends on
    # how many pages are sampled, not how many rows. The database sorts the sample and cuts it
    # into `parts` tiles; the last key of each tile is a boundary.
    # Pages from the files, not pg_class.relpages: that is 0 for a partitioned table and stale
    # after a bulk load. pg_partition_tree() also lists a plain table itself.
    row = conn.execute(
        """SELECT greatest(1, coalesce(sum(pg_relation_size(relid)), 0)
                              / current_setting('block_size')::int)
           FROM pg_partition_tree(%s::regclass)""",
        (keyset.table.as_string(conn),),
    ).fetchone()
    relpages = int(row[0]) if row else 1
    percent = min(100.0, 100.0 * min(MAX_SAMPLE_PAGES, PAGES_PER_SLICE * parts) / relpages)
    query = sql.SQL(
        "SELECT DISTINCT ON (backfill_tile_) {keys} FROM ("
        " SELECT {keys}, ntile(%(parts)s) OVER (ORDER BY {order}) AS backfill_tile_"
        " FROM {table} TABLESAMPLE SYSTEM (%(pct)s) WHERE {pred}) s"
        " ORDER BY backfill_tile_, {order_desc}"
    ).format(keys=keyset.key_list, table=keyset.table, pred=keyset.predicate(lower=False),
             order=keyset.order_by(), order_desc=keyset.order_by(desc=True))
    cuts = [tuple(r) for r in conn.execute(
        query, {**keyset.params(None, upper), "pct": percent, "parts": parts}).fetchall()]
    if len(cuts) < parts:  # a tiny or unlucky sample: fall back to exact offsets
        return _exact(conn, keyset, upper, parts)
    return cuts[:-1]
