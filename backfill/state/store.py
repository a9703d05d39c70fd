"""The state store: jobs and their events in the ``backfill`` schema (slices and leases are in
``leases``, checkpoints and progress in ``checkpoints``, the controller's rows in ``control``).

All SQL that touches the state schema lives here. Functions take a connection so a caller can
put them in the same transaction as a batch's write (that is how checkpoints are atomic).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pgerrors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.errors import IllegalTransition, JobConflict, JobNotFound
from backfill.core.logs import get_logger
from backfill.job.options import JobOptions
from backfill.job.spec import JobSpec
from backfill.job.states import ACTIVE, TERMINAL, JobState, check_transition

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


JOB_COLUMNS = (
    "id, name, kind, source_schema, source_table, source_oid, key_columns, key_types, spec, "
    "options, "
    "options_version, state, state_reason, conflict_key, rows_estimate, created_by, created_at, "
    "updated_at, started_at, finished_at, owner, heartbeat_at, last_error, error_range, runs_on, "
    "rate_share, batch_rate_share, canary_rows, approved_at, approved_by, dest_oid"
)


def job_from_row(row: dict[str, Any]) -> JobRecord:
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
                    RETURNING {JOB_COLUMNS}""",  # noqa: S608 - constant column list
                (name, spec.kind, schema, table, source_oid, list(key), list(key_types),
                 Jsonb(spec.to_json()), Jsonb(spec.options.to_json()), conflict_key,
                 rows_estimate, actor, runs_on, canary_rows, dest_oid),
            ).fetchone()
        except pgerrors.UniqueViolation as exc:
            raise JobConflict(_conflict_message(conn, conflict_key)) from exc
        assert row is not None
        job = job_from_row(row)
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
        f"SELECT {JOB_COLUMNS} FROM backfill.jobs WHERE id = %s{lock}",  # noqa: S608
        (job_id,),
    ).fetchone()
    if row is None:
        raise JobNotFound(f"no job with id {job_id} (see `backfill list --all`)")
    return job_from_row(row)


def get_jobs(conn: Conn, job_ids: list[int]) -> list[JobRecord]:
    """The jobs with these ids (unknown ids left out), in id order, in one query."""
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {JOB_COLUMNS} FROM backfill.jobs WHERE id = ANY(%s) ORDER BY id",  # noqa: S608
        (job_ids,),
    ).fetchall()
    return [job_from_row(r) for r in rows]


def find_jobs_by_name(conn: Conn, name: str) -> list[JobRecord]:
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {JOB_COLUMNS} FROM backfill.jobs WHERE name = %s ORDER BY id DESC",  # noqa: S608
        (name,),
    ).fetchall()
    return [job_from_row(r) for r in rows]


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
        f"SELECT {JOB_COLUMNS} FROM backfill.jobs {where} "  # noqa: S608 - constant fragments
        "ORDER BY array_position(%s::text[], state::text), id DESC LIMIT %s OFFSET %s",
        (list(LIST_ORDER), limit, offset),
    ).fetchall()
    return [job_from_row(r) for r in rows]


def count_jobs(conn: Conn, *, include_finished: bool = False) -> dict[str, int]:
    """How many jobs are in each state (finished ones only with ``include_finished``)."""
    where = "" if include_finished else _FINISHED_FILTER
    rows = conn.execute(
        f"SELECT state::text, count(*) FROM backfill.jobs {where} GROUP BY state"  # noqa: S608
    ).fetchall()
    return {str(state): int(n) for state, n in rows}


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
                and conn.execute("SELECT EXISTS (SELECT 1 FROM backfill.slices WHERE job_id = %s)",
                                 (job_id,)).fetchone() == (True,)):
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


def set_rows_estimate(conn: Conn, job_id: int, estimate: int | None) -> None:
    conn.execute("UPDATE backfill.jobs SET rows_estimate = %s WHERE id = %s", (estimate, job_id))
