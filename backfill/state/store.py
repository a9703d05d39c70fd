"""The state store: jobs, slices, events and batch statistics in the ``backfill`` schema.

All SQL that touches the state schema lives here. Functions take a connection so a caller can
put them in the same transaction as a batch's write (that is how checkpoints are atomic).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pgerrors
from psycopg import pq
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.errors import IllegalTransition, JobConflict, JobNotFound
from backfill.core.logs import get_logger
from backfill.job.options import JobOptions
from backfill.job.spec import JobSpec
from backfill.job.states import ACTIVE, TERMINAL, JobState, check_transition
from backfill.state.pace import BatchSample, Limits, measure

_log = get_logger(component="store")


@dataclass(frozen=True)
class JobRecord:
    id: int
    name: str
    kind: str
    source_schema: str
    source_table: str
    source_oid: int
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]
    spec: JobSpec
    options: JobOptions
    options_version: int
    state: JobState
    state_reason: str | None
    conflict_key: str
    rows_estimate: int | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    owner: str | None
    heartbeat_at: dt.datetime | None
    last_error: str | None
    error_range: dict[str, Any] | None
    runs_on: str = "inline"
    rate_share: float | None = None
    batch_rate_share: float | None = None
    canary_rows: int | None = None
    approved_at: dt.datetime | None = None
    approved_by: str | None = None
    dest_oid: int | None = None

    @property
    def table(self) -> str:
        """The source table as SQL writes it (quoted where needed)."""
        return sqltext.render_qualified(self.source_schema, self.source_table)


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


@dataclass(frozen=True)
class Event:
    id: int
    job_id: int
    at: dt.datetime
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str
    reason: str | None
    details: dict[str, Any] | None


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


_JOB_COLUMNS = (
    "id, name, kind, source_schema, source_table, source_oid, key_columns, key_types, spec, "
    "options, "
    "options_version, state, state_reason, conflict_key, rows_estimate, created_by, created_at, "
    "updated_at, started_at, finished_at, owner, heartbeat_at, last_error, error_range, runs_on, "
    "rate_share, batch_rate_share, canary_rows, approved_at, approved_by, dest_oid"
)


def _job(row: dict[str, Any]) -> JobRecord:
    r = dict(row)
    r["key_columns"] = tuple(r["key_columns"])
    r["key_types"] = tuple(r["key_types"])
    r["spec"] = JobSpec.from_json(r["spec"])
    r["options"] = JobOptions.from_json(r["options"])
    r["state"] = JobState(r["state"])
    return JobRecord(**r)


def create_job(
    conn: Conn,
    *,
    name: str,
    spec: JobSpec,
    schema: str,
    table: str,
    key: tuple[str, ...],
    key_types: tuple[str, ...],
    source_oid: int,
    conflict_key: str,
    rows_estimate: int | None,
    actor: str,
    runs_on: str = "inline",
    canary_rows: int | None = None,
    dest_oid: int | None = None,
) -> JobRecord:
    """Insert a pending job and its ``created`` event; refuse a conflicting active job.

    ``conflict_key`` lists what the job writes: ``schema.table(col,col)`` or ``schema.table(*)``
    for whole rows, several joined by ``;`` (see :meth:`PreparedJob.conflict_key`).
    """
    with conn.transaction():
        _lock_conflicts(conn)
        _check_overlap(conn, conflict_key, exclude_id=None)
        try:
            row = conn.cursor(row_factory=dict_row).execute(
                f"""INSERT INTO backfill.jobs (name, kind, source_schema, source_table,
                        source_oid, key_columns, key_types, spec, options, conflict_key,
                        rows_estimate, created_by, runs_on, canary_rows, dest_oid)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    RETURNING {_JOB_COLUMNS}""",  # noqa: S608 - constant column list
                (name, spec.kind, schema, table, source_oid, list(key), list(key_types),
                 Jsonb(spec.to_json()), Jsonb(spec.options.to_json()), conflict_key,
                 rows_estimate, actor, runs_on, canary_rows, dest_oid),
            ).fetchone()
        except pgerrors.UniqueViolation as exc:
            raise JobConflict(_conflict_message(conn, conflict_key)) from exc
        assert row is not None
        job = _job(row)
        add_event(conn, job.id, "created", actor=actor, to_state=JobState.PENDING,
                  reason="enqueued" + (" for the workers" if runs_on == "workers" else ""),
                  details={"spec": spec.to_json(), "runs_on": runs_on})
    return job


#: Advisory lock held while checking and creating (or reviving) active jobs, so two
#: enqueues of overlapping jobs cannot both pass the check.
_CONFLICT_LOCK = 0x6266_696C_6C01


def _lock_conflicts(conn: Conn) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CONFLICT_LOCK,))


def parse_targets(conflict_key: str) -> list[tuple[str, frozenset[str] | None]]:
    """``'[["oid:16384",["a","b"]],["oid:16390",null]]'`` -> ``[("oid:16384", {a, b}),
    ("oid:16390", None)]`` (see :meth:`PreparedJob.conflict_key`). Keys stored before schema
    version 9 (``public.t(a,b);public.u(*)``) are read too."""
    if conflict_key.startswith("["):
        return [(str(t), None if cols is None else frozenset(map(str, cols)))
                for t, cols in json.loads(conflict_key)]
    out: list[tuple[str, frozenset[str] | None]] = []
    for part in conflict_key.split(";"):
        table, _, inner = part.partition("(")
        inner = inner.rstrip(")")
        out.append((table, None if inner == "*" else frozenset(inner.split(","))))
    return out


def overlaps(mine: str, theirs: str) -> bool:
    """Whether two conflict keys share a table and a column (or whole rows)."""
    for table, cols in parse_targets(mine):
        for other_table, other_cols in parse_targets(theirs):
            if table == other_table and (cols is None or other_cols is None or cols & other_cols):
                return True
    return False


def _refusal(job_id: int, state: str, name: str, table: str) -> str:
    return (f"job {job_id} ({name!r}, {state}) already writes {table} (the same table and "
            f"columns): one active job per table and columns; wait for it, or cancel it with "
            f"`backfill cancel {job_id}`")


def _check_overlap(conn: Conn, conflict_key: str, exclude_id: int | None) -> None:
    rows = conn.execute(
        """SELECT id, state, conflict_key, name, source_schema || '.' || source_table
           FROM backfill.jobs
           WHERE state = ANY(%s) AND id IS DISTINCT FROM %s ORDER BY id""",
        ([str(s) for s in ACTIVE], exclude_id),
    ).fetchall()
    for job_id, state, other_key, name, table in rows:
        if overlaps(conflict_key, other_key):
            raise JobConflict(_refusal(job_id, state, name, table))


def _conflict_message(conn: Conn, conflict_key: str) -> str:
    row = conn.execute(
        """SELECT id, state, name, source_schema || '.' || source_table FROM backfill.jobs
           WHERE conflict_key = %s AND state = ANY(%s)""",
        (conflict_key, [str(s) for s in ACTIVE]),
    ).fetchone()
    if row:
        return _refusal(*row)
    return "another active job already writes the same table and columns"


def get_job(conn: Conn, job_id: int, *, for_update: bool = False) -> JobRecord:
    lock = " FOR UPDATE" if for_update else ""
    row = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_JOB_COLUMNS} FROM backfill.jobs WHERE id = %s{lock}",  # noqa: S608
        (job_id,),
    ).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id} (see `backfill list --all`)")
    return _job(row)


def get_jobs(conn: Conn, job_ids: list[int]) -> list[JobRecord]:
    """The jobs with these ids (unknown ids left out), in id order, in one query."""
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_JOB_COLUMNS} FROM backfill.jobs WHERE id = ANY(%s) ORDER BY id",  # noqa: S608
        (job_ids,),
    ).fetchall()
    return [_job(r) for r in rows]


def find_jobs_by_name(conn: Conn, name: str) -> list[JobRecord]:
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_JOB_COLUMNS} FROM backfill.jobs WHERE name = %s ORDER BY id DESC",  # noqa: S608
        (name,),
    ).fetchall()
    return [_job(r) for r in rows]


#: The order jobs are listed in: those that need an operator, then those at work, then those
#: waiting, then finished ones; newest first within each.
LIST_ORDER = ("failed", "awaiting_approval", "running", "throttled", "paused", "pending",
              "succeeded", "cancelled")
_FINISHED_FILTER = "WHERE state <> ALL(ARRAY['succeeded', 'cancelled'])"


def list_jobs(conn: Conn, *, include_finished: bool = False, limit: int | None = None,
              offset: int = 0) -> list[JobRecord]:
    """Jobs in :data:`LIST_ORDER` (failed and active before finished ones), all of them
    unless ``limit``."""
    where = "" if include_finished else _FINISHED_FILTER
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_JOB_COLUMNS} FROM backfill.jobs {where} "  # noqa: S608 - constant fragments
        "ORDER BY array_position(%s::text[], state::text), id DESC LIMIT %s OFFSET %s",
        (list(LIST_ORDER), limit, offset),
    ).fetchall()
    return [_job(r) for r in rows]


def count_jobs(conn: Conn, *, include_finished: bool = False) -> dict[str, int]:
    """How many jobs are in each state (finished ones only with ``include_finished``)."""
    where = "" if include_finished else _FINISHED_FILTER
    rows = conn.execute(
        f"SELECT state::text, count(*) FROM backfill.jobs {where} GROUP BY state"  # noqa: S608
    ).fetchall()
    return {str(state): int(n) for state, n in rows}


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


def add_event(
    conn: Conn,
    job_id: int,
    kind: str,
    *,
    actor: str,
    from_state: str | None = None,
    to_state: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        """INSERT INTO backfill.events (job_id, kind, from_state, to_state, actor, reason, details)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (job_id, kind, from_state, to_state, actor, reason,
         Jsonb(details) if details is not None else None),
    )


