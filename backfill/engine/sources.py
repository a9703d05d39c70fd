"""Where a cross-database job reads: one interface (:class:`Source`) over a PostgreSQL source
database (:class:`PgSource`: keyset probes, ``COPY … TO STDOUT`` piped into the destination)
and a MySQL/MariaDB one (:class:`backfill.mysql.job.MySQLJobSource`: keyset reads converted
by the job's cast plan, COPY into the destination). The batch (:mod:`backfill.engine.batch`)
and the runner call it; the rows land in the caller's transaction on the destination, which
commits them with the slice's checkpoint.

The MySQL side is imported only when a job reads MySQL (its driver is an optional extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from psycopg import sql

from backfill.core.catalog import Conn
from backfill.engine import slicing
from backfill.engine.keyset import Key

if TYPE_CHECKING:
    from backfill.engine.kinds import PreparedJob


class Source(Protocol):
    """A job's source table in another database."""

    def begin(self, conn: Conn, job_id: int) -> str | None:
        """Once, before the range is snapshotted (before :meth:`max_key`), in ``conn``'s
        transaction that stores the slices: record what the source needs to follow later
        changes (a MySQL table: its binlog position). Returns a warning, or None."""

    def max_key(self) -> Key | None:
        """The greatest key (the job's range is snapshotted up to it), or None: empty."""

    def count(self) -> int | None:
        """Exact rows, bounded in time (None: it took too long)."""

    def boundaries(self, upper: Key, parts: int, rows_estimate: int | None) -> list[Key]:
        """Keys cutting ``(-inf, upper]`` into ``parts`` slices (``[]``: one slice)."""

    def batch(self, conn: Conn, lo: Key | None, upper: Key,
              size: int) -> tuple[Key, bool, int, int]:
        """Write the next ``size`` rows after ``lo`` (at most ``upper``) through ``conn``, in
        its open transaction, proving the source: (key reached, reached ``upper``, rows
        scanned, rows written)."""

    def close(self) -> None: ...


@dataclass
class PgSource:
    """A PostgreSQL source database, on the connection ``read`` (the runner's, reconnected
    by it): the probe and the read go there, the rows through ``COPY`` into ``conn``."""

    prepared: PreparedJob
    read: Conn

    def begin(self, conn: Conn, job_id: int) -> str | None:
        return None   # nothing to follow: a PostgreSQL copy is not online

    def max_key(self) -> Key | None:
        return self.prepared.keyset.max_key(self.read)

    def count(self) -> int | None:
        import psycopg.errors

        try:
            with self.read.transaction():
                self.read.execute("SET LOCAL statement_timeout = '10s'")
                row = self.read.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(self.prepared.keyset.table)
                ).fetchone()
        except psycopg.errors.QueryCanceled:
            return None
        return int(row[0]) if row else 0

    def boundaries(self, upper: Key, parts: int, rows_estimate: int | None) -> list[Key]:
        return slicing.boundaries(self.read, self.prepared.keyset, upper, parts, rows_estimate)

    def batch(self, conn: Conn, lo: Key | None, upper: Key,
              size: int) -> tuple[Key, bool, int, int]:
        keyset = self.prepared.keyset
        nxt = keyset.probe(self.read, lo, upper, size - 1)
        if nxt is None:
            hi = upper
            row = self.read.execute(keyset.count_query(lower=lo is not None),
                                    keyset.params(lo, upper)).fetchone()
            scanned = int(row[0]) if row else 0
        else:
            hi, scanned = nxt, size
        if self.prepared.spec.kind == "delete":
            return hi, hi == upper, scanned, self.prepared.delete_remote(self.read, conn, lo, hi)
        copied = self.prepared.copy_remote(self.read, conn, lo, hi)
        return hi, hi == upper, copied, copied

    def close(self) -> None:
        pass   # the connection is the runner's


def source_for(prepared: PreparedJob, read: Any) -> Source:
    """The source of a cross-database job: its own (a MySQL table, prepared with the job),
    or the PostgreSQL one read through ``read()`` (called only then)."""
    if prepared.foreign is not None:
        foreign: Source = prepared.foreign
        return foreign
    return PgSource(prepared, read())
