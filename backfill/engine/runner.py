"""The inline runner: executes a job's batches in this process, no broker needed.

It owns the job while it runs (``owner`` + heartbeat in the state store), re-reads the job's
state and options between batches (so pause, cancel and tune from another process take effect
on the next batch), retries transient errors with tenacity by error class, and checkpoints each
batch in the batch's own transaction.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from backfill.core.catalog import Conn
from backfill.core.db import canonical_text, connect, redact_text
from backfill.core.errors import (
    BackfillError,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidInput,
    JobConflict,
    JobNotFound,
    LeaseLost,
)
from backfill.core.logs import get_logger
from backfill.engine import slicing
from backfill.engine.batch import BatchResult, run_batch
from backfill.engine.canary import verify_canary
from backfill.engine.keyset import Key, KeyCodec, render_key
from backfill.engine.kinds import PreparedJob
from backfill.engine.prepare import prepare_stored
from backfill.engine.retry import Verdict, classify, describe_error
from backfill.engine.sources import Source, source_for
from backfill.engine.throttle import BatchSizer, rate_delay
from backfill.job.options import JobOptions
from backfill.job.spec import source_engine
from backfill.job.states import TERMINAL, JobState
from backfill.state import checkpoints, leases, store
from backfill.state.schema import require_current

S = JobState
T = TypeVar("T")
HEARTBEAT_EVERY_S = 2.0
PRUNE_EVERY_BATCHES = 500
#: A slice with fewer rows left than this is not worth splitting for a free slot.
SPLIT_MIN_ROWS = 10_000
#: Seconds of recent batches the live rows/s is computed over.
RATE_WINDOW_S = 10.0


#: The owner recorded on jobs run by the workers (no single process owns them).
WORKERS_OWNER = "workers"


def default_owner() -> str:
    return f"runner:{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str) -> bool | None:
    """Whether a runner on this host is alive; ``None`` when we cannot tell (another host)."""
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != "runner" or parts[1] != socket.gethostname():
        return None
    try:
        pid = int(parts[2])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return None
    return True


@dataclass(frozen=True)
class Tick:
    """What a progress display needs after each batch."""

    job: store.JobRecord
    batch: BatchResult | None
    batch_size: int
    rows_scanned: int
    rows_affected: int
    rows_per_s: float | None
    state: JobState
    note: str | None = None


#: Called before a job's first write on the workers, with the runner's connection; raises to
#: refuse (the pre-flight checks: the layer that starts the workers hands them in).
Gate = Callable[[Conn, store.JobRecord], None]


class Runner:
    """Run one job inline until it succeeds, fails, is paused or cancelled, or ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        job_id: int,
        *,
        actor: str,
        owner: str | None = None,
        stop: threading.Event | None = None,
        on_tick: Callable[[Tick], None] | None = None,
        takeover_after_s: float = 30.0,
        poll_interval_s: float = 1.0,
        reconnect_timeout_s: float = 120.0,
        lease_ttl_floor_s: float = 60.0,
        dispatch_stale_s: float = 120.0,
    ) -> None:
        self.dsn = dsn
        self.job_id = job_id
        self.actor = actor
        self.owner = owner or default_owner()
        self.stop = stop or threading.Event()
        self.on_tick = on_tick
        self.takeover_after_s = takeover_after_s
        self.poll_interval_s = poll_interval_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.lease_ttl_floor_s = lease_ttl_floor_s
        self.dispatch_stale_s = dispatch_stale_s
        self._send: Callable[[list[leases.Dispatch]], None] | None = None
        self._shares: tuple[float | None, float | None] = (None, None)
        self._split_tried = False
        self.log = get_logger(job_id=job_id)
        self._conn: Conn | None = None
        self._src: Conn | None = None
        self._foreign: Any = None   # a MySQL job's source (holds its own connection)
        self._canonical = False   # cross-database jobs: see db.canonical_text
        self._retry_notes: list[dict[str, Any]] = []
        self._scanned = 0
        self._affected = 0
        self._lease: leases.Lease | None = None
        self._options = JobOptions()
        self._worker = False  # distributed mode: one slice, no job-level ownership
        self._deadline: float | None = None
        self._yielded = False
        #: When this chain's next batch is due (monotonic), owed by the last batch of a slice:
        #: inline, the next slice's first batch waits for it (see _run_slice).
        self._due: float | None = None
        self._window: list[tuple[float, int]] = []  # (monotonic end, rows) of recent batches
        self._batches = 0
        self._last_heartbeat = time.monotonic()
        self._options_version = 0

    # -- connection ---------------------------------------------------------------------

    @property
    def conn(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = connect(self.dsn, application_name=f"backfill job {self.job_id}")
            # A runner never waits inside a transaction for long; if it hangs there (a stuck
            # transform, a frozen process), the server ends it instead of holding row locks.
            self._conn.execute("SET idle_in_transaction_session_timeout = '5min'")
            if self._canonical:
                canonical_text(self._conn)
        return self._conn

    def _read(self, prepared: PreparedJob) -> Conn:
        """Where keyset probes and reads go: the job's own connection, or for a
        cross-database copy one to its source (reopened after a drop)."""
        if not prepared.remote:
            return self.conn
        src = self._src
        if src is None or src.closed or src.broken:
            if src is not None:
                src.close()
            assert prepared.spec.source_dsn is not None
            src = self._src = connect(prepared.spec.source_dsn,
                                      application_name=f"backfill job {self.job_id} source")
            # No transaction left open there (each batch's read is bounded by the job's
            # statement timeout, see copy_remote); COPY text the destination reads the same.
            src.execute("SET idle_in_transaction_session_timeout = '5min'")
            canonical_text(src)
        return src

    def _source(self, prepared: PreparedJob) -> Source:
        """A cross-database job's source (:mod:`backfill.engine.sources`): its PostgreSQL
        database on :meth:`_read`'s connection, or the MySQL table prepared with the job."""
        if prepared.foreign is not None and prepared.foreign is not self._foreign:
            if self._foreign is not None:
                self._foreign.close()
            self._foreign = prepared.foreign
        return source_for(prepared, lambda: self._read(prepared))

    def _drop_conn(self) -> None:
        if self._foreign is not None:
            self._foreign.close()
            self._foreign = None
        if self._src is not None:
            self._src.close()
            self._src = None
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> store.JobRecord:
        try:
            require_current(self.conn)
            job = self._acquire()
            if job.state not in (S.RUNNING, S.THROTTLED):
                return job
            try:
                prepared = self._prepare(job, explain=False)
                job = self._ensure_slices(job, prepared)
            except _TRANSIENT:
                raise
            except BackfillError as exc:
                # Its table, key or source can no longer be read as planned: the job cannot
                # go on, and must not be left "running" under an owner that has gone.
                self._fail_at_start(job, exc)
                raise
            if job.state not in (S.RUNNING, S.THROTTLED):
                return job
            return self._loop(job, prepared)
        finally:
            self._drop_conn()

    def _fail_at_start(self, job: store.JobRecord, exc: BackfillError) -> None:
        error = describe_error(exc)
        self.log.error("job.failed", error=error, at="start")
        self._drop_conn()
        try:
            self._db(lambda: self._end(job.id, S.FAILED, reason=f"cannot start: {error}",
                                       error=(error, None)))
        except (BackfillError, psycopg.Error) as end_exc:   # the original error is the news
            self.log.warning("job.not_failed", error=redact_text(str(end_exc)))

    # -- distributed mode (the Celery tasks call these; no Celery here) ---------------------

    def start_distributed(self, *, gate: Gate | None,
                          replace_queued: bool = True) -> list[leases.Dispatch]:
        """Make the job run on the workers (snapshot and slices on the first start) and claim
        the slices that need a task, up to its parallelism; the caller sends them. Dispatching
        a running job again (``replace_queued``) replaces tasks that were lost: each claimed
        slice gets a new ``dispatch_seq``, so a leftover task is dropped, and leases keep two
        workers off one slice. ``gate`` runs before the job's first write (the pre-flight
        checks; ``None`` only where the caller has run them or means to skip them)."""
        try:
            require_current(self.conn)
            job = store.get_job(self.conn, self.job_id)
            if job.state == S.PAUSED:
                job = store.transition(self.conn, job.id, S.PENDING, actor=self.actor,
                                       reason="resumed by dispatch", expect=frozenset({S.PAUSED}))
            if job.state in (S.RUNNING, S.THROTTLED) and job.runs_on != "workers":
                raise JobConflict(
                    f"job {job.id} is {job.state} inline under {job.owner}; pause it first, "
                    "then dispatch it to the workers")
            if job.state == S.PENDING:
                self._prepare(job, explain=True)
                if job.started_at is None and gate is not None:
                    gate(self.conn, job)
                with self.conn.transaction():
                    leases.set_runs_on(self.conn, job.id, "workers")
                    job = store.transition(self.conn, job.id, S.RUNNING, actor=self.actor,
                                           reason="dispatched to workers", set_owner=self.owner,
                                           expect=frozenset({S.PENDING}))
            if job.state not in (S.RUNNING, S.THROTTLED):
                raise IllegalTransition(f"job {job.id} is {job.state}: nothing to dispatch")
            prepared = self._prepare(job, explain=False)
            job = self._ensure_slices(job, prepared)
            if job.state == S.RUNNING and all(s.done for s in leases.slices(self.conn, job.id)):
                # The task that finished the last slice died before it could end the job.
                self._worker = True
                self._finish(job)
                return []
            return leases.claim_dispatch(self.conn, job.id, stale_after_s=self.dispatch_stale_s,
                                        actor=self.actor, replace_queued=replace_queued)
        finally:
            self._drop_conn()

    def run_slice(self, slice_no: int, *, seq: int, budget_s: float,
                  send: Callable[[list[leases.Dispatch]], None]) -> str:
        """Work on one slice for up to ``budget_s`` seconds under its lease, as the task
        carrying ``seq``; ``send`` sends tasks (the next one of this slice, and slices that
        can use a free slot). Returns ``more`` (budget used, next task sent), ``done``,
        ``stopped`` (the job is paused, throttled, cancelled or ended: the slot goes back and
        the slice waits, parked), ``stale`` (a replacement task exists), ``busy`` (another
        live lease holder, or the lease was lost) or ``full`` (parallelism used up: parked)."""
        self._worker = True
        self._send = send
        try:
            require_current(self.conn)
            job = store.get_job(self.conn, self.job_id)
            if job.state != S.RUNNING:
                # Parked: once the job runs again, the reaper sends it at once.
                leases.park(self.conn, leases.Dispatch(job.id, slice_no, seq))
                return "stopped"
            prepared = self._prepare(job, explain=False)
            codec = KeyCodec(prepared.key_types)
            self._start_loop(job)
            ttl = self._lease_ttl(self._options)
            got = self._db(lambda: leases.acquire_for_task(
                self.conn, job.id, slice_no, seq, self.owner, ttl, actor=self.owner))
            if isinstance(got, str):
                return got
            lease = self._lease = got
            self._deadline = time.monotonic() + budget_s
            next_seq: int | None = None
            try:
                leased = self._db(self._slice_reader(job.id, slice_no))
                result = None if leased.done else self._run_slice(job, prepared, leased, lease,
                                                                  codec)
                if result is None and self._yielded:
                    next_seq = self._db(lambda: leases.requeue(self.conn, lease))
            finally:
                self._lease = None
                self._deadline = None
                if next_seq is None:
                    self._release(lease)
            if result is not None:
                return "stopped"
            if self._yielded:
                if next_seq is None:
                    return "busy"  # the lease was lost; its new holder goes on
                send([leases.Dispatch(job.id, slice_no, next_seq)])
                return "more"
            if not self._db(self._slice_reader(job.id, slice_no)).done:
                return "busy"  # the lease was lost
            self._db(lambda: self._finish(job))
            self._db(lambda: self._hand_off(job.id))
            return "done"
        finally:
            self._drop_conn()

    def _hand_off(self, job_id: int) -> None:
        """A slot is free (a slice finished or was split): send tasks for waiting slices."""
        claims = leases.claim_dispatch(self.conn, job_id, stale_after_s=self.dispatch_stale_s,
                                      actor=self.owner)
        if claims and self._send is not None:
            self._send(claims)

    def _maybe_split(self, job: store.JobRecord, prepared: PreparedJob, lease: leases.Lease,
                     cursor: Key | None, upper: Key, codec: KeyCodec, batch_size: int) -> None:
        """Rebalance: when the job has a free slot and this slice has the most rows left, cut
        it in two. Sets ``_split_tried`` before writing: the caller then re-reads its bound
        and sends the new slice."""
        left = leases.split_candidate(self.conn, job.id, lease.slice_no,
                                     min_rows=max(4 * batch_size, SPLIT_MIN_ROWS))
        if left is None:
            return
        try:
            with self.conn.transaction():
                self.conn.execute("SET LOCAL statement_timeout = '30s'")
                cut = slicing.split_point(self.conn, prepared.keyset, cursor, upper, left)
        except psycopg.Error as exc:
            if _connection_trouble(exc) and (self.conn.broken or self.conn.closed):
                raise  # reconnect and retry
            self.log.warning("slice.split_skipped", slice=lease.slice_no,
                             error=describe_error(exc))
            return
        if cut is None:
            return
        self._split_tried = True
        new_no = leases.split_slice(self.conn, lease, cursor=codec.encode(cursor),
                                   upper=codec.encode(upper) or [], cut=codec.encode(cut) or [],
                                   rows_left=left, actor=self.owner)
        if new_no is not None:
            self.log.info("slice.split", slice=lease.slice_no, new_slice=new_no,
                          cut=render_key(cut))

    def _acquire(self) -> store.JobRecord:
        conn = self.conn
        job = store.get_job(conn, self.job_id)
        if job.state in TERMINAL:
            raise IllegalTransition(f"job {job.id} is {job.state}: nothing to run")
        if job.state == S.FAILED:
            raise IllegalTransition(
                f"job {job.id} failed ({job.last_error}); `backfill retry {job.id}` moves it "
                "back to pending, then run it again"
            )
        if job.state == S.PAUSED:
            job = store.transition(conn, job.id, S.PENDING, actor=self.actor,
                                   reason="resumed by run", expect=frozenset({S.PAUSED}))
        if job.state == S.AWAITING_APPROVAL:
            # Only `approve` (or auto-approval) lets the rest run. A canary whose verifier
            # died before it wrote its verdict is verified now.
            report = checkpoints.canary_report(conn, job.id)
            if report is not None and report.get("verified") is None:
                verify_canary(conn, job.id, actor=self.actor)
                job = store.get_job(conn, job.id)
            return job
        if job.state == S.PENDING:
            # Check the job again against today's catalog before the first write.
            self._prepare(job, explain=True)
            with conn.transaction():
                if job.runs_on != "inline":
                    leases.set_runs_on(conn, job.id, "inline")  # the reaper leaves it alone
                return store.transition(conn, job.id, S.RUNNING, actor=self.actor,
                                        reason="started by inline runner", set_owner=self.owner,
                                        expect=frozenset({S.PENDING}))
        if job.runs_on == "workers":
            raise JobConflict(
                f"job {job.id} is {job.state} on the workers; pause it first to run it inline")
        # running or throttled: someone owns it, or owned it and died.
        if job.owner and job.owner != self.owner:
            alive = _owner_alive(job.owner)
            age = self._heartbeat_age(job)
            # A runner heartbeats between batches, so one slow batch (up to the statement
            # timeout, plus retries' backoff) must not look like a dead runner.
            patience = max(self.takeover_after_s,
                           2 * job.options.statement_timeout_ms / 1000.0 + 10.0)
            stale = age is None or age > patience
            if alive is True or (alive is None and not stale):
                raise JobConflict(
                    f"job {job.id} is {job.state} under {job.owner} (heartbeat "
                    f"{age:.0f}s ago); pause it first, or wait {patience:.0f}s "
                    "after that runner died"
                    if age is not None else f"job {job.id} is owned by {job.owner}"
                )
            if alive is False:
                reason = "previous runner process is gone"
            elif age is None:
                reason = "previous runner never sent a heartbeat"
            else:
                reason = f"previous runner's heartbeat is {age:.0f}s old"
            store.take_over(conn, job.id, self.owner, actor=self.actor, reason=reason,
                            expected_owner=job.owner)
            self.log.warning("job.takeover", previous_owner=job.owner, reason=reason)
        elif not job.owner:
            store.take_over(conn, job.id, self.owner, actor=self.actor,
                            reason="job had no owner", expected_owner=None)
        return store.get_job(conn, job.id)

    def _prepare(self, job: store.JobRecord, *, explain: bool) -> PreparedJob:
        """Bind the job to the table and key it was enqueued on, and refuse if they changed:
        a dropped and recreated table, another search_path, or a new key must not silently
        reuse the cursor."""
        if source_engine(job.spec.source_dsn) == "mysql":
            if self._worker:
                raise InvalidInput(f"job {job.id} copies from MySQL/MariaDB: it runs inline "
                                   "(`backfill run`), not on the workers")
            return prepare_stored(self.conn, job, explain=explain)
        if job.spec.source_dsn is not None:
            if not self._canonical:
                self._canonical = True
                canonical_text(self.conn)
            if self._worker:
                raise InvalidInput(f"job {job.id} copies from another database: it runs "
                                   "inline (`backfill run`), not on the workers")
            src = connect(job.spec.source_dsn, application_name=f"backfill job {job.id} source")
            try:
                return prepare_stored(self.conn, job, explain=explain, source=src)
            finally:
                src.close()
        return prepare_stored(self.conn, job, explain=explain)

    def _heartbeat_age(self, job: store.JobRecord) -> float | None:
        if job.heartbeat_at is None:
            return None
        row = self.conn.execute("SELECT extract(epoch FROM now() - %s)", (job.heartbeat_at,)).fetchone()
        return float(row[0]) if row else None

    def _ensure_slices(self, job: store.JobRecord, prepared: PreparedJob) -> store.JobRecord:
        """Snapshot the range's upper bound (once, at the first start) as the job's one slice."""
        conn = self.conn
        if leases.slices(conn, job.id):
            return job
        codec = KeyCodec(prepared.key_types)
        with conn.transaction():
            job = store.get_job(conn, job.id, for_update=True)  # tune may have changed options
            if leases.slices(conn, job.id):
                return job
            source = self._source(prepared) if prepared.remote else None
            if source is not None:
                # Before the range's read: a MySQL source's binlog position, from which the
                # catch-up replays every change the batches may not have seen.
                warning = source.begin(conn, job.id)
                if warning:
                    store.add_event(conn, job.id, "warning", actor=self.owner,
                                    reason=f"no catch-up position recorded: {warning}")
            upper = (source.max_key() if source is not None
                     else prepared.keyset.max_key(self.conn))
            estimate = prepared.table.rows_estimate
            if upper is None:
                estimate = 0
            elif estimate is None or estimate < 100_000:
                estimate = self._count(prepared)
            store.set_rows_estimate(conn, job.id, estimate)
            if upper is None:
                store.add_event(conn, job.id, "info", actor=self.owner,
                                reason="source table is empty: nothing to do")
            else:
                # Bounded: the count above may have left a 10 s SET LOCAL in this transaction.
                conn.execute("SET LOCAL statement_timeout = '5min'")
                cuts = (source.boundaries(upper, job.options.parallelism, estimate)
                        if source is not None else
                        slicing.boundaries(self.conn, prepared.keyset, upper,
                                           job.options.parallelism, estimate))
                lowers: list[Key | None] = [None, *cuts]
                uppers: list[Key] = [*cuts, upper]
                leases.create_slices(
                    conn, job.id,
                    [(codec.encode(lo), codec.encode(hi) or []) for lo, hi in zip(lowers, uppers,
                                                                                  strict=True)],
                    job.options.batch_size, estimate)
                store.add_event(conn, job.id, "snapshot", actor=self.owner,
                                reason=f"range snapshotted in {len(uppers)} slice(s)",
                                details={"upper": codec.encode(upper), "rows_estimate": estimate,
                                         "boundaries": [codec.encode(c) for c in cuts]})
        if upper is None:
            return store.transition(conn, job.id, S.SUCCEEDED, actor=self.owner,
                                    reason="source table is empty", clear_owner=True)
        return store.get_job(conn, job.id)

    def _count(self, prepared: PreparedJob) -> int | None:
        """Exact row count for small or never-analyzed tables, bounded by a timeout."""
        if prepared.remote:
            return self._source(prepared).count()
        read = self.conn
        try:
            with read.transaction():
                read.execute("SET LOCAL statement_timeout = '10s'")
                row = read.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(prepared.keyset.table)
                ).fetchone()
        except pgerrors.QueryCanceled:
            return None
        return int(row[0]) if row else 0

    # -- the batch loop -----------------------------------------------------------------

    def _loop(self, job: store.JobRecord, prepared: PreparedJob) -> store.JobRecord:
        codec = KeyCodec(prepared.key_types)
        self._start_loop(job)
        prog = checkpoints.progress(self.conn, job.id)
        self._scanned, self._affected = prog.rows_scanned, prog.rows_affected
        for slc in leases.slices(self.conn, job.id):
            if slc.done:
                continue
            self._wait_due(job.id)
            lease = self._db(functools.partial(
                self._acquire_lease, job.id, slc.slice_no, self._lease_ttl(self._options)))
            if lease is None:  # finished meanwhile
                continue
            self._lease = lease
            try:
                leased = self._db(self._slice_reader(job.id, slc.slice_no))  # as of the lease
                result = self._run_slice(job, prepared, leased, lease, codec)
            finally:
                self._lease = None
                self._release(lease)
            if result is not None:
                return result
        return self._db(lambda: self._finish(job))

    def _start_loop(self, job: store.JobRecord) -> None:
        """Options, counters, heartbeat clock and rate window for a run of batches."""
        self._options, self._options_version = job.options, job.options_version
        self._shares = (job.rate_share, job.batch_rate_share)
        self._batches = 0
        self._last_heartbeat = time.monotonic()
        self._window = []

    def _lease_ttl(self, options: JobOptions) -> float:
        # Renewed with every heartbeat; it must outlive the longest batch (plus backoff).
        return max(self.lease_ttl_floor_s, 2 * options.statement_timeout_ms / 1000.0 + 10.0)

    def _acquire_lease(self, job_id: int, slice_no: int, ttl: float) -> leases.Lease | None:
        # The inline runner owns the whole job (one owner at a time, see _acquire), so any other
        # holder of one of its slice leases is a runner it replaced: take the lease (an event
        # records it), and let the fencing token refuse that runner's late checkpoints.
        return leases.acquire_lease(self.conn, job_id, slice_no, self.owner, ttl, actor=self.owner,
                                   steal=not self._worker)

    def _renew_lease(self, lease: leases.Lease, ttl: float) -> bool:
        return leases.renew_lease(self.conn, lease, ttl)

    def _renew_current_lease(self) -> None:
        """Best effort, between attempts: a failure here is handled by the next checkpoint."""
        lease = self._lease
        if lease is None or self._conn is None or self._conn.broken or self._conn.closed:
            return
        with contextlib.suppress(psycopg.Error):
            leases.renew_lease(self.conn, lease, self._lease_ttl(self._options))

    def _release(self, lease: leases.Lease) -> None:
        try:
            if self._conn is not None and not self._conn.broken:
                leases.release_lease(self.conn, lease)
        except psycopg.Error:  # the lease expires by itself
            self.log.warning("lease.release_failed", slice=lease.slice_no)

    def _run_slice(self, job: store.JobRecord, prepared: PreparedJob, slc: leases.SliceRecord,
                   lease: leases.Lease, codec: KeyCodec) -> store.JobRecord | None:
        """Batches of one leased slice until it is done (``None``), its lease is lost
        (``None``), or the job stops (the job record)."""
        options, options_version = self._options, self._options_version
        upper = codec.decode(slc.upper_bound)
        assert upper is not None
        cursor = codec.decode(slc.cursor)
        sizer = BatchSizer(size=slc.batch_size or options.batch_size,
                           rate=self._slot_rate(options))
        sizer.clamp(options)
        status: tuple[JobState, int, str | None] | None = None
        while True:
            # Control: a stop request; the state and options others changed (they come back
            # with each checkpoint); the heartbeat, and a full re-read, every few seconds.
            if self.stop.is_set():
                return self._pause_on_stop()
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                self._yielded = True  # give the worker slot back; the task re-dispatches
                return None
            if status is None or now - self._last_heartbeat >= HEARTBEAT_EVERY_S:
                status = self._db(functools.partial(self._status, job.id, heartbeat=True))
                if status is None:
                    return self._lost_ownership(
                        self._db(lambda: store.get_job(self.conn, job.id)))
                if not self._db(functools.partial(
                        self._renew_lease, lease, self._lease_ttl(options))):
                    self.log.warning("lease.lost", slice=lease.slice_no)
                    return None
                self._last_heartbeat = now
                self._split_tried = False
                if self._worker and status[0] == S.RUNNING:
                    self._db(functools.partial(self._maybe_split, job, prepared, lease, cursor,
                                               upper, codec, sizer.size))
                if self._split_tried:
                    # The stored bound is the truth: an attempt whose COMMIT was lost in a
                    # reconnect may have split, whatever the retry then decided.
                    stored = self._db(self._slice_reader(job.id, lease.slice_no))
                    if stored.lease_token != lease.token or stored.done:
                        return None
                    bound = codec.decode(stored.upper_bound)
                    assert bound is not None
                    if bound != upper:
                        upper = bound
                        self._db(lambda: self._hand_off(job.id))
            state, version, reason = status
            if state == S.THROTTLED and self._worker:
                return self._db(lambda: store.get_job(self.conn, job.id))
            if state == S.THROTTLED:
                self._tick(job, None, sizer.size, self._window, state, note=reason)
                self._sleep(self.poll_interval_s)
                status = None
                continue
            if state != S.RUNNING:
                self.log.info("job.stopped", state=str(state), reason=reason)
                if not self._worker:
                    self._db(lambda: store.release(self.conn, job.id, self.owner))
                return self._db(lambda: store.get_job(self.conn, job.id))
            if version != options_version:
                fresh = self._db(lambda: store.get_job(self.conn, job.id))
                if fresh.options.batch_size != options.batch_size:
                    sizer.size = fresh.options.batch_size
                options, options_version = fresh.options, fresh.options_version
                self._options, self._options_version = options, options_version
                self._shares = (fresh.rate_share, fresh.batch_rate_share)
                sizer.rate = self._slot_rate(options)
                sizer.clamp(options)
                self.log.info("job.tuned", options=options.to_json())

            outcome = self._batch_with_retry(job, prepared, slc.slice_no, cursor, upper,
                                             sizer, options, codec, lease.token)
            if isinstance(outcome, store.JobRecord):
                return outcome
            if outcome is None:
                # Someone else advanced the slice or the state changed: re-read and go on.
                status = None
                fresh_slice = self._db(self._slice_reader(job.id, slc.slice_no))
                cursor = codec.decode(fresh_slice.cursor)
                if fresh_slice.done or fresh_slice.lease_token != lease.token:
                    return None  # finished, or taken over: its new holder goes on
                continue
            cursor = outcome.upper
            status = (outcome.job_state, outcome.options_version, reason)
            if outcome.job_state != S.RUNNING:
                status = None  # throttled meanwhile: read the reason
            self._scanned += outcome.rows_scanned
            self._affected += outcome.rows_affected
            self._batches += 1
            if self._batches % PRUNE_EVERY_BATCHES == 0:
                self._db(lambda: checkpoints.prune_batches(self.conn, job.id))
            end = time.monotonic()
            window = self._window
            window.append((end, outcome.rows_scanned))
            while window and window[0][0] < end - RATE_WINDOW_S:
                window.pop(0)
            self._tick(job, outcome, sizer.size, window, S.RUNNING)
            if outcome.canary_reached:
                self._db(lambda: self._verify_canary(job))
            self.log.debug("batch.done", batch_id=outcome.batch_id, slice=slc.slice_no,
                           lower=render_key(outcome.lower), upper=render_key(outcome.upper),
                           rows=outcome.rows_scanned, affected=outcome.rows_affected,
                           ms=round(outcome.duration_ms, 1), next_size=sizer.size,
                           app_waiters=outcome.waits.sessions if outcome.waits else None)
            delay = self._delay_after(outcome.rows_scanned, outcome.duration_ms / 1000.0,
                                      options)
            if outcome.done:
                # The pacing of the slice's last batch is owed by the chain's next batch (the
                # next slice's, inline), not dropped: else each slice end ran one batch unpaced
                # and --rate on one-batch slices was not a cap at all.
                self._due = time.monotonic() + delay
                return None
            if delay > 0:
                self._pace(job.id, delay)
        return None

    def _slots(self, options: JobOptions) -> int:
        return max(1, options.parallelism) if self._worker else 1

    def _slot_rate(self, options: JobOptions) -> float | None:
        """Rows/s this chain of batches may do: the job's --rate and its share of the
        controller's rows budget, split among the job's slots on the workers (--rate is the
        job's, not each slot's)."""
        rows_share, _ = self._shares
        slots = self._slots(options)
        rate = options.rate_limit / slots if options.rate_limit else None
        if rows_share:
            rate = min(rate, rows_share / slots) if rate else rows_share / slots
        return rate

    def _delay_after(self, rows: int, seconds: float, options: JobOptions) -> float:
        """Seconds to wait after a batch: the job's own rate limit and pause, and its share of
        the controller's global budgets (split among the job's slots on the workers)."""
        _, batches_share = self._shares
        delay = rate_delay(rows, seconds, self._slot_rate(options))
        if batches_share:
            delay = max(delay, self._slots(options) / batches_share - seconds)
        return delay + options.pause_ms / 1000.0

    def _wait_due(self, job_id: int) -> None:
        """Before another slice of an inline run: wait out what the last batch's pacing
        still asks for (:attr:`_due`)."""
        due, self._due = self._due, None
        if due is not None and due > time.monotonic():
            self._pace(job_id, due - time.monotonic())

    def _pace(self, job_id: int, delay: float) -> None:
        """Sleep ``delay`` seconds between batches, keeping the heartbeat fresh and waking
        early for Ctrl-C or a change of state (a long rate-limit wait must not look dead)."""
        deadline = time.monotonic() + delay
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._sleep(min(left, HEARTBEAT_EVERY_S))
            if deadline - time.monotonic() > 0:
                status = self._db(functools.partial(self._status, job_id, heartbeat=True))
                if status is None or status[0] != S.RUNNING:
                    return
                self._renew_current_lease()

    def _slice_reader(self, job_id: int, slice_no: int) -> Callable[[], leases.SliceRecord]:
        return lambda: leases.get_slice(self.conn, job_id, slice_no)

    def _status(self, job_id: int, *, heartbeat: bool) -> tuple[JobState, int, str | None] | None:
        """State, options version and reason; ``None`` when this runner no longer owns the job."""
        if heartbeat and not self._worker:
            return store.heartbeat(self.conn, job_id, self.owner)
        state, version, reason, owner = store.job_status(self.conn, job_id)
        if self._worker:
            return state, version, reason
        return (state, version, reason) if owner == self.owner else None

    def _db(self, fn: Callable[[], T]) -> T:
        """Run a state-store call, riding out a lost connection or a restarting server."""
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            note = {"attempt": state.attempt_number, "verdict": "reconnect",
                    "error": describe_error(exc) if exc else "unknown"}
            self._retry_notes.append(note)  # recorded as an event once the database is back
            self.log.warning("db.retry", **note)
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._drop_conn()

        retrying = Retrying(
            retry=retry_if_exception(_connection_trouble),
            stop=stop_after_delay(self.reconnect_timeout_s) | stop_when_event_set(self.stop),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(fn)

    def _batch_with_retry(
        self,
        job: store.JobRecord,
        prepared: PreparedJob,
        slice_no: int,
        cursor: Key | None,
        upper: Key,
        sizer: BatchSizer,
        options: JobOptions,
        codec: KeyCodec,
        lease_token: int,
    ) -> BatchResult | store.JobRecord | None:
        """A batch, retried on transient errors; ``None`` if the checkpoint was refused;
        a job record when the job ended (failed)."""
        attempts = 0
        start_cursor = codec.encode(cursor)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is None:
                return
            verdict = classify(exc)
            note = {"attempt": state.attempt_number, "error": describe_error(exc),
                    "verdict": verdict.value, "batch_size": sizer.size,
                    "slice": slice_no, "cursor": start_cursor}
            if verdict is Verdict.SHRINK:
                note["new_batch_size"] = sizer.shrink(options)
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and (
                self._conn is None or self._conn.broken or self._conn.closed
            ):
                self._drop_conn()
            self._retry_notes.append(note)
            self.log.warning("batch.retry", **note)
            self._renew_current_lease()  # backoff can outlast the lease

        def attempt() -> BatchResult:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                # The last attempt may have committed before the connection dropped: the
                # state store, not memory, says where the slice is.
                fresh = leases.get_slice(self.conn, job.id, slice_no)
                if codec.encode(cursor) != fresh.cursor or fresh.done:
                    raise _SliceMoved
            size = sizer.size
            if job.canary_rows is not None and job.approved_at is None:
                # The canary's last batch stops at the canary (the job-wide count is exact
                # inline; on the workers, other slices' batches can still add to it).
                size = max(1, min(size, job.canary_rows - self._scanned))
            return run_batch(
                self.conn, prepared, job_id=job.id, slice_no=slice_no, cursor=cursor,
                slice_upper=upper, size=size, options=options, codec=codec,
                attempts=attempts,
                next_size=lambda rows, ms, waits: sizer.observe(rows, ms, options, waits),
                lease_token=lease_token,
                canary=job.canary_rows is not None and job.approved_at is None,
                actor=self.owner,
                source=self._source(prepared) if prepared.remote else None,
            )

        by_attempts = stop_after_attempt(options.max_retries + 1)
        by_time = stop_after_delay(self.reconnect_timeout_s)

        def give_up(state: RetryCallState) -> bool:
            if self.stop.is_set():
                return True
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None and _connection_trouble(exc) and not isinstance(
                    exc, pgerrors.QueryCanceled | pgerrors.LockNotAvailable):
                return bool(by_time(state))  # a failover takes a minute or two: wait it out
            return bool(by_attempts(state))

        retrying = Retrying(
            retry=retry_if_exception(lambda e: classify(e) is not Verdict.FATAL),
            stop=give_up,
            wait=wait_random_exponential(multiplier=0.2, max=10),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            result = retrying(attempt)
        except (_SliceMoved, LeaseLost):
            self._flush_retry_notes(job.id)
            return None
        except Exception as exc:  # every other error ends the job, recorded with its range
            if self.stop.is_set() and classify(exc) is not Verdict.FATAL:
                return self._pause_on_stop()  # Ctrl-C while retrying: pause, do not fail
            return self._fail(job, prepared, exc, cursor, codec, attempts)
        self._flush_retry_notes(job.id)
        return result

    def _flush_retry_notes(self, job_id: int) -> None:
        def flush() -> None:
            with self.conn.transaction():
                for note in self._retry_notes:
                    store.add_event(self.conn, job_id, "retry", actor=self.owner,
                                    reason=note["error"], details=note)
            self._retry_notes = []

        if self._retry_notes:
            self._db(flush)

    def _fail(self, job: store.JobRecord, prepared: PreparedJob, exc: Exception,
              cursor: Key | None, codec: KeyCodec, attempts: int) -> store.JobRecord:
        error = describe_error(exc)
        err_range = {"after": codec.encode(cursor), "attempts": attempts,
                     "batch_kind": prepared.spec.kind}
        self.log.error("job.failed", error=error, after=render_key(cursor), attempts=attempts)
        self._drop_conn()
        self._flush_retry_notes(job.id)
        reason = (f"batch after {render_key(cursor)} failed"
                  + (f" after {attempts} attempts" if attempts > 1 else "") + f": {error}")
        return self._db(lambda: self._end(job.id, S.FAILED, reason=reason,
                                          error=(error, err_range)))

    def _finish(self, job: store.JobRecord) -> store.JobRecord:
        self._flush_retry_notes(job.id)
        pending = [s for s in leases.slices(self.conn, job.id) if not s.done]
        if pending:  # another runner still holds a slice; leave the job to it
            return store.get_job(self.conn, job.id)
        prog = checkpoints.progress(self.conn, job.id)
        done = self._end(job.id, S.SUCCEEDED, reason=f"all {prog.batches} batches done",
                         details={"rows_scanned": prog.rows_scanned,
                                  "rows_affected": prog.rows_affected})
        self.log.info("job.succeeded", rows=prog.rows_scanned, affected=prog.rows_affected)
        self._tick(done, None, 0, [], S.SUCCEEDED)
        return done

    def _end(self, job_id: int, to: JobState, *, reason: str,
             error: tuple[str, dict[str, Any] | None] | None = None,
             details: dict[str, Any] | None = None) -> store.JobRecord:
        """Move an owned, live job to an end state. Someone else's job (taken over), or one an
        operator already paused or cancelled, or one this runner ended before a lost COMMIT,
        is left as it is."""
        with self.conn.transaction():
            current = store.get_job(self.conn, job_id, for_update=True)
            owned = self._worker or current.owner == self.owner
            if not owned or current.state not in (S.RUNNING, S.THROTTLED):
                self.log.warning("job.not_ended", wanted=str(to), state=str(current.state),
                                 owner=current.owner, reason=reason)
                return current
            return store.transition(self.conn, job_id, to, actor=self.owner, reason=reason,
                                    error=error, details=details, clear_owner=True)

    def _verify_canary(self, job: store.JobRecord) -> None:
        verify_canary(self.conn, job.id, actor=self.owner)

    def _pause_on_stop(self) -> store.JobRecord:
        def pause() -> store.JobRecord:
            job = store.get_job(self.conn, self.job_id)
            if job.state in (S.RUNNING, S.THROTTLED):
                job = store.transition(self.conn, self.job_id, S.PAUSED, actor=self.actor,
                                       reason="interrupted (Ctrl-C); run again to resume",
                                       clear_owner=True)
            return job

        job = self._db(pause)
        self.log.info("job.paused", reason="interrupted")
        return job

    def _lost_ownership(self, job: store.JobRecord) -> store.JobRecord:
        self.log.warning("job.lost_ownership", new_owner=job.owner, state=str(job.state))
        return job

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _tick(self, job: store.JobRecord, batch: BatchResult | None, size: int,
              window: list[tuple[float, int]], state: JobState, note: str | None = None) -> None:
        if self.on_tick is None:
            return
        rate = None
        if len(window) >= 2:
            span = window[-1][0] - window[0][0]
            if span > 0:
                rate = sum(r for _, r in window[1:]) / span
        self.on_tick(Tick(job, batch, size, self._scanned, self._affected, rate, state, note))


def _connection_trouble(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | DatabaseUnavailable)


#: Errors that say "not now" rather than "never": a run that meets one at its start leaves the
#: job as it is (another owner, an operator's pause, a database that is away for a moment).
_TRANSIENT = (DatabaseUnavailable, LeaseLost, IllegalTransition, JobConflict, JobNotFound)


class _SliceMoved(Exception):
    """The slice's cursor is not where this attempt expected it (an earlier one committed)."""
