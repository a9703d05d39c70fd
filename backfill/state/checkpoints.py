"""Checkpoints and what they add up to: each batch's row, its duration bucket, the canary's
mark, and a job's totals and pace.

``checkpoint`` runs in the batch's own transaction: the cursor moves if and only if the rows
were written."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from backfill.core.catalog import Conn
from backfill.core.logs import get_logger
from backfill.job.states import JobState
from backfill.state.pace import BatchSample, Limits, measure
from backfill.state.store import JobRecord, get_job

_log = get_logger(component="store")


@dataclass(frozen=True)
class Progress:
    """A job's totals, and for a running or throttled job its pace (see :mod:`backfill.state.pace`):
    rows/s over a recent window of batches up to now, the ETA at that rate within the job's
    limits (running jobs only), and since when it is stalled (running, no batch for longer
    than expected)."""

    rows_scanned: int
    rows_affected: int
    batches: int
    slices: int
    slices_done: int
    last_batch_at: dt.datetime | None
    recent_rows_per_s: float | None
    current_batch_size: int | None
    eta_s: float | None = None
    stalled_since: dt.datetime | None = None
    expected_interval_s: float | None = None


#: Upper bounds (seconds) of the batch duration histogram's buckets; a 12th is +Inf.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def duration_bucket(duration_ms: float) -> int:
    """The (1-based) histogram bucket a batch of ``duration_ms`` falls in."""
    seconds = duration_ms / 1000.0
    for i, bound in enumerate(DURATION_BUCKETS_S, start=1):
        if seconds <= bound:
            return i
    return len(DURATION_BUCKETS_S) + 1


def reach_canary(conn: Conn, job_id: int, *, actor: str) -> bool:
    """In a batch's transaction, after its checkpoint: once the job's done rows reach its
    canary, move it to awaiting_approval (other slices' batches then commit nothing, as for a
    pause) with the canary's figures in the event. True for the one batch that did it."""
    reached = conn.execute(
        """SELECT j.canary_rows IS NOT NULL AND j.approved_at IS NULL
                  AND j.state IN ('running', 'throttled')
                  AND (SELECT sum(rows_scanned) FROM backfill.slices WHERE job_id = j.id)
                      >= j.canary_rows
           FROM backfill.jobs j WHERE j.id = %s""", (job_id,)).fetchone()
    if not (reached and reached[0]):
        return False
    # FOR UPDATE waits for the batches of other slices that already passed their checkpoint
    # (they hold KEY SHARE): they commit before the canary ends, later ones commit nothing.
    conn.execute("SELECT 1 FROM backfill.jobs WHERE id = %s FOR UPDATE", (job_id,))
    row = conn.execute(
        """WITH total AS (SELECT sum(rows_scanned)::bigint AS n, sum(rows_affected)::bigint AS a
                          FROM backfill.slices WHERE job_id = %(job)s),
                prev AS (SELECT state FROM backfill.jobs WHERE id = %(job)s),
                -- The time the job spent running: paused, throttled, failed or pending
                -- stretches (a retry, an operator's pause) are no part of its rows/s.
                running AS (
               SELECT coalesce(sum(extract(epoch FROM coalesce(nxt, clock_timestamp()) - at)),
                               0)::float8 AS secs
               FROM (SELECT to_state, at, lead(at) OVER (ORDER BY id) AS nxt
                     FROM backfill.events WHERE job_id = %(job)s AND kind = 'transition'
                       AND to_state IS NOT NULL) t
               WHERE to_state = 'running'),
                upd AS (
               UPDATE backfill.jobs j SET state = 'awaiting_approval', updated_at = now(),
                      state_reason = 'canary of ' || total.n || ' rows done; '
                                     || '`backfill approve` lets the rest run'
               FROM total, running WHERE j.id = %(job)s AND j.state IN ('running', 'throttled')
                 AND j.canary_rows IS NOT NULL AND j.approved_at IS NULL
                 AND total.n >= j.canary_rows
               RETURNING j.id, j.state_reason, total.n, total.a, running.secs)
           INSERT INTO backfill.events (job_id, kind, from_state, to_state, actor, reason, details)
           SELECT upd.id, 'transition', prev.state, 'awaiting_approval', %(actor)s,
                  upd.state_reason,
                  jsonb_build_object('canary_rows', upd.n, 'canary_changed', upd.a,
                                     'canary_seconds', upd.secs,
                                     'canary_rows_per_s', upd.n / greatest(upd.secs, 0.001))
           FROM upd, prev RETURNING job_id""", {"job": job_id, "actor": actor}).fetchone()
    if row is not None:
        _log.info("job.transition", job_id=job_id, to_state="awaiting_approval", actor=actor,
                 reason="canary done")
    return row is not None


