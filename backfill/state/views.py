"""What an operator reads: a page of jobs with their progress, their notes and the counts of
all of them, in one snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import pq

from backfill.core.catalog import Conn
from backfill.state.checkpoints import Progress, progress_of
from backfill.state.control import with_unwatched_notes
from backfill.state.store import JobRecord, count_jobs, list_jobs


@dataclass(frozen=True)
class JobPage:
    """One page of the job list: the jobs that need attention first (see :func:`list_jobs`),
    with how many there are in all and per state."""

    jobs: list[tuple[JobRecord, Progress]]
    total: int
    by_state: dict[str, int]
    limit: int | None
    offset: int

    @property
    def more(self) -> int:
        """Jobs after this page."""
        return max(0, self.total - self.offset - len(self.jobs))

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.jobs) if self.more else None


def job_page(conn: Conn, *, include_finished: bool = False, limit: int | None = None,
             offset: int = 0) -> JobPage:
    """One page of jobs with their progress, and the counts of all of them (one snapshot)."""
    with conn.transaction():
        if conn.info.transaction_status == pq.TransactionStatus.INTRANS and conn.autocommit:
            # our own transaction: one snapshot, so the counts match the page
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        jobs = with_unwatched_notes(conn, list_jobs(conn, include_finished=include_finished,
                                                    limit=limit, offset=offset))
        counts = count_jobs(conn, include_finished=include_finished)
        progs = progress_of(conn, jobs)
    return JobPage(jobs=[(j, progs[j.id]) for j in jobs], total=sum(counts.values()),
                   by_state=counts, limit=limit, offset=offset)
