"""Tasks: thin adapters from Celery to the core. Retries live in the core, not here."""

from __future__ import annotations

import os
import socket

from celery.signals import worker_init

from backfill import store
from backfill.db import connect
from backfill.errors import BackfillError
from backfill.logs import get_logger
from backfill.runner import Runner
from backfill.schema import require_current
from workers.app import SLICE_BUDGET_S, app

log = get_logger(component="worker")
#: The owner recorded on jobs run by the workers (no single process owns them).
WORKERS = "workers"


def _dsn() -> str:
    dsn = os.environ.get("BACKFILL_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise RuntimeError("set BACKFILL_DSN for the worker")
    return dsn


@worker_init.connect
def _check_schema(**_: object) -> None:
    """Refuse to start against a missing or mismatched state schema."""
    conn = connect(_dsn())
    try:
        require_current(conn)
    finally:
        conn.close()


@app.task(name="backfill.run_slice")
def run_slice(job_id: int, slice_no: int) -> str:
    """Work on one slice for a time budget, then re-dispatch it (or stop if the job stopped)."""
    owner = f"worker:{socket.gethostname()}:{os.getpid()}"
    try:
        outcome = Runner(_dsn(), job_id, actor=owner, owner=owner).run_slice(
            slice_no, budget_s=SLICE_BUDGET_S)
    except BackfillError as exc:  # an unknown or ended job: drop the task, write nothing
        log.warning("task.dropped", job_id=job_id, slice=slice_no, error=str(exc))
        return "dropped"
    if outcome == "more":
        run_slice.apply_async((job_id, slice_no))
    log.info("task.done", job_id=job_id, slice=slice_no, outcome=outcome)
    return outcome


def reap(dsn: str, *, actor: str) -> list[tuple[int, int]]:
    """Send a task for every slice of a worker-run job with no live lease."""
    conn = connect(dsn)
    try:
        orphans = [(j, s) for j, s, _ in store.expired_slices(conn, owner=WORKERS)]
    finally:
        conn.close()
    for job_id, slice_no in orphans:
        run_slice.apply_async((job_id, slice_no))
    if orphans:
        log.info("reaper.dispatched", slices=orphans, actor=actor)
    return orphans


def dispatch(dsn: str, job_id: int, *, actor: str) -> list[int]:
    """Start (or re-start) a job for workers and send one task per unfinished slice."""
    slices = Runner(dsn, job_id, actor=actor, owner=WORKERS).start_distributed()
    for slice_no in slices:
        run_slice.apply_async((job_id, slice_no))
    return slices