def events(conn: Conn, job_id: int, *, limit: int | None = None) -> list[Event]:
    if limit is None:
        rows = conn.cursor(row_factory=dict_row).execute(
            "SELECT * FROM backfill.events WHERE job_id = %s ORDER BY id", (job_id,)
        ).fetchall()
    else:
        rows = conn.cursor(row_factory=dict_row).execute(
            """SELECT * FROM (SELECT * FROM backfill.events WHERE job_id = %s
                              ORDER BY id DESC LIMIT %s) e ORDER BY id""",
            (job_id, limit),
        ).fetchall()
    return [Event(**r) for r in rows]


def transition(
    conn: Conn,
    job_id: int,
    to: JobState,
    *,
    actor: str,
    reason: str | None = None,
    expect: frozenset[JobState] | None = None,
    details: dict[str, Any] | None = None,
    set_owner: str | None = None,
    clear_owner: bool = False,
    error: tuple[str, dict[str, Any] | None] | None = None,
    action: str | None = None,
) -> JobRecord:
    """Move a job to ``to``, checked against the transition table, with one event row.

    Runs in its own transaction (or the caller's). ``expect`` narrows the states the caller
    believes the job is in; anything else is an :class:`IllegalTransition`.
    """
    with conn.transaction():
        job = get_job(conn, job_id, for_update=True)
        if expect is not None and job.state not in expect:
            if job.state in TERMINAL:
                check_transition(job_id, job.state, to)  # "it has already succeeded", ...
            raise IllegalTransition(
                f"job {job_id} is {job.state}, not {' or '.join(sorted(expect))}"
                + (f": nothing to {action}" if action else "")
            )
        check_transition(job_id, job.state, to)
        if job.state == JobState.FAILED and to == JobState.PENDING:  # retry revives the job
            _lock_conflicts(conn)
            _check_overlap(conn, job.conflict_key, exclude_id=job_id)
        assignments = ["state = %(to)s", "state_reason = %(reason)s", "updated_at = now()"]
        params: dict[str, Any] = {"to": str(to), "reason": reason, "id": job_id}
        if to == JobState.RUNNING and job.started_at is None:
            assignments.append("started_at = now()")
        if to in (JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED):
            assignments.append("finished_at = now()")
        elif to == JobState.PENDING:
            assignments.append("finished_at = NULL")
        if set_owner is not None:
            assignments.append("owner = %(owner)s, heartbeat_at = now()")
            params["owner"] = set_owner
        elif clear_owner:
            assignments.append("owner = NULL, heartbeat_at = NULL")
        if error is not None:
            assignments.append("last_error = %(err)s, error_range = %(err_range)s")
            params["err"] = error[0]
            params["err_range"] = Jsonb(error[1]) if error[1] is not None else None
        elif to == JobState.PENDING:
            assignments.append("last_error = NULL, error_range = NULL")
        try:
            conn.execute(
                "UPDATE backfill.jobs SET " + ", ".join(assignments) + " WHERE id = %(id)s",  # type: ignore[arg-type]  # noqa: S608 - fixed fragments
                params,
            )
        except pgerrors.UniqueViolation as exc:
            raise JobConflict(_conflict_message(conn, job.conflict_key)) from exc
        add_event(conn, job_id, "transition", actor=actor, from_state=str(job.state),
                  to_state=str(to), reason=reason, details=details)
        # One log line per state change, wherever it happens (runner, worker, controller, CLI).
        _log.info("job.transition", job_id=job_id, job=job.name, from_state=str(job.state),
                  to_state=str(to), actor=actor, reason=reason)
        return get_job(conn, job_id)


