"""The reaper: the loop that keeps jobs on the workers moving without an operator.

Redis holds nothing that cannot be rebuilt from PostgreSQL. Each pass starts pending jobs that
run on the workers (enqueued for them, or resumed) and sends a task for every slice that needs
one: its lease expired (a worker was killed), its task never started (lost with the broker),
or it was parked (paused, throttled, or a slot was full). Sending is the caller's business (a
``send`` callable): this module never imports Celery.

Every worker runs a reaper thread; a session advisory lock lets one of them work at a time,
and when its process dies the lock goes with its connection and another worker's reaper takes
over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from backfill.core.catalog import Conn
from backfill.core.db import connect, hold_lock_briefly_after_death, redact_text
from backfill.core.errors import (
    BackfillError,
    IllegalTransition,
    InvalidInput,
    JobConflict,
    JobNotFound,
)
from backfill.core.logs import get_logger
from backfill.engine.runner import WORKERS_OWNER, Gate, Runner
from backfill.job.states import JobState
from backfill.state import leases, store
from backfill.state.schema import require_current

Send = Callable[[list[leases.Dispatch]], None]
#: Session advisory lock: one reaper at a time across all workers.
REAPER_LOCK = 0x6266_696C_6C02

log = get_logger(component="reaper")


def reap(dsn: str, *, actor: str, send: Send, gate: Gate | None,
         stale_after_s: float = 120.0) -> list[leases.Dispatch]:
    """One pass over the jobs on the workers; returns the tasks it sent. ``gate`` runs before a
    job's first write (None: no pre-flight)."""
    conn = connect(dsn)
    try:
        require_current(conn)
        auto_approve(conn, actor)   # first: an approved job is pending, started below
        jobs = leases.worker_jobs(conn)
    finally:
        conn.close()
    sent: list[leases.Dispatch] = []
    for job_id, state in jobs:
        runner = Runner(dsn, job_id, actor=actor, owner=WORKERS_OWNER,
                        dispatch_stale_s=stale_after_s)
        try:
            claims = runner.start_distributed(gate=gate, replace_queued=False)
        except (IllegalTransition, JobConflict, JobNotFound):
            continue  # moved by someone else since it was listed
        except InvalidInput as exc:  # its table or key changed: it can never go on
            _refuse(dsn, job_id, actor, exc)
            continue
        except (BackfillError, psycopg.Error) as exc:  # this job only; the others go on
            log.warning("reaper.job_skipped", job_id=job_id, state=str(state),
                        error=redact_text(str(exc)))
            continue
        if claims:
            send(claims)
            sent.extend(claims)
    if sent:
        log.info("reaper.dispatched", tasks=[(d.job_id, d.slice_no) for d in sent])
    return sent


def auto_approve(conn: Conn, actor: str) -> None:
    """Jobs on the workers whose canary waited out its --auto-approve-after go on."""
    from backfill.engine.canary import approve, auto_approval_due

    waiting = conn.execute("SELECT id FROM backfill.jobs WHERE state = 'awaiting_approval' "
                           "AND runs_on = 'workers'").fetchall()
    for (job_id,) in waiting:
        job = store.get_job(conn, job_id)
        try:
            if auto_approval_due(conn, job) is True:
                approve(conn, job, actor="auto-approve",
                        reason="auto-approved after a quiet period")
        except (BackfillError, psycopg.Error) as exc:
            log.warning("reaper.auto_approve_failed", job_id=job.id,
                        error=redact_text(str(exc)))


def _refuse(dsn: str, job_id: int, actor: str, exc: BackfillError) -> None:
    """A job that cannot go on (its table was replaced, its key is gone) fails with the
    reason, instead of being retried by every pass."""
    conn = connect(dsn)
    try:
        store.transition(conn, job_id, JobState.FAILED, actor=actor,
                         reason=f"cannot run on the workers: {exc}",
                         expect=frozenset({JobState.PENDING, JobState.RUNNING,
                                           JobState.THROTTLED}),
                         error=(str(exc), None))
        log.error("reaper.job_failed", job_id=job_id, error=str(exc))
    except BackfillError:
        pass  # someone else moved it meanwhile
    finally:
        conn.close()


class ReaperLoop:
    """``reap`` every ``every_s`` seconds while holding the reaper lock, until ``stop``."""

    def __init__(self, dsn: str, *, actor: str, send: Send, gate: Gate | None,
                 every_s: float = 10.0, stale_after_s: float = 120.0,
                 stop: threading.Event | None = None) -> None:
        self.dsn = dsn
        self.actor = actor
        self.send = send
        self.gate = gate
        self.every_s = every_s
        self.stale_after_s = stale_after_s
        self.stop = stop or threading.Event()
        self._lock_conn: Conn | None = None

    def _leader(self) -> bool:
        conn = self._lock_conn
        if conn is not None and (conn.closed or conn.broken):
            conn.close()
            conn = self._lock_conn = None
        if conn is None:
            conn = connect(self.dsn, application_name="backfill reaper")
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (REAPER_LOCK,)).fetchone()
            if not (row and row[0]):
                conn.close()
                return False
            hold_lock_briefly_after_death(conn)
            self._lock_conn = conn
            log.info("reaper.leader", actor=self.actor)
            return True
        conn.execute("SELECT 1")  # is the session (and so the lock) still alive?
        return True

    def run_once(self) -> list[leases.Dispatch]:
        try:
            if not self._leader():
                return []
            return reap(self.dsn, actor=self.actor, send=self.send, gate=self.gate,
                        stale_after_s=self.stale_after_s)
        except Exception as exc:  # the database or broker is away: try again next round
            log.warning("reaper.pass_failed", error=redact_text(str(exc)))
            if self._lock_conn is not None and (self._lock_conn.broken or self._lock_conn.closed):
                self._lock_conn = None
            return []

    def run_forever(self) -> None:
        while not self.stop.is_set():
            self.run_once()
            self.stop.wait(self.every_s)
        if self._lock_conn is not None:
            self._lock_conn.close()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="backfill-reaper", daemon=True)
        thread.start()
        return thread
