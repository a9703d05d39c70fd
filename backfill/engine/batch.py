"""One batch: probe the next key, write, and checkpoint, all in one transaction."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

from backfill.core.catalog import Conn
from backfill.core.errors import LeaseLost
from backfill.engine.keyset import Key, KeyCodec
from backfill.engine.kinds import PreparedJob
from backfill.engine.sources import Source
from backfill.engine.throttle import LockWaits
from backfill.job.options import JobOptions
from backfill.job.states import JobState
from backfill.state import checkpoints

#: Application sessions waiting on a lock this backend holds, and the longest wait so far.
#: Sent just before COMMIT: every session a batch blocked still waits then (a row lock is
#: held to the end of the transaction). ``OFFSET 0`` keeps ``pg_blocking_pids`` (which takes
#: the lock manager's locks) to the few ungranted locks. A session queued behind another
#: waiter (a tuple lock) is not counted: it is blocked by that waiter, which is.
LOCK_WAITERS = """
    SELECT count(DISTINCT w.pid)::int,
           coalesce(max(extract(epoch FROM clock_timestamp() - w.waitstart)), 0)::float8 * 1000
    FROM (SELECT pid, waitstart FROM pg_locks WHERE NOT granted OFFSET 0) w
    WHERE pg_backend_pid() = ANY (pg_blocking_pids(w.pid))"""


@dataclass(frozen=True)
class BatchResult:
    lower: Key | None
    upper: Key
    done: bool
    rows_scanned: int
    rows_affected: int
    duration_ms: float
    batch_id: int
    job_state: JobState  # as of the checkpoint: throttled means wait before the next batch
    options_version: int  # a change means someone tuned the job
    canary_reached: bool = False  # this batch completed the canary: verify it
    waits: LockWaits | None = None  # application sessions blocked behind it, before COMMIT


def run_batch(
    conn: Conn,
    prepared: PreparedJob,
    *,
    job_id: int,
    slice_no: int,
    cursor: Key | None,
    slice_upper: Key,
    size: int,
    options: JobOptions,
    codec: KeyCodec,
    attempts: int = 1,
    next_size: Any = None,
    lease_token: int,
    canary: bool = False,
    actor: str = "runner",
    source: Source | None = None,
) -> BatchResult:
    """Process ``(cursor, next]`` where ``next`` is ``size`` keys past ``cursor`` (or the slice's
    upper bound). The checkpoint is a compare-and-set on ``cursor``: if the slice moved on, the
    whole transaction rolls back and :class:`LeaseLost` is raised.

    Four round trips, as many as a hand-written keyset loop: BEGIN, the timeouts and the probe
    go together in a pipeline; then the write; then the binding proof and the checkpoint
    together; then COMMIT. With a lock-wait budget, one more just before the checkpoint:
    the application sessions blocked behind the batch (:data:`LOCK_WAITERS`), which
    ``next_size(rows, ms, waits)`` weighs. The job's state and options version come back
    with the checkpoint, so no separate read is needed. A failed proof
    (:class:`~backfill.core.errors.TableChanged`: the table was replaced) rolls the whole batch
    back.

    A cross-database job's range is probed, read and written by its ``source``
    (:mod:`backfill.engine.sources`), in this same transaction.
    """
    keyset = prepared.keyset
    started = time.perf_counter()
    # COPY cannot run in pipeline mode: a cross-database batch goes statement by statement.
    pipe = contextlib.nullcontext() if source is not None else conn.pipeline()
    with pipe as pipeline, conn.transaction():
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
            # Round up: PostgreSQL reads 0 as "no timeout".
            (f"{max(1, math.ceil(options.statement_timeout_ms))}ms",
             f"{max(1, math.ceil(options.lock_timeout_ms))}ms"),
        )
        first = None
        if source is not None:   # another database: it probes, reads and writes the range
            hi, done, scanned, affected = source.batch(conn, cursor, slice_upper, size)
            wrote = True
        else:
            nxt = keyset.probe(conn, cursor, slice_upper, size - 1)
            if nxt is None:
                hi, done = slice_upper, True
                row = conn.execute(
                    keyset.count_query(lower=cursor is not None),
                    keyset.params(cursor, slice_upper)).fetchone()
                scanned = int(row[0]) if row else 0
            else:
                hi, done, scanned = nxt, nxt == slice_upper, size
            if prepared.spec.kind == "sql":
                first = keyset.first_key(conn, cursor, hi)
            affected = 0
            wrote = bool(scanned or first)
            if scanned or first:
                affected = prepared.write_batch(
                    conn, cursor, hi, first,
                    sync=pipeline.sync if pipeline is not None else None)
        # The write (and the probe) hold their locks until COMMIT: prove that what they
        # locked is what the job is bound to (sent now, answered with the checkpoint).
        proof = prepared.binding.send(conn) if prepared.binding is not None else None
        waits = None
        if options.lock_wait_budget_ms and next_size is not None:
            sample = conn.execute(LOCK_WAITERS).fetchone()
            waits = LockWaits(int(sample[0]), float(sample[1])) if sample else None
        duration_ms = (time.perf_counter() - started) * 1000.0
        upcoming = next_size(scanned, duration_ms, waits) if next_size is not None else size
        result = checkpoints.checkpoint(
            conn,
            job_id=job_id,
            slice_no=slice_no,
            prev=codec.encode(cursor),
            new=codec.encode(hi) or [],
            done=done,
            rows_scanned=scanned,
            rows_affected=affected,
            batch_size=size,
            next_batch_size=upcoming,
            duration_ms=duration_ms,
            attempts=attempts,
            lease_token=lease_token,
        )
        if proof is not None:
            assert prepared.binding is not None
            prepared.binding.check(proof.fetchone(), wrote=wrote)   # raises: rolls back
        if result is None:
            raise LeaseLost(
                f"slice {slice_no} of job {job_id} is no longer at this cursor, its lease was "
                "taken over, or the job is no longer running: batch rolled back"
            )
        reached = canary and checkpoints.reach_canary(conn, job_id, actor=actor)
    batch_id, state, options_version = result
    return BatchResult(cursor, hi, done, scanned, affected, duration_ms, batch_id,
                       JobState.AWAITING_APPROVAL if reached else JobState(state),
                       options_version, canary_reached=reached, waits=waits)
