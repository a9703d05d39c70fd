"""Run a migration's steps: short lock timeouts with retries, CONCURRENTLY outside transactions,
backfills through the job engine, and a record of every step that survives any crash.

Idempotence, step by step:

- a transactional step's statements and its ``done`` mark commit in one transaction, so after a
  crash it either happened and is marked, or neither;
- a concurrent step (``CREATE INDEX CONCURRENTLY``) cannot share a transaction with its mark:
  before it runs, the executor looks at the index it builds: valid means done (the crash came
  between the build and the mark), INVALID means a build died half-way, so it is dropped
  (``DROP INDEX CONCURRENTLY``) and built again;
- a backfill step finds its job by the id it recorded or by its deterministic name, and the
  job engine's checkpoints make re-running it continue where it stopped;
- checks are read-only.

One process at a time runs a given migration (a session advisory lock on its id).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backfill.api import Backfill
from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.db import connect, redact_text
from backfill.core.durations import format_duration
from backfill.core.errors import (
    BackfillError,
    GateClosed,
    InvalidInput,
    MigrationBusy,
    MigrationError,
    MigrationWaiting,
    PreflightFailed,
)
from backfill.core.logs import get_logger
from backfill.engine.enqueue import create_job
from backfill.engine.kinds import undo_table
from backfill.engine.runner import Tick
from backfill.engine.undo import undo_log_exists
from backfill.job.spec import JobSpec
from backfill.job.states import TERMINAL, JobState
from backfill.migrate.file import MigrationFile
from backfill.migrate.plan import build_plan, version_schema
from backfill.migrate.records import (
    MigrationEvent,
    MigrationRecord,
    Status,
    StepRecord,
    find_migration,
    record_of,
    require_migration,
    steps_of,
)
from backfill.migrate.steps import PHASES, OpPlan, ordered_steps
from backfill.state import checkpoints, store
from backfill.state.schema import require_current

log = get_logger(component="migrate")

#: First key of the two-key advisory lock a migration's runner holds ("bfmi").
_LOCK_CLASS = 0x62666D69 - 2**31
_LOCK_ERRORS = (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected)
_LOCK_MODES = frozenset({"ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE",
                         "SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"})
#: Crash injection for tests: ``BACKFILL_FAILPOINT=migrate:<phase>:<step_no>`` exits the
#: process right after that step's effect is applied, before anything else is recorded.
FAILPOINT_ENV = "BACKFILL_FAILPOINT"


Notify = Callable[[str], None]


class Migrator:
    """Plans and runs migrations on one database, recording who did what."""

    def __init__(self, dsn: str, *, actor: str, notify: Notify | None = None,
                 stop: threading.Event | None = None,
                 on_tick: Callable[[Tick], None] | None = None) -> None:
        self.dsn = dsn
        self.actor = actor
        self.notify = notify or (lambda _msg: None)
        self.stop = stop or threading.Event()
        self.on_tick = on_tick

    # -- reading ------------------------------------------------------------------------------

    @contextmanager
    def _conn(self, what: str = "migrate") -> Iterator[Conn]:
        conn = connect(self.dsn, application_name=f"backfill {what}")
        try:
            require_current(conn)
            yield conn
        finally:
            conn.close()

    def plan(self, mig: MigrationFile) -> tuple[OpPlan, ...]:
        """The operations' steps, checked against the database; nothing is written: every
        fragment passes the gate first, and the whole plan runs in a transaction that is rolled
        back, whatever its checks send."""
        with self._conn() as conn, conn.transaction(force_rollback=True):
            return build_plan(conn, mig)

    def get(self, ref: str) -> MigrationRecord | None:
        with self._conn() as conn:
            return find_migration(conn, ref)

    def list(self) -> list[MigrationRecord]:
        with self._conn() as conn:
            rows = conn.cursor(row_factory=dict_row).execute(
                "SELECT * FROM backfill.migrations ORDER BY created_at DESC, id").fetchall()
            return [record_of(r) for r in rows]

    def status(self, ref: str) -> Status:
        with self._conn() as conn:
            rec = require_migration(conn, ref)
            steps = steps_of(conn, rec.id)
            events = [MigrationEvent(**r) for r in conn.cursor(row_factory=dict_row).execute(
                """SELECT id, at, actor, kind, phase, step_no, message, details
                   FROM backfill.migration_events WHERE migration_id = %s ORDER BY id""",
                (rec.id,)).fetchall()]
            jobs = {}
            for s in steps:
                if s.job_id is not None:
                    jobs[s.job_id] = (store.get_job(conn, s.job_id),
                                      checkpoints.progress(conn, s.job_id))
            return Status(rec, steps, events, jobs)

    def version_schema(self, ref: str) -> str | None:
        """The migration's version schema when it exists (between start and complete): the
        new application version's ``search_path`` names it first."""
        with self._conn() as conn:
            rec = find_migration(conn, ref)
            name = version_schema(rec.id if rec else ref)
            row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                               (name,)).fetchone()
            return name if row else None

    # -- the three commands ----------------------------------------------------------------------

    def start(self, mig: MigrationFile, *, workers: bool = False,
              wait: bool = True) -> MigrationRecord:
        """Expand: run the start steps (DDL, backfills, checks) from wherever they stopped."""
        with self._locked(mig.id) as conn:
            rec = find_migration(conn, mig.id)
            if rec is not None and rec.state in ("completing", "completed"):
                raise MigrationError(f"migration {mig.id} is {rec.state}: start has nothing "
                                     "left to do")
            if rec is not None and rec.state == "rolling_back":
                raise MigrationError(f"migration {mig.id} is being rolled back; finish with "
                                     f"`backfill migrate rollback {mig.id}` first")
            if rec is not None and rec.state != "rolled_back" and rec.checksum != mig.checksum:
                raise MigrationError(
                    f"{mig.path or 'the file'} changed since migration {mig.id} started "
                    f"(checksum {rec.checksum}, now {mig.checksum}); roll it back first, or "
                    "give the changed migration a new id")
            if rec is None or rec.state == "rolled_back":
                rec = self._create(conn, mig, rec)
            if rec.state == "started":
                self.notify(f"migration {mig.id} is already started; next: "
                            f"`backfill migrate complete {mig.id}`")
                return rec
            self._run_phase(conn, rec, "start", workers=workers, wait=wait)
            rec = self._set_state(conn, rec.id, "started", "start finished: expand, backfill "
                                  "and validation done")
            return rec

    def complete(self, ref: str) -> MigrationRecord:
        """Contract, behind the gate: every backfill succeeded and verifies, and every check of
        start still holds."""
        with self._locked(ref) as conn:
            rec = require_migration(conn, ref)
            if rec.state == "completed":
                self.notify(f"migration {rec.id} is already completed")
                return rec
            if rec.state in ("starting", "rolling_back", "rolled_back"):
                hint = {"starting": f"start has not finished: run `backfill migrate start` "
                                    f"with its file (`backfill migrate status {rec.id}` shows "
                                    "where it stopped)",
                        "rolling_back": "it is being rolled back",
                        "rolled_back": "it was rolled back"}[rec.state]
                raise GateClosed(f"cannot complete migration {rec.id}: {hint}")
            if rec.state == "started":
                self._gate(conn, rec)
                rec = self._set_state(conn, rec.id, "completing", "gate passed; contract "
                                      "begins")
            self._run_phase(conn, rec, "complete")
            self._drop_undo_logs(conn, rec, "complete")
            return self._set_state(conn, rec.id, "completed", "complete finished")

    def rollback(self, ref: str) -> MigrationRecord:
        """Undo start: cancel its backfills, then run the rollback steps (all idempotent)."""
        with self._locked(ref) as conn:
            rec = require_migration(conn, ref)
            if rec.state == "rolled_back":
                self.notify(f"migration {rec.id} is already rolled back")
                return rec
            if rec.state in ("completing", "completed"):
                raise MigrationError(
                    f"migration {rec.id} is {rec.state}: its contract steps drop columns, "
                    "tables or indexes, so there is no automatic rollback; finish it with "
                    f"`backfill migrate complete {rec.id}` and write a new migration to undo it")
            if rec.state != "rolling_back":
                rec = self._set_state(conn, rec.id, "rolling_back", "rollback requested")
            bf = Backfill(self.dsn, actor=self.actor)
            for s in steps_of(conn, rec.id, "start"):
                if s.job_id is None:
                    continue
                job = store.get_job(conn, s.job_id)
                if job.state not in TERMINAL:
                    bf.cancel(job.id, f"migration {rec.id} rolled back")
                    self._event(conn, rec.id, "job", f"cancelled backfill job {job.id}",
                                phase="rollback")
            self._run_phase(conn, rec, "rollback")
            self._drop_undo_logs(conn, rec, "rollback")
            return self._set_state(conn, rec.id, "rolled_back", "rollback finished")

    # -- internals -----------------------------------------------------------------------------

    def _drop_undo_logs(self, conn: Conn, rec: MigrationRecord, phase: str) -> None:
        """Drop the undo logs of the jobs that filled what the migration added (a new column,
        a renamed or retyped copy): after complete or rollback nothing can use them, and they
        are as large as the column. A ``backfill`` operation's log is kept: its old values are
        the application's data, and ``backfill revert`` can still restore them."""
        ops = rec.definition.get("operations") or []
        for s in steps_of(conn, rec.id, "start"):
            if s.job_id is None or not undo_log_exists(conn, s.job_id):
                continue
            if s.step.op < len(ops) and ops[s.step.op].get("op") == "backfill":
                continue
            with conn.transaction():
                # The job's row lock, as revert and prune take it.
                conn.execute("SELECT 1 FROM backfill.jobs WHERE id = %s FOR UPDATE",
                             (s.job_id,))
                size = conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                                    (undo_table(s.job_id).as_string(conn),)).fetchone()
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(undo_table(s.job_id)))
                n = int(size[0]) if size and size[0] is not None else 0
                store.add_event(conn, s.job_id, "undo_pruned", actor=self.actor,
                                reason=f"migration {rec.id} {phase}: undo log dropped "
                                       f"({n} bytes)", details={"bytes": n})
                self._event(conn, rec.id, "cleanup", f"dropped the undo log of backfill job "
                            f"{s.job_id} ({n / 2**20:,.1f} MB): nothing can use it after "
                            f"{phase}", phase=phase, details={"job_id": s.job_id, "bytes": n})

    @contextmanager
    def _locked(self, ref: str) -> Iterator[Conn]:
        with self._conn(f"migrate {ref}") as conn:
            got = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                               (_LOCK_CLASS, ref)).fetchone()
            if not (got and got[0]):
                row = conn.execute(
                    """SELECT l.pid, a.application_name FROM pg_locks l
                       JOIN pg_stat_activity a ON a.pid = l.pid
                       WHERE l.locktype = 'advisory' AND l.classid::bigint = %s::bigint
                         AND l.objid::bigint = (hashtext(%s)::bigint & 4294967295)
                         AND l.granted LIMIT 1""",
                    (_LOCK_CLASS & 0xFFFFFFFF, ref)).fetchone()
                who = f" (server pid {row[0]}, {row[1]})" if row else ""
                raise MigrationBusy(f"migration {ref} is being run by another process{who}")
            try:
                # A migrate process that dies mid-DDL must not leave its backend running
                # (and holding locks) until the statement ends.
                with contextlib.suppress(pgerrors.UndefinedObject):   # PostgreSQL < 14
                    conn.execute("SET client_connection_check_interval = '1s'")
                yield conn
            finally:
                if not conn.closed:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))",
                                 (_LOCK_CLASS, ref))

    def _create(self, conn: Conn, mig: MigrationFile,
                previous: MigrationRecord | None) -> MigrationRecord:
        missing = []
        for dep in mig.depends_on:
            d = find_migration(conn, dep)
            if d is None or d.state != "completed":
                missing.append(f"{dep} ({d.state if d else 'never run here'})")
        if missing:
            raise MigrationError(f"migration {mig.id} depends on migrations that are not "
                                 f"completed: {', '.join(missing)}")
        with conn.transaction(force_rollback=True):   # the plan writes nothing, whatever it runs
            plans = build_plan(conn, mig)  # validates every operation before anything is written
        blockers = [f"operation {p.op + 1} ({p.kind}): {b}" for p in plans for b in p.blockers]
        if blockers:
            raise InvalidInput(f"migration {mig.id} cannot start:\n  " + "\n  ".join(blockers))
        steps = ordered_steps(plans)
        with conn.transaction():
            if previous is None:
                conn.execute(
                    """INSERT INTO backfill.migrations
                       (id, description, checksum, definition, state, created_by)
                       VALUES (%s, %s, %s, %s, 'starting', %s)""",
                    (mig.id, mig.description, mig.checksum, Jsonb(mig.to_json()), self.actor))
            else:
                conn.execute("DELETE FROM backfill.migration_steps WHERE migration_id = %s",
                             (mig.id,))
                conn.execute(
                    """UPDATE backfill.migrations SET description = %s, checksum = %s,
                       definition = %s, state = 'starting', last_error = NULL, updated_at = now()
                       WHERE id = %s""",
                    (mig.description, mig.checksum, Jsonb(mig.to_json()), mig.id))
            for phase in PHASES:
                for no, step in enumerate(steps[phase], 1):
                    conn.execute(
                        """INSERT INTO backfill.migration_steps (migration_id, phase, step_no, step)
                           VALUES (%s, %s, %s, %s)""",
                        (mig.id, phase, no, Jsonb(step.to_json())))
            counts = {p: len(steps[p]) for p in PHASES}
            self._event(conn, mig.id, "state",
                        ("planned again after rollback" if previous else "planned") +
                        f": {counts['start']} start, {counts['complete']} complete, "
                        f"{counts['rollback']} rollback steps",
                        details={"from": previous.state if previous else None,
                                 "to": "starting", "checksum": mig.checksum})
        rec = find_migration(conn, mig.id)
        assert rec is not None
        return rec

    def _set_state(self, conn: Conn, mid: str, state: str, message: str) -> MigrationRecord:
        with conn.transaction():
            before = conn.execute("SELECT state FROM backfill.migrations WHERE id = %s FOR UPDATE",
                                  (mid,)).fetchone()
            conn.execute("UPDATE backfill.migrations SET state = %s, last_error = NULL, "
                         "updated_at = now() WHERE id = %s", (state, mid))
            self._event(conn, mid, "state", message,
                        details={"from": before[0] if before else None, "to": state})
        log.info("migration.state", migration=mid, to_state=state, actor=self.actor,
                 reason=message)
        self.notify(f"migration {mid}: {state} ({message})")
        rec = find_migration(conn, mid)
        assert rec is not None
        return rec

    def _event(self, conn: Conn, mid: str, kind: str, message: str, *,
               phase: str | None = None, step_no: int | None = None,
               details: dict[str, Any] | None = None) -> None:
        conn.execute(
            """INSERT INTO backfill.migration_events
               (migration_id, actor, kind, phase, step_no, message, details)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            (mid, self.actor, kind, phase, step_no, message,
             Jsonb(details) if details is not None else None))

    def _fail(self, conn: Conn, rec: MigrationRecord, s: StepRecord, message: str,
              exc_type: type[MigrationError] = MigrationError) -> MigrationError:
        with conn.transaction():
            conn.execute(
                """UPDATE backfill.migration_steps SET state = 'failed', last_error = %s,
                   finished_at = now() WHERE migration_id = %s AND phase = %s AND step_no = %s""",
                (message, rec.id, s.phase, s.step_no))
            conn.execute("UPDATE backfill.migrations SET last_error = %s, updated_at = now() "
                         "WHERE id = %s", (message, rec.id))
            self._event(conn, rec.id, "failed", message, phase=s.phase, step_no=s.step_no)
        log.warning("migration.step_failed", migration=rec.id, phase=s.phase, step=s.step_no,
                    error=message)
        return exc_type(f"migration {rec.id}, {s.phase} step {s.step_no} "
                        f"({s.step.description}): {message}")

    def _done(self, conn: Conn, rec: MigrationRecord, s: StepRecord, message: str,
              attempts: int = 1, started: dt.datetime | None = None) -> None:
        # clock_timestamp, not now(): a transactional step's mark shares the step's
        # transaction, and now() would be its start. ``started``: when the step began (before
        # its first lock attempt), for steps whose start was not recorded on its own.
        conn.execute(
            """UPDATE backfill.migration_steps SET state = 'done', attempts = attempts + %s,
               finished_at = clock_timestamp(), last_error = NULL,
               started_at = coalesce(started_at, %s, now())
               WHERE migration_id = %s AND phase = %s AND step_no = %s""",
            (attempts, started, rec.id, s.phase, s.step_no))
        self._event(conn, rec.id, "step", message, phase=s.phase, step_no=s.step_no)

    def _run_phase(self, conn: Conn, rec: MigrationRecord, phase: str, *,
                   workers: bool = False, wait: bool = True) -> None:
        steps = steps_of(conn, rec.id, phase)
        total = len(steps)
        for s in steps:
            if s.state == "done":
                continue
            if self.stop.is_set():
                raise MigrationWaiting(f"migration {rec.id} interrupted before {phase} step "
                                       f"{s.step_no}; run the command again to continue")
            self.notify(f"{phase} {s.step_no}/{total}: {s.step.description}")
            if s.step.mode == "tx":
                self._run_tx(conn, rec, s)
            elif s.step.mode == "concurrent":
                self._run_concurrent(conn, rec, s)
            elif s.step.mode == "backfill":
                self._run_backfill(conn, rec, s, workers=workers, wait=wait)
            else:
                self._run_check(conn, rec, s)

    def _timeouts(self, conn: Conn, rec: MigrationRecord, s: StepRecord, *, local: bool) -> None:
        st = rec.settings
        long = s.step.duration in ("scan", "build") or s.step.mode == "concurrent"
        lock_ms = 0.0 if s.step.mode == "concurrent" else st.lock_timeout_ms
        stmt_ms = st.long_statement_timeout_ms if long else st.statement_timeout_ms
        scope = "true" if local else "false"
        conn.execute(f"SELECT set_config('lock_timeout', %s, {scope}), "
                     f"set_config('statement_timeout', %s, {scope})",
                     (f"{int(lock_ms)}ms", f"{int(stmt_ms)}ms"))

    def _backoff(self, rec: MigrationRecord, attempt: int) -> float:
        st = rec.settings
        base = min(st.retry_backoff_max_ms, st.retry_backoff_ms * 2 ** (attempt - 1))
        return float(base * random.uniform(0.5, 1.0)) / 1000.0

    def _lock_wait(self, conn: Conn, rec: MigrationRecord, s: StepRecord, attempt: int,
                   exc: BaseException) -> None:
        """After a lock timeout: record who held the table, wait (backoff), or give up."""
        holders = _holders(conn, rec.settings.lock_timeout_ms)
        who = "; ".join(f"pid {h['pid']} ({h['state']}, transaction open "
                        f"{format_duration(h['xact_s'])}: {h['query']})" for h in holders)
        reason = type(exc).__name__
        # A deadlock is not a lock timeout: say which of the two made this step give way.
        what = ("chosen as a deadlock's victim" if isinstance(exc, pgerrors.DeadlockDetected)
                else f"lock not granted within {int(rec.settings.lock_timeout_ms)}ms")
        if attempt > rec.settings.lock_retries:
            raise self._fail(conn, rec, s, (
                f"could not take its lock in {attempt} attempts of "
                f"{format_duration(rec.settings.lock_timeout_ms / 1000)} each ({reason})"
                + (f"; held by {who}" if who else "")
                + ". Nothing was changed by this step; run the command again when the "
                "table is quieter, or raise lock_retries"))
        delay = self._backoff(rec, attempt)
        self._event(conn, rec.id, "retry",
                    f"{reason}: {what}, retry {attempt} in {delay:.1f}s",
                    phase=s.phase, step_no=s.step_no,
                    details={"attempt": attempt, "delay_s": round(delay, 3),
                             "holders": holders})
        log.info("migration.lock_retry", migration=rec.id, phase=s.phase, step=s.step_no,
                 attempt=attempt, delay_s=round(delay, 3), holders=who or None)
        self.notify(f"  {what} ({reason}); retry {attempt} in {delay:.1f}s"
                    + (f" — held by {who}" if who else ""))
        if self.stop.wait(delay):
            raise MigrationWaiting(f"migration {rec.id} interrupted while waiting for a lock; "
                                   "run the command again to continue")

    def _run_tx(self, conn: Conn, rec: MigrationRecord, s: StepRecord) -> None:
        started = _clock(conn)
        attempt = 0
        while True:
            attempt += 1
            try:
                with conn.transaction():
                    self._timeouts(conn, rec, s, local=True)
                    for schema, table, mode in s.step.lock_order:
                        if mode not in _LOCK_MODES:
                            raise MigrationError(f"unknown lock mode {mode!r} in step "
                                                 f"{s.step_no}")
                        # In the step's order, under its lock_timeout; a table already
                        # gone (a rollback re-run) has nothing left to lock.
                        name = sql.Identifier(schema, table).as_string(conn)
                        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
                        if row is None or row[0] is None:
                            continue
                        conn.execute(sql.SQL("LOCK TABLE {} IN {} MODE").format(
                            sql.Identifier(schema, table), sql.SQL(mode)))
                    for statement in s.step.statements:
                        sqltext.execute_one(conn, statement)   # alone, extended protocol
                    self._done(conn, rec, s, f"done: {s.step.description}", attempts=attempt,
                               started=started)
            except _LOCK_ERRORS as exc:
                self._lock_wait(conn, rec, s, attempt, exc)
                continue
            except psycopg.Error as exc:
                raise self._fail(conn, rec, s, _pg_message(exc)) from None
            _failpoint(s)
            return

    def _run_concurrent(self, conn: Conn, rec: MigrationRecord, s: StepRecord) -> None:
        with conn.transaction():
            conn.execute(
                """UPDATE backfill.migration_steps SET state = 'running',
                   started_at = coalesce(started_at, now())
                   WHERE migration_id = %s AND phase = %s AND step_no = %s""",
                (rec.id, s.phase, s.step_no))
        attempt = 0
        try:
            while True:
                attempt += 1
                if s.step.index and self._index_ready(conn, rec, s):
                    break
                try:
                    self._timeouts(conn, rec, s, local=False)
                    for statement in s.step.statements:
                        sqltext.execute_one(conn, statement)   # alone, extended protocol
                except _LOCK_ERRORS as exc:
                    self._drop_invalid(conn, rec, s)
                    self._lock_wait(conn, rec, s, attempt, exc)
                    continue
                except psycopg.Error as exc:
                    message = _pg_message(exc)
                    if self._drop_invalid(conn, rec, s):
                        message += " (the invalid index it left was dropped)"
                    raise self._fail(conn, rec, s, message) from None
                break
        finally:
            if not conn.closed:
                conn.execute("RESET lock_timeout; RESET statement_timeout")
        _failpoint(s)
        with conn.transaction():
            self._done(conn, rec, s, f"done: {s.step.description}", attempts=attempt)

    def _index_state(self, conn: Conn, index: str) -> str | None:
        row = conn.execute(
            "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass(%s)",
            (index,)).fetchone()
        if row is None:
            return None
        return "valid" if row[0] else "invalid"

    def _index_ready(self, conn: Conn, rec: MigrationRecord, s: StepRecord) -> bool:
        """True when the index this step builds is there and valid (a crash came after the
        build); an INVALID one, left by a build that died, is dropped so it can be rebuilt."""
        assert s.step.index is not None
        state = self._index_state(conn, s.step.index)
        if state == "valid":
            self._event(conn, rec.id, "step", f"index {s.step.index} is already built and "
                        "valid", phase=s.phase, step_no=s.step_no)
            return True
        if state == "invalid":
            self._drop_invalid(conn, rec, s)
        return False

    def _drop_invalid(self, conn: Conn, rec: MigrationRecord, s: StepRecord) -> bool:
        if not s.step.index or self._index_state(conn, s.step.index) != "invalid":
            return False
        conn.execute("SET lock_timeout = 0")
        # step.index is the quoted, qualified name the plan rendered.
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.SQL(s.step.index)))
        self._event(conn, rec.id, "cleanup", f"dropped INVALID index {s.step.index} left by "
                    "a build that did not finish", phase=s.phase, step_no=s.step_no)
        log.info("migration.invalid_index_dropped", migration=rec.id, index=s.step.index)
        self.notify(f"  dropped INVALID index {s.step.index} left by an unfinished build")
        return True

    def _run_check(self, conn: Conn, rec: MigrationRecord, s: StepRecord) -> None:
        started = _clock(conn)
        try:
            with conn.transaction():
                conn.execute("SET LOCAL statement_timeout = '5min'")
                row = sqltext.execute_one(conn, s.step.statements[0]).fetchone()
        except psycopg.Error as exc:
            raise self._fail(conn, rec, s, _pg_message(exc)) from None
        if not (row and row[0]):
            raise self._fail(conn, rec, s, "validation failed: it is not true that "
                             f"{s.step.description}")
        with conn.transaction():
            self._done(conn, rec, s, f"validated: {s.step.description}", started=started)
        _failpoint(s)

    def _job_for(self, conn: Conn, rec: MigrationRecord, s: StepRecord,
                 workers: bool) -> store.JobRecord:
        """The step's job: the one it recorded, or a new one created and recorded in one
        transaction, so a crash can never leave a job the migration does not know about."""
        assert s.step.job is not None
        if s.job_id is not None:
            job = store.get_job(conn, s.job_id)
            if job.state != JobState.CANCELLED:
                return job
            self._event(conn, rec.id, "job", f"backfill job {job.id} was cancelled; "
                        "enqueueing it again", phase=s.phase, step_no=s.step_no)
        spec = JobSpec.from_json(s.step.job)
        try:
            with conn.transaction():
                job = create_job(conn, spec, actor=self.actor, workers=workers)
                conn.execute(
                    """UPDATE backfill.migration_steps SET job_id = %s, state = 'running',
                       started_at = coalesce(started_at, now())
                       WHERE migration_id = %s AND phase = %s AND step_no = %s""",
                    (job.id, rec.id, s.phase, s.step_no))
                self._event(conn, rec.id, "job", f"enqueued backfill job {job.id}",
                            phase=s.phase, step_no=s.step_no,
                            details={"job_id": job.id, "workers": workers})
        except BackfillError as exc:
            raise self._fail(conn, rec, s, f"cannot enqueue its backfill job: {exc}") from None
        self.notify(f"  enqueued backfill job {job.id}: {spec.display_name}"
                    + (" (on the workers)" if workers else ""))
        return job

    def _run_backfill(self, conn: Conn, rec: MigrationRecord, s: StepRecord, *,
                      workers: bool, wait: bool) -> None:
        bf = Backfill(self.dsn, actor=self.actor)
        job = self._job_for(conn, rec, s, workers)
        while True:
            if job.state == JobState.SUCCEEDED:
                break
            if job.state == JobState.FAILED:
                raise self._fail(conn, rec, s, (
                    f"backfill job {job.id} failed: {job.last_error or job.state_reason}. "
                    f"Fix the cause, then `backfill retry {job.id}` and run migrate start "
                    "again (it continues from the job's checkpoint)"))
            if job.state == JobState.PAUSED and not (job.state_reason or "").startswith(
                    "interrupted"):   # an operator's pause wins; a Ctrl-C'd run goes on
                raise MigrationWaiting(
                    f"backfill job {job.id} is paused ({job.state_reason}); "
                    f"`backfill resume {job.id}`, then run migrate start again")
            if job.runs_on == "workers":
                if not wait:
                    raise MigrationWaiting(
                        f"backfill job {job.id} runs on the workers; run migrate start again "
                        "(or `backfill watch`) to finish start when it is done")
                if self.stop.wait(1.0):
                    raise MigrationWaiting(f"stopped waiting for backfill job {job.id}; it "
                                           "goes on on the workers")
                job = bf.get(job.id)
                continue
            try:
                job = bf.run(job.id, stop=self.stop, on_tick=self.on_tick)
            except PreflightFailed as exc:
                raise self._fail(conn, rec, s, str(exc)) from None
            if job.state in (JobState.PAUSED, JobState.PENDING) or self.stop.is_set():
                raise MigrationWaiting(
                    f"backfill job {job.id} stopped ({job.state}: {job.state_reason}); "
                    "its checkpoint is kept: run migrate start again to continue")
        _failpoint(s)
        report = bf.verify(job.id)
        if not report.ok:
            detail = report.unverifiable or "; ".join(d.detail for d in report.diffs[:3])
            raise self._fail(conn, rec, s, f"backfill job {job.id} succeeded but does not "
                             f"verify: {detail}")
        with conn.transaction():
            self._done(conn, rec, s, f"backfill job {job.id} succeeded and verified "
                       f"({report.checked_rows} rows)")

    def _gate(self, conn: Conn, rec: MigrationRecord) -> None:
        """Refuse to contract unless every backfill succeeded and verifies now, and every
        check of start still holds (an index dropped by hand since, a constraint gone)."""
        reasons = []
        bf = Backfill(self.dsn, actor=self.actor)
        for s in steps_of(conn, rec.id, "start"):
            if s.state != "done":
                reasons.append(f"start step {s.step_no} ({s.step.description}) is {s.state}")
            elif s.step.mode == "backfill" and s.job_id is not None:
                job = store.get_job(conn, s.job_id)
                if job.state != JobState.SUCCEEDED:
                    reasons.append(f"backfill job {job.id} is {job.state}")
                    continue
                try:
                    report = bf.verify(job.id)
                except psycopg.Error as exc:   # a checked cast raised on a changed value
                    reasons.append(f"backfill job {job.id} cannot be verified: "
                                   f"{_pg_message(exc)}")
                    continue
                if not report.ok:
                    reasons.append(f"backfill job {job.id} does not verify: "
                                   + (report.unverifiable or "; ".join(
                                       d.detail for d in report.diffs[:3])))
            elif s.step.mode == "check":
                row = sqltext.execute_one(conn, s.step.statements[0]).fetchone()
                if not (row and row[0]):
                    reasons.append(f"no longer true: {s.step.description}")
        if reasons:
            with conn.transaction():
                self._event(conn, rec.id, "gate", "complete refused: " + "; ".join(reasons),
                            phase="complete", details={"reasons": reasons})
            raise GateClosed(f"cannot complete migration {rec.id}: " + "; ".join(reasons))
        with conn.transaction():
            self._event(conn, rec.id, "gate", "gate passed: every backfill succeeded and "
                        "verifies; every check of start holds", phase="complete")


def _holders(conn: Conn, lock_timeout_ms: float) -> list[dict[str, Any]]:
    """Sessions whose transaction is older than the lock timeout and hold a table lock: the
    likely reason a DDL step could not take its lock."""
    rows = conn.execute(
        """SELECT a.pid, a.state, extract(epoch FROM now() - a.xact_start)::float8,
                  left(regexp_replace(a.query, '\\s+', ' ', 'g'), 80)
           FROM pg_stat_activity a
           WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
             AND now() - a.xact_start > make_interval(secs => %s / 1000.0)
             AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                         AND l.locktype = 'relation' AND l.database = (
                             SELECT oid FROM pg_database WHERE datname = current_database()))
           ORDER BY a.xact_start LIMIT 3""", (lock_timeout_ms,)).fetchall()
    return [{"pid": r[0], "state": r[1], "xact_s": round(r[2], 1), "query": redact_text(r[3])}
            for r in rows]


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = (diag.message_primary or str(exc)).strip()
    if diag.sqlstate:
        text += f" [{diag.sqlstate}]"
    if diag.message_detail:
        text += f" ({diag.message_detail})"
    return redact_text(text)


def _clock(conn: Conn) -> dt.datetime | None:
    """The server's clock now (not the transaction's start), for a step's started_at."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    return row[0] if row else None


def _failpoint(s: StepRecord) -> None:
    if os.environ.get(FAILPOINT_ENV) == f"migrate:{s.phase}:{s.step_no}":
        os._exit(137)
