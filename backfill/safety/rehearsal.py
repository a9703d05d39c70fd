"""Rehearse a job on a clone: run it there for real, measure, verify, and keep the figures on
the original job so ``show``, ``preflight`` and migration plans print a measured duration.

The clone is any database holding the same table (a ``pg_basebackup`` of production, a
staging copy, ``CREATE DATABASE … TEMPLATE``). It must not be the job's own database: the
same cluster (``system_identifier``) and the same database name are refused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pgerrors

from backfill.core.catalog import Conn
from backfill.core.db import connect, redact_dsn
from backfill.core.errors import InvalidInput
from backfill.engine.prepare import prepare
from backfill.job.states import ACTIVE, JobState
from backfill.state import checkpoints, store
from backfill.state.schema import upgrade_conn

REHEARSAL_EVENT = "rehearsal"


@dataclass(frozen=True)
class Rehearsal:
    job_id: int                 # on the original database
    clone_job_id: int           # on the clone
    clone: str                  # the clone's DSN, password redacted
    state: str
    rows: int
    rows_changed: int
    seconds: float
    rows_per_s: float
    wal_bytes: float
    wal_bytes_per_row: float
    batches: int
    batch_ms_p50: float | None
    batch_ms_p95: float | None
    retries: int
    lock_timeouts: int
    verified: bool | None
    verify_detail: str | None
    #: False when the clone refused CHECKPOINT (no pg_checkpoint role): the WAL measured
    #: may lack the full-page images production writes, so pre-flight trusts it less.
    checkpointed: bool = True

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _identity(conn: Conn) -> tuple[str, str]:
    row = conn.execute("SELECT (SELECT system_identifier::text FROM pg_control_system()), "
                       "current_database()").fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def check_clone(primary: Conn, clone: Conn) -> None:
    if _identity(primary) == _identity(clone):
        raise InvalidInput("--on names the job's own database: a rehearsal runs the job for "
                           "real, so it needs a clone (pg_basebackup, a staging copy, or "
                           "CREATE DATABASE … TEMPLATE)")


def measure(clone: Conn, clone_job_id: int) -> dict[str, Any]:
    """Batch durations, retries and lock timeouts of the rehearsed job, from its state."""
    row = clone.execute(
        """SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)
           FROM backfill.batches WHERE job_id = %s""", (clone_job_id,)).fetchone()
    ev = clone.execute(
        """SELECT count(*), count(*) FILTER (WHERE reason ILIKE '%%lock%%timeout%%')
           FROM backfill.events WHERE job_id = %s AND kind = 'retry'""",
        (clone_job_id,)).fetchone()
    assert row is not None
    assert ev is not None
    return {"batches": int(row[0]), "batch_ms_p50": row[1], "batch_ms_p95": row[2],
            "retries": int(ev[0]), "lock_timeouts": int(ev[1])}


def latest(conn: Conn, job_id: int) -> dict[str, Any] | None:
    """The last rehearsal's figures stored on ``job_id``."""
    row = conn.execute(
        "SELECT details FROM backfill.events WHERE job_id = %s AND kind = %s "
        "ORDER BY id DESC LIMIT 1", (job_id, REHEARSAL_EVENT)).fetchone()
    return dict(row[0]) if row and row[0] else None


def latest_for_table(conn: Conn, schema: str, table: str) -> dict[str, Any] | None:
    """The last rehearsal of any job on ``schema.table`` (for migration plans)."""
    row = conn.execute(
        """SELECT e.details FROM backfill.events e JOIN backfill.jobs j ON j.id = e.job_id
           WHERE e.kind = %s AND j.source_schema = %s AND j.source_table = %s
           ORDER BY e.id DESC LIMIT 1""", (REHEARSAL_EVENT, schema, table)).fetchone()
    return dict(row[0]) if row and row[0] else None


def rehearse(primary_dsn: str, clone_dsn: str, job: store.JobRecord, *, actor: str,
             run: Any) -> Rehearsal:
    """Enqueue ``job``'s spec on the clone, run it there to the end (``run(dsn, job_id)``, the
    caller's inline runner), verify it, and record the figures on the original job."""
    from backfill.engine.enqueue import create_job
    from backfill.engine.verify import verify

    with connect(primary_dsn) as primary, connect(clone_dsn) as clone:
        check_clone(primary, clone)
        upgrade_conn(clone)
        spec = dataclasses.replace(job.spec, name=f"rehearsal of job {job.id}", canary=None,
                                   auto_approve_after_ms=None)
        # A clone taken after the job was enqueued holds the job too: that copy would
        # conflict with the rehearsal's, so it is cancelled there (the clone is disposable).
        mine = prepare(clone, spec, explain=False).conflict_key()
        for copy in store.list_jobs(clone):
            if copy.state in ACTIVE and store.overlaps(mine, copy.conflict_key):
                store.transition(clone, copy.id, JobState.CANCELLED, actor=actor,
                                 reason="superseded on this clone by a rehearsal")
        clone_job = create_job(clone, spec, actor=actor, workers=False)
        store.add_event(clone, clone_job.id, "preflight_skipped", actor=actor,
                        reason="a rehearsal on a clone")
        # A fresh clone's pages were just written whole to the WAL (or copied): until the
        # next checkpoint, changing them logs no full-page images, while production's first
        # change of each page after a checkpoint does. A checkpoint first makes the WAL
        # measured here the WAL the job will write there.
        checkpointed = True
        try:
            clone.execute("CHECKPOINT")
        except pgerrors.InsufficientPrivilege:
            checkpointed = False
        lsn = clone.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    started = time.monotonic()
    done = run(clone_dsn, clone_job.id)
    seconds = time.monotonic() - started
    with connect(clone_dsn) as clone, connect(primary_dsn) as primary:
        wal_row = clone.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                                (lsn[0] if lsn else None,)).fetchone()
        wal = float(wal_row[0]) if wal_row and wal_row[0] is not None else 0.0
        prog = checkpoints.progress(clone, clone_job.id)
        figures = measure(clone, clone_job.id)
        verified: bool | None = None
        detail = None
        if done.state == "succeeded":
            report = verify(clone, clone_job.id)
            verified = report.ok if report.unverifiable is None else None
            detail = report.unverifiable or "; ".join(d.detail for d in report.diffs[:3]) or None
        result = Rehearsal(
            job_id=job.id, clone_job_id=clone_job.id, clone=redact_dsn(clone_dsn),
            state=str(done.state), rows=prog.rows_scanned, rows_changed=prog.rows_affected,
            seconds=seconds, rows_per_s=prog.rows_scanned / seconds if seconds > 0 else 0.0,
            wal_bytes=wal, wal_bytes_per_row=wal / prog.rows_affected if prog.rows_affected
            else 0.0, verified=verified, verify_detail=detail, checkpointed=checkpointed,
            **figures)
        store.add_event(primary, job.id, REHEARSAL_EVENT, actor=actor,
                        reason=f"rehearsed on {result.clone}: {result.rows:,} rows at "
                        f"{result.rows_per_s:,.0f} rows/s, {result.wal_bytes / 2**20:,.1f} MB "
                        "of WAL" + ("" if verified is not False else ", DID NOT VERIFY"),
                        details=result.to_json())
    return result
