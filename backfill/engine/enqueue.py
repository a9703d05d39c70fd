"""A job is born: its spec checked against the database (a dry EXPLAIN included) and stored as
pending, with its undo table, in one transaction."""

from __future__ import annotations

import builtins

from backfill.core.catalog import Conn
from backfill.core.errors import DatabaseUnavailable, InvalidInput
from backfill.engine.prepare import prepare
from backfill.job.spec import JobSpec, canary_size, source_engine
from backfill.state import store


def create_job(conn: Conn, spec: JobSpec, *, actor: str, workers: bool) -> store.JobRecord:
    """Validate ``spec`` on ``conn`` (a dry EXPLAIN included) and store it as pending; inside
    the caller's transaction when there is one (the migrator records the job's id with it)."""
    if spec.source_dsn is not None and workers:
        raise InvalidInput("a cross-database copy runs inline (`backfill run`), not on the "
                           "workers")
    try:
        prepared = prepare(conn, spec, explain=True)
    except DatabaseUnavailable as exc:
        if source_engine(spec.source_dsn) != "mysql":
            raise
        # Nothing is stored yet: an unreachable source is input to fix, like a bad DSN.
        raise InvalidInput(f"{exc}: nothing was enqueued") from None
    spec = prepared.spec   # a MySQL source's plan (key, casts) is stored with the job
    canary_rows = None
    if spec.canary is not None:
        if prepared.table.rows_estimate is None and spec.canary.strip().endswith("%"):
            raise InvalidInput(f"a canary in percent needs {prepared.table.qualified}'s size: "
                               "ANALYZE it, or give the canary in rows")
        canary_rows = canary_size(spec.canary, prepared.table.rows_estimate)
    with conn.transaction():   # the job and its undo table: both or neither
        job = store.create_job(
            conn, name=spec.display_name, spec=spec, schema=prepared.table.schema,
            table=prepared.table.name, key=prepared.key, key_types=prepared.key_types,
            source_oid=prepared.table.oid, conflict_key=prepared.conflict_key(),
            rows_estimate=prepared.table.rows_estimate, actor=actor,
            runs_on="workers" if workers else "inline", canary_rows=canary_rows,
            dest_oid=prepared.dest.oid if prepared.dest is not None else None,
        )
        if spec.undo_enabled:
            prepared.create_undo_table(conn, job.id)
            for warning in _undo_gaps(conn, spec, prepared.table.oid):
                store.add_event(conn, job.id, "warning", actor=actor, reason=warning)
    return job


def _undo_gaps(conn: Conn, spec: JobSpec, oid: int) -> builtins.list[str]:
    """What an undo log cannot restore on this table: rows other tables lose by cascade,
    columns a BEFORE trigger changes beside the job's."""
    gaps = []
    if spec.kind == "delete":
        rows = conn.execute(
            """SELECT conrelid::regclass::text, conname FROM pg_constraint
               WHERE confrelid = %s AND contype = 'f' AND confdeltype IN ('c', 'n', 'd')""",
            (oid,)).fetchall()
        gaps += [f"undo log: rows that {t} loses or changes through {c} (ON DELETE) are not "
                 "logged; revert puts back this table's rows only" for t, c in rows]
    else:
        rows = conn.execute(
            """SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal
                 AND tgtype & 2 = 2 AND tgtype & 16 = 16""", (oid,)).fetchall()
        gaps += [f"undo log: BEFORE UPDATE trigger {t} may change columns the job does not "
                 "write; revert restores the job's columns only" for (t,) in rows]
    return gaps