def canary_report(conn: Conn, job_id: int) -> dict[str, Any] | None:
    """The canary's figures (rows, seconds, rows/s) and its verification, from the events."""
    row = conn.execute(
        """SELECT id, details FROM backfill.events WHERE job_id = %s AND kind = 'transition'
             AND to_state = 'awaiting_approval' ORDER BY id DESC LIMIT 1""", (job_id,)).fetchone()
    if row is None:
        return None
    report = dict(row[1] or {})
    # Only a verdict on this canary counts (a retried job reaches a new one).
    verified = conn.execute(
        """SELECT kind, reason FROM backfill.events WHERE job_id = %s AND id > %s
             AND kind IN ('canary_verified', 'canary_failed') ORDER BY id DESC LIMIT 1""",
        (job_id, row[0])).fetchone()
    report["verified"] = None if verified is None else verified[0] == "canary_verified"
    report["verify_detail"] = verified[1] if verified else None
    return report


def checkpoint(
    conn: Conn,
    *,
    job_id: int,
    slice_no: int,
    prev: list[Any] | None,
    new: list[Any],
    done: bool,
    rows_scanned: int,
    rows_affected: int,
    batch_size: int,
    next_batch_size: int,
    duration_ms: float,
    attempts: int,
    lease_token: int,
) -> tuple[int, str, int] | None:
    """Advance a slice's cursor from ``prev`` to ``new`` and record the batch; returns the
    batch's id with the job's state and options version, or ``None`` if the cursor was not
    ``prev`` (a duplicate or late batch) or the job is no longer running.

    Called inside the batch's transaction: the checkpoint commits with the write or not at all.
    """
    row = conn.execute(
        """WITH j AS (
               -- KEY SHARE: a pause or cancel (SELECT ... FOR UPDATE in transition) waits for
               -- this batch to commit or roll back, so it cannot slip in between this check
               -- and COMMIT; heartbeats (no key change) do not wait.
               SELECT id, state, options_version FROM backfill.jobs
               WHERE id = %(job)s AND state IN ('running', 'throttled') FOR KEY SHARE),
           cp AS (
               UPDATE backfill.slices s
               SET cursor = %(new)s, done = %(done)s,
                   rows_scanned = s.rows_scanned + %(scanned)s,
                   rows_affected = s.rows_affected + %(affected)s,
                   batches = s.batches + 1, batch_size = %(next_size)s, updated_at = now(),
                   duration_buckets[%(bucket)s] = s.duration_buckets[%(bucket)s] + 1,
                   duration_sum_ms = s.duration_sum_ms + %(duration)s
               FROM j
               WHERE s.job_id = %(job)s AND s.slice_no = %(slice)s AND NOT s.done
                 AND s.cursor IS NOT DISTINCT FROM %(prev)s
                 AND s.lease_token = %(token)s
                 -- a batch racing a pause or cancel commits nothing; one racing the
                 -- controller's throttle may finish
                 AND j.id = s.job_id
               RETURNING s.job_id, j.state, j.options_version),
           b AS (
               INSERT INTO backfill.batches (job_id, slice_no, duration_ms, batch_size,
                                             rows_scanned, rows_affected, attempts, lower_bound,
                                             upper_bound)
               SELECT job_id, %(slice)s, %(duration)s, %(size)s, %(scanned)s, %(affected)s,
                      %(attempts)s, %(prev)s, %(new)s FROM cp
               RETURNING id)
           SELECT b.id, cp.state, cp.options_version FROM b, cp""",
        {
            "new": Jsonb(new), "done": done, "scanned": rows_scanned, "affected": rows_affected,
            "next_size": next_batch_size, "job": job_id, "slice": slice_no,
            "prev": Jsonb(prev) if prev is not None else None, "duration": duration_ms,
            "size": batch_size, "attempts": attempts, "token": lease_token,
            "bucket": duration_bucket(duration_ms),
        },
    ).fetchone()
    return (int(row[0]), str(row[1]), int(row[2])) if row is not None else None


def prune_batches(conn: Conn, job_id: int, keep: int = 1000) -> int:
    cur = conn.execute(
        """DELETE FROM backfill.batches WHERE job_id = %(job)s AND id <= (
               SELECT id FROM backfill.batches WHERE job_id = %(job)s
               ORDER BY id DESC OFFSET %(keep)s LIMIT 1)""",
        {"job": job_id, "keep": keep},
    )
    return cur.rowcount


