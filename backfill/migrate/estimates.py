"""How long a migration's backfills will take, before they run: the rate measured by earlier
jobs on this database, or a timed sample of the table."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Conn, primary_key_of


def estimate_rows_per_s(conn: Conn) -> float | None:
    """Rows/s of this database's recent successful jobs (the median of the last 20 that
    scanned at least 1,000 rows), if any. A short job counts too: its start-up makes its rate
    an underestimate, never an overestimate."""
    row = conn.execute(
        """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY rate) FROM (
               SELECT sum(s.rows_scanned) / extract(epoch FROM j.finished_at - j.started_at) AS rate
               FROM backfill.jobs j JOIN backfill.slices s ON s.job_id = j.id
               WHERE j.state = 'succeeded' AND j.finished_at > j.started_at
               GROUP BY j.id HAVING sum(s.rows_scanned) >= 1000
               ORDER BY j.finished_at DESC LIMIT 20) r""").fetchone()
    return float(row[0]) if row and row[0] else None


def sample_rows_per_s(conn: Conn, table: str, rows: int = 1000) -> float | None:
    """Rows/s of a row-by-row update of ``table``, measured: the first ``rows`` rows by key
    that no one holds (SKIP LOCKED: it never waits for the application) are updated to
    themselves in a transaction that is rolled back. None when the table is too small or
    busy to tell."""
    schema, name = sqltext.qualified_name(table)
    ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    row = conn.execute("SELECT to_regclass(%s)::oid", (ident.as_string(conn),)).fetchone()
    if not row or row[0] is None:
        return None
    key = primary_key_of(conn, int(row[0]))
    if not key:
        return None
    k = sql.SQL(", ").join(map(sql.Identifier, key))
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('lock_timeout', '100ms', true), "
                         "set_config('statement_timeout', '5s', true)")
            t0 = time.monotonic()
            cur = conn.execute(sql.SQL(
                "UPDATE {t} SET {k0} = {k0} WHERE ({k}) IN (SELECT {k} FROM {t} ORDER BY {k} "
                "LIMIT {n} FOR NO KEY UPDATE SKIP LOCKED)").format(
                    t=ident, k0=sql.Identifier(key[0]), k=k, n=sql.Literal(rows)))
            elapsed = time.monotonic() - t0
            n = cur.rowcount
    except psycopg.Error:
        return None
    return n / elapsed if n >= 100 and elapsed > 0 else None
