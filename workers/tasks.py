"""Tasks: thin adapters from Celery to the core. Retries live in the core, not here.

``backfill.run_slice(job_id, slice_no, seq)`` works on one slice for a time budget under its
lease, then sends the slice's next task (or stops: the job was paused, throttled or ended).
``seq`` is the slice's dispatch token: a task whose slice was re-dispatched since it was sent
is dropped before it takes the lease.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import psycopg
from celery.signals import worker_init, worker_ready, worker_shutdown
from kombu.exceptions import OperationalError as KombuOperationalError

from backfill.core.db import connect, redact_dsn
from backfill.core.errors import BackfillError, BrokerMisconfigured, BrokerUnavailable, TasksNotSent
from backfill.core.logs import get_logger
from backfill.engine.reaper import ReaperLoop, reap
from backfill.engine.runner import WORKERS_OWNER, Runner
from backfill.safety.preflight import first_write_gate
from backfill.state import leases
from backfill.state.schema import check_schema
from workers.app import DISPATCH_STALE_S, LEASE_TTL_FLOOR_S, REAP_EVERY_S, SLICE_BUDGET_S, app

log = get_logger(component="worker")
WORKERS = WORKERS_OWNER
_reaper_stop = threading.Event()


def _dsn() -> str:
    dsn = os.environ.get("BACKFILL_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise RuntimeError("set BACKFILL_DSN for the worker")
    return dsn


@worker_init.connect
def _check_schema(**_: object) -> None:
    """Refuse to start against a missing or mismatched state schema. Celery logs and ignores
    exceptions from signal handlers, so this exits the process itself."""
    try:
        check_schema(_dsn())
    except (BackfillError, RuntimeError, psycopg.Error) as exc:
        log.critical("worker.refused", error=str(exc))
        print(f"backfill worker refuses to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    """Every worker runs a reaper thread; an advisory lock lets one work at a time."""
    if REAP_EVERY_S > 0:
        actor = f"reaper:{socket.gethostname()}:{os.getpid()}"
        ReaperLoop(_dsn(), actor=actor, send=send, gate=first_write_gate(_dsn(), actor),
                   every_s=REAP_EVERY_S, stale_after_s=DISPATCH_STALE_S,
                   stop=_reaper_stop).start()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    _reaper_stop.set()


@app.task(name="backfill.run_slice")
def run_slice(job_id: int, slice_no: int, seq: int | None = None) -> str:
    """Work on one slice for a time budget, then send its next task (or stop)."""
    if seq is None:  # sent by a backfill from before dispatch tokens: the reaper replaces it
        log.warning("task.dropped", job_id=job_id, slice=slice_no, reason="no dispatch token")
        return "stale"
    owner = f"worker:{socket.gethostname()}:{os.getpid()}"
    runner = Runner(_dsn(), job_id, actor=owner, owner=owner, lease_ttl_floor_s=LEASE_TTL_FLOOR_S,
                    dispatch_stale_s=DISPATCH_STALE_S)
    try:
        outcome = runner.run_slice(slice_no, seq=seq, budget_s=SLICE_BUDGET_S, send=send)
    except BackfillError as exc:  # an unknown or ended job: drop the task, write nothing
        log.warning("task.dropped", job_id=job_id, slice=slice_no, error=str(exc))
        return "dropped"
    log.info("task.done", job_id=job_id, slice=slice_no, seq=seq, outcome=outcome)
    return outcome


def send(claims: list[leases.Dispatch]) -> list[leases.Dispatch]:
    """Send a task per claim. A claim the broker refuses is parked (the slice waits with no
    task queued) so the next reaper pass sends it once the broker is back; returns those."""
    failed: list[leases.Dispatch] = []
    for d in claims:
        try:
            run_slice.apply_async((d.job_id, d.slice_no, d.seq))
        except Exception as exc:  # kombu/redis raise many types; all mean "not sent"
            log.warning("task.not_sent", job_id=d.job_id, slice=d.slice_no, error=str(exc))
            failed.append(d)
    if failed:
        try:
            conn = connect(_dsn())
            try:
                for d in failed:
                    leases.park(conn, d)
            finally:
                conn.close()
        except Exception as exc:  # the dispatch goes stale and is re-sent anyway
            log.warning("task.park_failed", error=str(exc))
    return failed


def _broker_setup_error(exc: Exception) -> BrokerMisconfigured:
    url = redact_dsn(app.conf.broker_url)
    if isinstance(exc, ImportError):
        return BrokerMisconfigured(
            f"the broker client for {url} cannot be loaded: a module it needs is missing "
            f"({exc}); install backfill with its dependencies (pip install backfill, which "
            "brings celery[redis])")
    return BrokerMisconfigured(f"the broker URL {url} cannot be used ({type(exc).__name__}: "
                               f"{exc}); fix BACKFILL_BROKER_URL")


def check_broker_setup() -> None:
    """Raise :class:`BrokerMisconfigured` unless the broker's transport loads (no network)."""
    try:
        with app.connection_for_write() as conn:
            _ = conn.transport
    except (KombuOperationalError, OSError):
        return  # network trouble is for the worker's own connection retries
    except Exception as exc:  # a missing module, an unknown transport, a malformed URL
        raise _broker_setup_error(exc) from exc


def check_broker() -> None:
    """Raise :class:`BrokerUnavailable` unless the broker answers within a few seconds, or
    :class:`BrokerMisconfigured` if the broker client cannot even be set up (a missing module,
    a malformed URL): only connection errors are reported as an unreachable broker."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except (KombuOperationalError, OSError) as exc:  # kombu wraps the transport's connection errors
        raise BrokerUnavailable(
            f"the broker at {redact_dsn(app.conf.broker_url)} is unreachable ({exc}); "
            "start it (or set BACKFILL_BROKER_URL) and try again") from exc
    except Exception as exc:
        raise _broker_setup_error(exc) from exc


def dispatch(dsn: str, job_id: int, *, actor: str) -> list[leases.Dispatch]:
    """Start (or resume, or re-send) a job on the workers: one task per slice that needs one,
    up to its parallelism. Refuses, changing nothing, when the broker is unreachable."""
    check_broker()
    claims = Runner(dsn, job_id, actor=actor, owner=WORKERS).start_distributed(
        gate=first_write_gate(dsn, actor))
    failed = send(claims)
    if failed:
        raise TasksNotSent(
            f"job {job_id} runs on the workers, but {len(failed)} of its task(s) could not be "
            "sent (the broker went away); the workers' reaper sends them when it is back")
    return claims


def reap_once(dsn: str, *, actor: str) -> list[leases.Dispatch]:
    """One reaper pass from the command line (the workers also run one on their own)."""
    check_broker()
    return reap(dsn, actor=actor, send=send, gate=first_write_gate(dsn, actor),
                stale_after_s=DISPATCH_STALE_S)