def tune(conn: Conn, job_id: int, changes: dict[str, Any], *, actor: str) -> JobRecord:
    """Change a job's options; running batches pick them up before their next batch."""
    with conn.transaction():
        job = get_job(conn, job_id, for_update=True)
        if job.state in TERMINAL:
            raise IllegalTransition(f"job {job_id} is {job.state}: nothing to tune")
        new = job.options.merged(changes)
        if (new.parallelism != job.options.parallelism and job.runs_on != "workers"
                and slices(conn, job_id)):
            raise IllegalTransition(
                f"job {job_id} runs inline and is already split into slices: its parallelism "
                "can only change before it starts (a job on the workers can change it any time)"
            )
        before = job.options.to_json()
        after = new.to_json()
        diff = {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}
        conn.execute(
            """UPDATE backfill.jobs SET options = %s, options_version = options_version + 1,
                   updated_at = now() WHERE id = %s""",
            (Jsonb(after), job_id),
        )
        add_event(conn, job_id, "tuned", actor=actor, reason="options changed",
                  details={"changes": diff})
        return get_job(conn, job_id)


def heartbeat(conn: Conn, job_id: int, owner: str) -> tuple[JobState, int, str | None] | None:
    """Refresh the owner's heartbeat; ``None`` when ``owner`` no longer owns the job."""
    row = conn.execute(
        """UPDATE backfill.jobs SET heartbeat_at = now() WHERE id = %s AND owner = %s
           RETURNING state, options_version, state_reason""",
        (job_id, owner),
    ).fetchone()
    return (JobState(row[0]), int(row[1]), row[2]) if row else None