#: Batches read per running job to measure its pace (the rest are pruned anyway).
_PACE_BATCHES = 200


def progress(conn: Conn, job_id: int) -> Progress:
    """A job's totals and pace (raises :class:`JobNotFound` for an unknown id)."""
    return progress_of(conn, [get_job(conn, job_id)])[job_id]


def progress_of(conn: Conn, jobs: list[JobRecord]) -> dict[int, Progress]:
    """Totals and pace of several jobs, in three queries whatever their number."""
    if not jobs:
        return {}
    ids = [j.id for j in jobs]
    totals = {int(r[0]): r for r in conn.execute(
        """SELECT job_id, coalesce(sum(rows_scanned), 0), coalesce(sum(rows_affected), 0),
                  coalesce(sum(batches), 0), count(*), count(*) FILTER (WHERE done),
                  max(batch_size) FILTER (WHERE NOT done)
           FROM backfill.slices WHERE job_id = ANY(%s) GROUP BY job_id""", (ids,)).fetchall()}
    live = [j.id for j in jobs if j.state in (JobState.RUNNING, JobState.THROTTLED)]
    samples: dict[int, list[BatchSample]] = {i: [] for i in live}
    last_at: dict[int, dt.datetime] = {}
    since: dict[int, dt.datetime | None] = {}
    now_row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert now_row is not None
    now: dt.datetime = now_row[0]
    # Running jobs: their recent batches, and when they last started running (a resume or a
    # retry starts a new window; the controller's throttle and release do not).
    for job_id, finished_at, duration_ms, rows, started in conn.execute(
        """SELECT j.id, b.finished_at, b.duration_ms, b.rows_scanned, r.at
           FROM unnest(%s::bigint[]) AS j(id)
           LEFT JOIN LATERAL (
               SELECT max(at) AS at FROM backfill.events e
               WHERE e.job_id = j.id AND e.to_state = 'running'
                 AND e.from_state IS DISTINCT FROM 'throttled') r ON true
           LEFT JOIN LATERAL (
               SELECT finished_at, duration_ms, rows_scanned FROM backfill.batches b
               WHERE b.job_id = j.id ORDER BY b.id DESC LIMIT %s) b ON true""",
        (live, _PACE_BATCHES)).fetchall():
        since[job_id] = started
        if finished_at is not None:
            samples[job_id].append(BatchSample(finished_at, float(duration_ms) / 1000.0,
                                               int(rows)))
    for job_id, at in conn.execute(
        """SELECT j.id, (SELECT finished_at FROM backfill.batches b WHERE b.job_id = j.id
                         ORDER BY b.id DESC LIMIT 1)
           FROM unnest(%s::bigint[]) AS j(id)""",
            ([i for i in ids if i not in samples],)).fetchall():
        if at is not None:
            last_at[job_id] = at
    result: dict[int, Progress] = {}
    for job in jobs:
        row = totals.get(job.id)
        scanned = int(row[1]) if row else 0
        size = int(row[6]) if row and row[6] is not None else None
        batches = samples.get(job.id)
        rate = eta = stalled = expected = None
        if batches is not None:
            batches.sort(key=lambda b: b.finished_at, reverse=True)
            if batches:
                last_at[job.id] = batches[0].finished_at
            opts = job.options
            pace = measure(
                batches, now=now, running_since=since.get(job.id) or job.started_at,
                running=job.state == JobState.RUNNING,
                rows_left=(max(0, job.rows_estimate - scanned)
                           if job.rows_estimate is not None else None),
                limits=Limits(rate_limit=opts.rate_limit, rows_share=job.rate_share,
                              batches_share=job.batch_rate_share, pause_s=opts.pause_ms / 1000,
                              chains=opts.parallelism if job.runs_on == "workers" else 1,
                              batch_size=size or opts.batch_size))
            rate, eta, stalled, expected = (pace.rows_per_s, pace.eta_s, pace.stalled_since,
                                            pace.expected_interval_s)
        result[job.id] = Progress(
            rows_scanned=scanned, rows_affected=int(row[2]) if row else 0,
            batches=int(row[3]) if row else 0, slices=int(row[4]) if row else 0,
            slices_done=int(row[5]) if row else 0, last_batch_at=last_at.get(job.id),
            recent_rows_per_s=rate, current_batch_size=size, eta_s=eta, stalled_since=stalled,
            expected_interval_s=expected)
    return result
