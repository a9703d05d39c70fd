"""Slices, their leases and the dispatch of slice tasks to the workers.

A lease is the right to write one slice; a dispatch is the record that a task for a slice was
sent, so a redelivered or duplicated task does nothing."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backfill.core.catalog import Conn
from backfill.core.errors import JobNotFound
from backfill.job.states import JobState
from backfill.state.store import add_event


@dataclass(frozen=True)
class SliceRecord:
    job_id: int
    slice_no: int
    lower_bound: list[Any] | None
    upper_bound: list[Any]
    cursor: list[Any] | None
    done: bool
    rows_scanned: int
    rows_affected: int
    batches: int
    batch_size: int | None
    updated_at: dt.datetime
    lease_owner: str | None = None
    lease_token: int = 0
    lease_expires_at: dt.datetime | None = None
    dispatch_seq: int = 0
    dispatched_at: dt.datetime | None = None
    rows_estimate: int | None = None
    duration_buckets: list[int] | None = None
    duration_sum_ms: float = 0.0

    @property
    def rows_left(self) -> int | None:
        """Rows still to scan, by the estimate made when the slice was cut."""
        if self.done:
            return 0
        return None if self.rows_estimate is None else max(0, self.rows_estimate - self.rows_scanned)


@dataclass(frozen=True)
class Lease:
    """A slice held by ``owner`` until ``expires_at``; ``token`` fences its checkpoints."""

    job_id: int
    slice_no: int
    owner: str
    token: int
    previous_owner: str | None


# -- slices and checkpoints -------------------------------------------------------------------


def slices(conn: Conn, job_id: int) -> list[SliceRecord]:
    rows = conn.cursor(row_factory=dict_row).execute(
        "SELECT * FROM backfill.slices WHERE job_id = %s ORDER BY slice_no", (job_id,)
    ).fetchall()
    return [SliceRecord(**r) for r in rows]


def get_slice(conn: Conn, job_id: int, slice_no: int) -> SliceRecord:
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT * FROM backfill.slices WHERE job_id = %s AND slice_no = %s", (job_id, slice_no)
    ).fetchone()
    if row is None:
        raise JobNotFound(f"job {job_id} has no slice {slice_no}")
    return SliceRecord(**row)


def acquire_lease(conn: Conn, job_id: int, slice_no: int, owner: str, ttl_s: float,
                  *, actor: str, steal: bool = False) -> Lease | None:
    """Take the slice's lease if it is free, expired or already ``owner``'s, or whatever its
    state with ``steal`` (the caller knows the holder was replaced); ``None`` if another
    holder's lease is live or the slice is done. Taking a lease from someone else is a
    ``lease_takeover`` event."""
    with conn.transaction():
        row = conn.execute(
            """WITH old AS (
                   SELECT job_id, slice_no, lease_owner, lease_expires_at,
                          lease_expires_at < now() AS expired
                   FROM backfill.slices WHERE job_id = %(job)s AND slice_no = %(slice)s
                   FOR UPDATE)
               UPDATE backfill.slices s
               SET lease_owner = %(owner)s, lease_token = s.lease_token + 1,
                   lease_expires_at = now() + %(ttl)s * interval '1 second'
               FROM old
               WHERE s.job_id = old.job_id AND s.slice_no = old.slice_no AND NOT s.done
                 AND (old.lease_owner IS NULL OR old.lease_owner = %(owner)s OR old.expired
                      OR %(steal)s)
               RETURNING s.lease_token, old.lease_owner, old.lease_expires_at""",
            {"job": job_id, "slice": slice_no, "owner": owner, "ttl": ttl_s, "steal": steal},
        ).fetchone()
        if row is None:
            return None
        token, previous, expired_at = int(row[0]), row[1], row[2]
        if previous is not None and previous != owner:
            why = "was replaced" if steal else "expired"
            add_event(conn, job_id, "lease_takeover", actor=actor,
                      reason=f"slice {slice_no}: lease holder {previous} {why}",
                      details={"slice": slice_no, "previous_owner": previous, "token": token,
                               "expired_at": expired_at.isoformat() if expired_at else None})
    return Lease(job_id, slice_no, owner, token, previous)


def renew_lease(conn: Conn, lease: Lease, ttl_s: float) -> bool:
    """Extend a live lease; ``False`` if it was lost (taken over after expiring)."""
    cur = conn.execute(
        """UPDATE backfill.slices SET lease_expires_at = now() + %s * interval '1 second'
           WHERE job_id = %s AND slice_no = %s AND lease_token = %s AND lease_owner = %s""",
        (ttl_s, lease.job_id, lease.slice_no, lease.token, lease.owner),
    )
    return cur.rowcount == 1


def release_lease(conn: Conn, lease: Lease) -> None:
    conn.execute(
        """UPDATE backfill.slices SET lease_owner = NULL, lease_expires_at = NULL
           WHERE job_id = %s AND slice_no = %s AND lease_token = %s""",
        (lease.job_id, lease.slice_no, lease.token),
    )


# -- dispatch: tasks for jobs on the workers ----------------------------------------------------
#
# A job that runs on the workers has no single owner: each slice is worked on by a chain of
# tasks, one at a time, each for a time budget. The state store decides which slices get a task
# (at most `parallelism` busy at once) and stamps each task with the slice's dispatch_seq: a
# replacement bumps it, so a task left over in the broker is dropped before it takes the lease.


@dataclass(frozen=True)
class Dispatch:
    """A task to send: work on ``slice_no`` of ``job_id``, carrying ``seq``."""

    job_id: int
    slice_no: int
    seq: int


def set_runs_on(conn: Conn, job_id: int, runs_on: str) -> None:
    """Move a job between inline and the workers; tasks sent before are fenced off."""
    conn.execute("UPDATE backfill.jobs SET runs_on = %s WHERE id = %s", (runs_on, job_id))
    if runs_on != "workers":
        conn.execute("UPDATE backfill.slices SET dispatch_seq = dispatch_seq + 1, "
                     "dispatched_at = NULL WHERE job_id = %s", (job_id,))


def worker_jobs(conn: Conn) -> list[tuple[int, JobState]]:
    """(id, state) of jobs on the workers that a reaper looks after: pending and running."""
    rows = conn.execute(
        """SELECT id, state FROM backfill.jobs
           WHERE runs_on = 'workers' AND state IN ('pending', 'running') ORDER BY id"""
    ).fetchall()
    return [(int(i), JobState(st)) for i, st in rows]


def _lock_job_for_dispatch(conn: Conn, job_id: int) -> tuple[JobState, int] | None:
    """(state, parallelism) of a job on the workers, locked; ``None`` if it is not one."""
    # NO KEY UPDATE serialises dispatchers and lease takers of one job without waiting for
    # batches in flight (their checkpoints hold KEY SHARE, which this does not conflict with).
    row = conn.execute(
        """SELECT state, (options->>'parallelism')::int, runs_on FROM backfill.jobs
           WHERE id = %s FOR NO KEY UPDATE""",
        (job_id,),
    ).fetchone()
    if row is None or row[2] != "workers":
        return None
    return JobState(row[0]), int(row[1] or 1)


def claim_dispatch(conn: Conn, job_id: int, *, stale_after_s: float, actor: str,
                   replace_queued: bool = False) -> list[Dispatch]:
    """Pick the slices of a running job that need a task, as many as its parallelism leaves
    room for, and mark them sent. A slice needs a task when nobody holds a live lease on it
    and no task was sent for it in the last ``stale_after_s`` seconds (``replace_queued``:
    whatever was sent is taken as lost). The task carries the slice's current ``dispatch_seq``:
    if the one it replaces was only late, not lost, both are valid until one of them runs and
    requeues (which bumps the token), so the other is dropped; a replacement never invalidates
    a task still waiting in the queue. Each claim is one ``dispatch`` event, saying why each
    slice needed a task; its ``stale`` detail lists the slices whose task no worker started
    within ``stale_after_s`` (the exporter counts those events: dispatches going stale)."""
    with conn.transaction():
        locked = _lock_job_for_dispatch(conn, job_id)
        if locked is None or locked[0] != JobState.RUNNING:
            return []
        parallelism = locked[1]
        rows = conn.execute(
            """SELECT slice_no, lease_owner, lease_expires_at,
                      coalesce(lease_expires_at > now(), false) AS leased,
                      coalesce(dispatched_at > now() - %s * interval '1 second', false) AS queued,
                      dispatched_at
               FROM backfill.slices WHERE job_id = %s AND NOT done
               ORDER BY dispatched_at NULLS FIRST, slice_no""",
            (stale_after_s, job_id),
        ).fetchall()
        busy = [r for r in rows if r[3] or (r[4] and not replace_queued)]
        room = max(0, parallelism - len(busy))
        chosen = [r for r in rows if not (r[3] or (r[4] and not replace_queued))][:room]
        if not chosen:
            return []
        why: dict[str, str] = {}
        stale: list[int] = []
        for slice_no, owner, expires, _, queued, sent_at in chosen:
            if owner is not None:
                why[str(slice_no)] = f"lease of {owner} expired at {expires:%H:%M:%S}"
            elif sent_at is not None:
                why[str(slice_no)] = (f"task sent at {sent_at:%H:%M:%S} never started "
                                      "(lost with the broker?)")
                if not queued:  # past stale_after_s, not merely replaced by hand
                    stale.append(int(slice_no))
            else:
                why[str(slice_no)] = "no task queued"
        claimed = conn.execute(
            """UPDATE backfill.slices SET dispatched_at = now()
               WHERE job_id = %s AND slice_no = ANY(%s) RETURNING slice_no, dispatch_seq""",
            (job_id, [r[0] for r in chosen]),
        ).fetchall()
        out = [Dispatch(job_id, int(n), int(q)) for n, q in sorted(claimed)]
        add_event(conn, job_id, "dispatch", actor=actor,
                  reason=f"task sent for slice(s) {', '.join(str(d.slice_no) for d in out)}",
                  details={"slices": why, "parallelism": parallelism, "busy": len(busy),
                           **({"stale": stale} if stale else {})})
    return out


def acquire_for_task(conn: Conn, job_id: int, slice_no: int, seq: int, owner: str,
                     ttl_s: float, *, actor: str) -> Lease | str:
    """Take a slice's lease for a task carrying ``seq``. Returns the lease, or why not:
    ``stale`` (a replacement task was sent), ``done``, ``busy`` (another live holder), or
    ``full`` (the job's parallelism is used up: the slice is parked until a slot frees)."""
    with conn.transaction():
        locked = _lock_job_for_dispatch(conn, job_id)
        if locked is None:
            return "stale"  # gone, or run inline now
        parallelism = locked[1]
        row = conn.execute(
            """SELECT dispatch_seq, done, lease_owner, lease_expires_at,
                      coalesce(lease_expires_at > now(), false)
               FROM backfill.slices WHERE job_id = %s AND slice_no = %s FOR UPDATE""",
            (job_id, slice_no),
        ).fetchone()
        if row is None or int(row[0]) != seq:
            return "stale"
        if row[1]:
            return "done"
        previous, expired_at, live = row[2], row[3], bool(row[4])
        if live and previous != owner:
            return "busy"
        others = conn.execute(
            """SELECT count(*) FROM backfill.slices WHERE job_id = %s AND slice_no <> %s
                 AND NOT done AND lease_expires_at > now()""",
            (job_id, slice_no),
        ).fetchone()
        if others is not None and int(others[0]) >= parallelism:
            conn.execute(
                """UPDATE backfill.slices SET dispatched_at = NULL
                   WHERE job_id = %s AND slice_no = %s""", (job_id, slice_no))
            return "full"
        token_row = conn.execute(
            """UPDATE backfill.slices
               SET lease_owner = %s, lease_token = lease_token + 1, dispatched_at = NULL,
                   lease_expires_at = now() + %s * interval '1 second'
               WHERE job_id = %s AND slice_no = %s RETURNING lease_token""",
            (owner, ttl_s, job_id, slice_no),
        ).fetchone()
        assert token_row is not None
        token = int(token_row[0])
        if previous is not None and previous != owner:
            add_event(conn, job_id, "lease_takeover", actor=actor,
                      reason=f"slice {slice_no}: lease holder {previous} expired",
                      details={"slice": slice_no, "previous_owner": previous, "token": token,
                               "expired_at": expired_at.isoformat() if expired_at else None})
    return Lease(job_id, slice_no, owner, token, previous)


def requeue(conn: Conn, lease: Lease) -> int | None:
    """Give a slice's lease back and mark its next task as sent; returns the ``seq`` that task
    must carry (bumped: any other task of this slice, a duplicate or one the broker redelivers
    late, is stale from now on), or ``None`` if the lease was lost meanwhile."""
    row = conn.execute(
        """UPDATE backfill.slices
           SET lease_owner = NULL, lease_expires_at = NULL, dispatched_at = now(),
               dispatch_seq = dispatch_seq + 1
           WHERE job_id = %s AND slice_no = %s AND lease_token = %s AND NOT done
           RETURNING dispatch_seq""",
        (lease.job_id, lease.slice_no, lease.token),
    ).fetchone()
    return int(row[0]) if row else None


def park(conn: Conn, dispatch: Dispatch) -> None:
    """A task could not be sent (broker down): mark the slice as having none queued, so the
    next reaper pass sends one at once."""
    conn.execute(
        """UPDATE backfill.slices SET dispatched_at = NULL
           WHERE job_id = %s AND slice_no = %s AND dispatch_seq = %s""",
        (dispatch.job_id, dispatch.slice_no, dispatch.seq),
    )


def split_candidate(conn: Conn, job_id: int, slice_no: int, min_rows: int) -> int | None:
    """Rows left in ``slice_no`` if it should be split to fill a free slot: fewer unfinished
    slices than the job's parallelism, and this one has the most rows left (at least
    ``min_rows``; ties go to the lowest slice number). ``None`` otherwise."""
    row = conn.execute(
        """WITH open AS (
               SELECT slice_no, greatest(0, coalesce(rows_estimate, 0) - rows_scanned) AS left_
               FROM backfill.slices WHERE job_id = %(job)s AND NOT done)
           SELECT (SELECT count(*) FROM open),
                  (SELECT (options->>'parallelism')::int FROM backfill.jobs WHERE id = %(job)s),
                  (SELECT slice_no FROM open ORDER BY left_ DESC, slice_no LIMIT 1),
                  (SELECT left_ FROM open WHERE slice_no = %(slice)s)""",
        {"job": job_id, "slice": slice_no},
    ).fetchone()
    if row is None or row[3] is None:
        return None
    unfinished, parallelism, largest, left = int(row[0]), int(row[1] or 1), row[2], int(row[3])
    if unfinished >= parallelism or largest != slice_no or left < min_rows:
        return None
    return left


def split_slice(conn: Conn, lease: Lease, *, cursor: list[Any] | None, upper: list[Any],
                cut: list[Any], rows_left: int, actor: str) -> int | None:
    """Split the leased slice at ``cut``: it keeps ``(cursor, cut]``, a new slice gets the rest
    (parked, for a dispatcher to send). Only the lease holder splits, between batches, and only
    if the cursor is still ``cursor`` and the upper bound still ``upper``: no batch in flight
    can cross the cut, and a retried split cannot cut twice. Returns the new slice's number,
    or ``None`` if the lease, cursor or bound moved (re-read the slice)."""
    with conn.transaction():
        _lock_job_for_dispatch(conn, lease.job_id)
        row = conn.execute(
            """SELECT upper_bound, batch_size, rows_scanned FROM backfill.slices
               WHERE job_id = %s AND slice_no = %s AND lease_token = %s AND NOT done
                 AND cursor IS NOT DISTINCT FROM %s AND upper_bound = %s FOR UPDATE""",
            (lease.job_id, lease.slice_no, lease.token,
             Jsonb(cursor) if cursor is not None else None, Jsonb(upper)),
        ).fetchone()
        if row is None:
            return None
        upper, batch_size, scanned = row
        half = rows_left // 2
        conn.execute(
            """UPDATE backfill.slices SET upper_bound = %s, rows_estimate = %s
               WHERE job_id = %s AND slice_no = %s""",
            (Jsonb(cut), int(scanned) + half, lease.job_id, lease.slice_no),
        )
        new_row = conn.execute(
            """INSERT INTO backfill.slices (job_id, slice_no, lower_bound, upper_bound, cursor,
                                           batch_size, rows_estimate)
               SELECT %(job)s, max(slice_no) + 1, %(cut)s, %(upper)s, %(cut)s, %(size)s, %(est)s
               FROM backfill.slices WHERE job_id = %(job)s
               RETURNING slice_no""",
            {"job": lease.job_id, "cut": Jsonb(cut), "upper": Jsonb(upper), "size": batch_size,
             "est": rows_left - half},
        ).fetchone()
        assert new_row is not None
        new_no = int(new_row[0])
        add_event(conn, lease.job_id, "rebalance", actor=actor,
                  reason=f"slice {lease.slice_no} split at a free slot: slice {new_no} takes "
                         f"about {rows_left - half:,} of its {rows_left:,} rows left",
                  details={"slice": lease.slice_no, "new_slice": new_no, "cut": cut,
                           "upper": upper, "rows_left": rows_left})
    return new_no


def create_slices(
    conn: Conn, job_id: int, bounds: list[tuple[list[Any] | None, list[Any]]], batch_size: int,
    rows_estimate: int | None = None,
) -> None:
    each = None if rows_estimate is None else -(-rows_estimate // max(1, len(bounds)))
    with conn.cursor() as cur:
        cur.executemany(
            # A slice's cursor starts at its (exclusive) lower bound.
            """INSERT INTO backfill.slices (job_id, slice_no, lower_bound, upper_bound, cursor,
                                           batch_size, rows_estimate)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            [(job_id, i, Jsonb(lo) if lo is not None else None, Jsonb(hi),
              Jsonb(lo) if lo is not None else None, batch_size, each)
             for i, (lo, hi) in enumerate(bounds)],
        )
