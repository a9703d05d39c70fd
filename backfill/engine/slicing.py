"""Splitting a job's range into slices of about equal row counts, by sampling the table.

Boundaries come from a sample of rows, not from the key space, so skewed keys (most rows in a
narrow range, a few far away) still give slices of similar size. The sample is sorted by the
database, in the key's own collation, so the boundaries agree with the keyset probes.
"""

from __future__ import annotations

from psycopg import sql

from backfill.core.catalog import Conn
from backfill.engine.keyset import Key, Keyset

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


def split_point(conn: Conn, keyset: Keyset, lower: Key | None, upper: Key,
                rows_left: int) -> Key | None:
    """A key that cuts ``(lower, upper]`` into two parts of about ``rows_left / 2`` rows each
    (rebalancing a slice); ``None`` if the range is too small to cut. A large range is cut at
    the median of a sample; failing that (a small part of a big table samples badly), at
    most :data:`EXACT_BELOW` rows past ``lower``, so the cost stays bounded."""
    cut: Key | None = None
    if rows_left >= 2 * EXACT_BELOW:
        cuts = _sampled(conn, keyset, upper, 2, rows_left, lower=lower, bounded=True)
        cut = cuts[0] if cuts else None
    if cut is None:
        cut = keyset.probe(conn, lower, upper, max(0, min(rows_left // 2, EXACT_BELOW) - 1))
    return None if cut is None or cut == upper else cut


def sample_percent(conn: Conn, keyset: Keyset, parts: int, rows_estimate: int, *,
                   bounded: bool = False) -> float:
    """The TABLESAMPLE SYSTEM percentage that reads about PAGES_PER_SLICE pages per part (at
    most MAX_SAMPLE_PAGES). ``bounded``: the range holds ``rows_estimate`` rows of a bigger
    table (a slice being split), so sample more of the table for enough pages in the range."""
    # Pages from the files, not pg_class.relpages: that is 0 for a partitioned table and stale
    # after a bulk load. pg_partition_tree() lists a partitioned table's tree (root included)
    # but nothing for a plain table, hence the table itself too.
    row = conn.execute(
        """SELECT greatest(1, coalesce(sum(pg_relation_size(c.oid)), 0)
                              / current_setting('block_size')::int),
                  greatest(1, coalesce(sum(greatest(c.reltuples, 0)), 0))
           FROM pg_class c
           WHERE c.oid = %(t)s::regclass
              OR c.oid IN (SELECT relid FROM pg_partition_tree(%(t)s::regclass))""",
        {"t": keyset.table.as_string(conn)},
    ).fetchone()
    relpages = int(row[0]) if row else 1
    fraction = 1.0 if not bounded else min(1.0, rows_estimate / float(row[1] if row else 1))
    wanted = min(MAX_SAMPLE_PAGES, PAGES_PER_SLICE * parts / max(fraction, 1e-9))
    return min(100.0, 100.0 * wanted / relpages)


def _sampled(conn: Conn, keyset: Keyset, upper: Key, parts: int, rows_estimate: int,
             lower: Key | None = None, *, bounded: bool = False) -> list[Key]:
    # SYSTEM sampling reads whole pages, and a page holds neighbouring keys: balance depends on
    # how many pages are sampled, not how many rows. The database sorts the sample and cuts it
    # into `parts` tiles; the last key of each tile is a boundary.
    percent = sample_percent(conn, keyset, parts, rows_estimate, bounded=bounded)
    query = sql.SQL(
        "SELECT DISTINCT ON (backfill_tile_) {keys} FROM ("
        " SELECT {keys}, ntile(%(parts)s) OVER (ORDER BY {order}) AS backfill_tile_"
        " FROM {table} TABLESAMPLE SYSTEM (%(pct)s) WHERE {pred}) s"
        " ORDER BY backfill_tile_, {order_desc}"
    ).format(keys=keyset.key_list, table=keyset.table,
             pred=keyset.predicate(lower=lower is not None),
             order=keyset.order_by(), order_desc=keyset.order_by(desc=True))
    cuts = [tuple(r) for r in conn.execute(
        query, {**keyset.params(lower, upper), "pct": percent, "parts": parts}).fetchall()]
    if len(cuts) < parts:
        if bounded:
            return []  # the caller has a bounded fallback
        return _exact(conn, keyset, upper, parts)  # a tiny or unlucky sample: exact offsets
    return cuts[:-1]