def job_status(conn: Conn, job_id: int) -> tuple[JobState, int, str | None, str | None]:
    """(state, options_version, state_reason, owner): the cheap read between batches."""
    row = conn.execute(
        "SELECT state, options_version, state_reason, owner FROM backfill.jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id}")
    return JobState(row[0]), int(row[1]), row[2], row[3]


def take_over(conn: Conn, job_id: int, owner: str, *, actor: str, reason: str,
              expected_owner: str | None) -> None:
    """Make ``owner`` the job's owner, if ``expected_owner`` still is (compare-and-set)."""
    with conn.transaction():
        old = get_job(conn, job_id, for_update=True)
        if old.owner != expected_owner:
            raise JobConflict(
                f"job {job_id} was just taken over by {old.owner}; not taking it from them"
            )
        conn.execute(
            "UPDATE backfill.jobs SET owner = %s, heartbeat_at = now() WHERE id = %s",
            (owner, job_id),
        )
        add_event(conn, job_id, "takeover", actor=actor, from_state=str(old.state),
                  to_state=str(old.state), reason=reason,
                  details={"previous_owner": old.owner,
                           "previous_heartbeat": old.heartbeat_at.isoformat()
                           if old.heartbeat_at else None})


def release(conn: Conn, job_id: int, owner: str) -> None:
    conn.execute(
        "UPDATE backfill.jobs SET owner = NULL, heartbeat_at = NULL WHERE id = %s AND owner = %s",
        (job_id, owner),
    )


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


def set_rows_estimate(conn: Conn, job_id: int, estimate: int | None) -> None:
    conn.execute("UPDATE backfill.jobs SET rows_estimate = %s WHERE id = %s", (estimate, job_id))


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


# -- the controller ----------------------------------------------------------------------------


def controlled_jobs(conn: Conn) -> list[JobRecord]:
    """Jobs the controller decides on: running and throttled."""
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_JOB_COLUMNS} FROM backfill.jobs WHERE state IN ('running', 'throttled') "  # noqa: S608 - constant column list
        "ORDER BY id").fetchall()
    return [_job(r) for r in rows]


def set_shares(conn: Conn, job_id: int, rows_per_s: float | None,
               batches_per_s: float | None) -> bool:
    """Set a job's share of the global budgets; bumps ``options_version`` when it changed, so
    runners pick it up with their next batch. Returns whether it changed."""
    cur = conn.execute(
        """UPDATE backfill.jobs SET rate_share = %(r)s, batch_rate_share = %(b)s,
               options_version = options_version + 1
           WHERE id = %(id)s AND (rate_share IS DISTINCT FROM %(r)s
                                  OR batch_rate_share IS DISTINCT FROM %(b)s)""",
        {"id": job_id, "r": rows_per_s, "b": batches_per_s},
    )
    return cur.rowcount == 1


def record_controller_tick(conn: Conn, leader: str, readings: list[dict[str, Any]],
                           settings: dict[str, Any], *, took_over: bool = False) -> None:
    """The acting controller's poll; ``took_over``: its first since it took the lead (a
    leader that lost its lock and won it back leads anew)."""
    conn.execute(
        """INSERT INTO backfill.controller (id, leader, leader_since, tick_at, readings, settings)
           VALUES (1, %(leader)s, now(), now(), %(readings)s, %(settings)s)
           ON CONFLICT (id) DO UPDATE SET
               leader_since = CASE WHEN backfill.controller.leader = excluded.leader
                                        AND NOT %(took_over)s
                                   THEN backfill.controller.leader_since ELSE now() END,
               leader = excluded.leader, tick_at = now(), readings = excluded.readings,
               settings = excluded.settings""",
        {"leader": leader, "readings": Jsonb(readings), "settings": Jsonb(settings),
         "took_over": took_over},
    )


def job_names(conn: Conn, job_ids: list[int]) -> dict[int, str]:
    return dict(conn.execute("SELECT id, name FROM backfill.jobs WHERE id = ANY(%s)",
                             (job_ids,)).fetchall())


def controller_status(conn: Conn) -> dict[str, Any] | None:
    row = conn.cursor(row_factory=dict_row).execute(
        """SELECT leader, leader_since, tick_at, extract(epoch FROM now() - tick_at) AS age_s,
                  readings, settings FROM backfill.controller WHERE id = 1""").fetchone()
    return dict(row) if row else None


def controller_alive(age_s: float, poll_s: float | None) -> bool:
    """Whether a controller that last polled ``age_s`` ago (polling every ``poll_s``) is
    still acting: five missed polls, and at least 10 s, say it is gone. Its readings expire
    then (the exporter stops serving them) and the jobs it throttled say so."""
    return age_s <= max(10.0, 5 * (poll_s or 1.0))


def unwatched_throttles(conn: Conn, job_ids: list[int]) -> dict[int, str]:
    """For each of ``job_ids`` that is throttled while no controller acts: "throttled by
    controller X, last poll N s ago: is it running?". Fail-closed keeps such a job
    throttled, but only a live controller resumes it, so it must not wait silently."""
    if not job_ids:
        return {}
    status = controller_status(conn)
    if status is not None and controller_alive(
            float(status["age_s"]), (status.get("settings") or {}).get("poll_s")):
        return {}
    rows = conn.execute(
        """SELECT j.id, (SELECT e.actor FROM backfill.events e
                         WHERE e.job_id = j.id AND e.kind = 'transition'
                           AND e.to_state = 'throttled' ORDER BY e.id DESC LIMIT 1)
           FROM backfill.jobs j WHERE j.id = ANY(%s) AND j.state = 'throttled'""",
        (job_ids,)).fetchall()
    notes = {}
    for job_id, actor in rows:
        by = actor or "a controller"
        if status is None:
            notes[job_id] = f"throttled by {by}; no controller polls: is one running?"
            continue
        last = "" if status["leader"] == actor else f" (by {status['leader']})"
        notes[job_id] = (f"throttled by {by}, last poll {float(status['age_s']):,.0f} s ago"
                         f"{last}: is it running?")
    return notes


def with_unwatched_notes(conn: Conn, jobs: list[JobRecord]) -> list[JobRecord]:
    """``jobs`` with the reason of each one throttled by a controller that is gone replaced
    by :func:`unwatched_throttles`' note (the throttle's own reason follows it): what
    ``show``, ``list`` and ``watch`` display."""
    notes = unwatched_throttles(conn, [j.id for j in jobs if j.state == JobState.THROTTLED])
    return [dataclasses.replace(j, state_reason=f"{notes[j.id]} (throttled for: "
                                                f"{j.state_reason or 'no reason recorded'})")
            if j.id in notes else j for j in jobs]
