"""The Python API for scripts: define, enqueue, run, wait, inspect and steer jobs.

    from backfill import Backfill, update

    bf = Backfill("postgresql://localhost/app")
    job = bf.enqueue(update("users", {"email_lower": "lower(email)"}, batch_size=5000))
    bf.run(job.id)                      # inline, in this process
    print(bf.get(job.id).state)
"""

from __future__ import annotations

import builtins
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.db import connect
from backfill.core.errors import InvalidInput, JobNotFound
from backfill.core.settings import default_actor
from backfill.engine.enqueue import create_job
from backfill.engine.keyset import KeyCodec, render_key
from backfill.engine.kinds import index_undo_table, undo_table
from backfill.engine.prepare import prepare, prepare_stored
from backfill.job import registry as registry_mod
from backfill.job.spec import UNDOABLE, JobSpec
from backfill.job.states import ACTIVE, TERMINAL, JobState
from backfill.state import store
from backfill.state.schema import require_current, upgrade_conn

if TYPE_CHECKING:
    from backfill.engine.runner import Tick
    from backfill.engine.undo import UndoLog
    from backfill.engine.verify import VerifyReport
    from backfill.safety.preflight import Check, PreflightConfig
    from backfill.safety.rehearsal import Rehearsal
    from backfill.state import checkpoints, leases, views

# What only some methods need (the runner and its retries, the canary and verify, the
# pre-flight checks, the undo logs, the views) is imported by those methods: `backfill
# enqueue` and a script that only enqueues do not load them (fixed costs, issue 16).

S = JobState
JobRef = int | str | store.JobRecord


def _phase2_name(move_id: int) -> str:
    return f"move job {move_id}, phase 2: the source rows go"


def _phase2(conn: Conn, move: store.JobRecord) -> store.JobRecord | None:
    """The delete phase of a cross-database move, by the ``phase2`` event that recorded it on
    the move (a job named alike proves nothing); not a cancelled one."""
    row = conn.execute(
        """SELECT (details ->> 'job_id')::bigint FROM backfill.events
           WHERE job_id = %s AND kind = 'phase2' ORDER BY id DESC LIMIT 1""",
        (move.id,)).fetchone()
    if row is not None and row[0] is not None:
        job = store.get_job(conn, int(row[0]))
        return job if job.state != S.CANCELLED else None
    # Moves whose delete phase was made before it was recorded: by name, and only a delete
    # of the same source table from the same source.
    found = [j for j in store.find_jobs_by_name(conn, _phase2_name(move.id))
             if j.state != S.CANCELLED and j.kind == "delete"
             and j.spec.source_dsn == move.spec.source_dsn and j.source_oid == move.source_oid]
    return found[0] if found else None


@dataclass(frozen=True)
class Plan:
    """What ``run --dry-run`` shows: the job's shape and its first batch, nothing written."""

    table: str
    kind: str
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    rows_estimate: int | None
    batch_size: int
    first_batch: tuple[str, str] | None
    statement: str
    explain: str
    options: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table, "kind": self.kind, "key": list(self.key),
            "key_types": list(self.key_types), "rows_estimate": self.rows_estimate,
            "batch_size": self.batch_size,
            "first_batch": list(self.first_batch) if self.first_batch else None,
            "statement": self.statement, "explain": self.explain, "options": self.options,
        }


class Backfill:
    """A handle on one database: its state schema and its jobs."""

    def __init__(self, dsn: str, *, actor: str | None = None, jobs_module: str = "jobs") -> None:
        self.dsn = dsn
        self.actor = actor or default_actor()
        self.jobs_module = jobs_module
        self._registry: registry_mod.Registry | None = None

    @contextmanager
    def _conn(self, *, check_schema: bool = True) -> Iterator[Conn]:
        conn = connect(self.dsn)
        try:
            if check_schema:
                require_current(conn)
            yield conn
        finally:
            conn.close()

    @property
    def registry(self) -> registry_mod.Registry:
        if self._registry is None:
            self._registry = registry_mod.load(self.jobs_module)
        return self._registry

    # -- schema -------------------------------------------------------------------------

    def upgrade(self) -> tuple[int, int]:
        """Create or upgrade the ``backfill`` state schema; returns (before, after) versions."""
        with self._conn(check_schema=False) as conn:
            return upgrade_conn(conn)

    # -- jobs ---------------------------------------------------------------------------

    def spec_for(self, spec_or_name: JobSpec | str, **options: Any) -> JobSpec:
        spec = self.registry.get(spec_or_name).spec() if isinstance(spec_or_name, str) else spec_or_name
        return spec.with_options(**options) if options else spec

    def enqueue(self, spec_or_name: JobSpec | str, *, workers: bool = False,
                **options: Any) -> store.JobRecord:
        """Validate the job against the database (dry EXPLAIN included) and store it as pending.

        ``workers=True`` marks it for the Celery workers: their reaper starts it within one
        pass (``workers.tasks.dispatch`` starts it at once); otherwise ``run`` executes it inline.

        Raises an :class:`~backfill.core.errors.InvalidInput` subclass, writing nothing, when the
        table, columns, key or SQL are wrong, or another active job writes the same columns.
        """
        spec = self.spec_for(spec_or_name, **options)
        with self._conn() as conn:
            return create_job(conn, spec, actor=self.actor, workers=workers)

    def plan(self, spec_or_job: JobSpec | JobRef) -> Plan:
        """The dry run: table, key, estimated rows, first batch bounds, SQL and its EXPLAIN,
        in a transaction that is rolled back."""
        with self._conn() as conn, conn.transaction(force_rollback=True):
            if isinstance(spec_or_job, JobSpec):
                spec = spec_or_job
                prepared = prepare(conn, spec, explain=False)
            elif (isinstance(spec_or_job, str) and not spec_or_job.isdigit()
                  and spec_or_job in self.registry):
                spec = self.registry.get(spec_or_job).spec()
                prepared = prepare(conn, spec, explain=False)
            else:  # a stored job: on its own table and key, as a run would be
                job = self._resolve(conn, spec_or_job)
                spec = job.spec
                prepared = prepare_stored(conn, job, explain=False)
            if prepared.foreign is not None:   # a MySQL source: nothing to EXPLAIN here
                assert prepared.dest is not None
                return Plan(
                    table=f"{prepared.foreign.describe()}", kind=spec.kind, key=prepared.key,
                    key_types=prepared.key_types, rows_estimate=prepared.table.rows_estimate,
                    batch_size=spec.options.batch_size, first_batch=None,
                    statement=f"COPY {prepared.dest.qualified} "
                              f"({', '.join(prepared.copy_columns)}) FROM STDIN",
                    explain="(rows read from MySQL/MariaDB in keyset batches on "
                            f"({', '.join(prepared.key)}), converted by the job's casts)",
                    options=spec.options.to_json())
            bounds = prepared.first_batch(conn)
            explain = prepared.dry_explain(conn, bounds)
            first_batch = (render_key(bounds[0]), render_key(bounds[1])) if bounds else None
            return Plan(
                table=prepared.table.qualified, kind=spec.kind, key=prepared.key,
                key_types=prepared.key_types, rows_estimate=prepared.table.rows_estimate,
                batch_size=spec.options.batch_size, first_batch=first_batch,
                statement=prepared.write_statement(lower=False).as_string(conn),
                explain=explain, options=spec.options.to_json(),
            )

    def _resolve(self, conn: Conn, ref: JobRef) -> store.JobRecord:
        if isinstance(ref, store.JobRecord):
            return store.get_job(conn, ref.id)
        if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isascii()
                                    and ref.strip().isdigit()):  # not '²': a digit, not int
            return store.get_job(conn, int(ref))
        jobs = store.find_jobs_by_name(conn, ref)
        if not jobs:
            hint = (" (it is defined: `backfill enqueue " + ref + "` creates it)"
                    if ref in self.registry else "")
            raise JobNotFound(f"no job with id or name {ref!r}{hint}")
        active = [j for j in jobs if j.state not in TERMINAL]
        return active[0] if active else jobs[0]

    def get(self, ref: JobRef) -> store.JobRecord:
        with self._conn() as conn:
            return self._resolve(conn, ref)

    def list(self, *, include_finished: bool = False, limit: int | None = None,
             offset: int = 0) -> builtins.list[store.JobRecord]:
        """Jobs, failed and active ones first (see :data:`store.LIST_ORDER`); all of them
        unless ``limit``."""
        with self._conn() as conn:
            return store.list_jobs(conn, include_finished=include_finished, limit=limit,
                                   offset=offset)

    def overview(
        self, *, include_finished: bool = False, limit: int | None = None, offset: int = 0,
    ) -> builtins.list[tuple[store.JobRecord, checkpoints.Progress]]:
        """Jobs with their progress, read over one connection (for list and watch). A job
        throttled by a controller that is gone says so in its reason."""
        return self.page(include_finished=include_finished, limit=limit, offset=offset).jobs

    def page(self, *, include_finished: bool = False, limit: int | None = None,
             offset: int = 0) -> views.JobPage:
        """One page of jobs with their progress, and how many there are in all and per state."""
        from backfill.state import views

        if (limit is not None and limit < 0) or offset < 0:
            raise InvalidInput("limit and offset must not be negative")
        with self._conn() as conn:
            return views.job_page(conn, include_finished=include_finished, limit=limit,
                                  offset=offset)

    def inspect(self, ref: JobRef) -> tuple[store.JobRecord, checkpoints.Progress,
                                            builtins.list[store.Event],
                                            builtins.list[leases.SliceRecord]]:
        """A job with its progress, events and slices, read over one connection (for show).
        A job throttled by a controller that is gone says so in its reason."""
        from backfill.state import checkpoints, control, leases

        with self._conn() as conn:
            [job] = control.with_unwatched_notes(conn, [self._resolve(conn, ref)])
            return (job, checkpoints.progress(conn, job.id), store.events(conn, job.id),
                    leases.slices(conn, job.id))

    def events(self, ref: JobRef) -> builtins.list[store.Event]:
        with self._conn() as conn:
            return store.events(conn, self._resolve(conn, ref).id)

    def progress(self, ref: JobRef) -> checkpoints.Progress:
        from backfill.state import checkpoints

        with self._conn() as conn:
            return checkpoints.progress(conn, self._resolve(conn, ref).id)

    def slices(self, ref: JobRef) -> builtins.list[leases.SliceRecord]:
        from backfill.state import leases

        with self._conn() as conn:
            return leases.slices(conn, self._resolve(conn, ref).id)

    # -- operator actions ---------------------------------------------------------------

    def _transition(self, ref: JobRef, to: JobState, reason: str | None,
                    expect: frozenset[JobState] | None = None,
                    action: str | None = None) -> store.JobRecord:
        with self._conn() as conn:
            job = self._resolve(conn, ref)
            return store.transition(conn, job.id, to, actor=self.actor, reason=reason,
                                    expect=expect, action=action)

    def pause(self, ref: JobRef, reason: str | None = None) -> store.JobRecord:
        """Pause: the runner stops before its next checkpoint (a batch in flight is rolled
        back); everything checkpointed is kept."""
        return self._transition(ref, S.PAUSED, reason or "paused by operator")

    def resume(self, ref: JobRef, reason: str | None = None) -> store.JobRecord:
        """paused -> pending: a runner (``backfill run``) or a worker picks it up again.

        throttled -> running: the operator overrides the controller's throttle, recorded
        with their name, the reason and the throttle it lifted. For a job whose controller is
        gone (fail-closed keeps it throttled, and only a live controller resumes it); a live
        controller throttles it again at its next poll if a signal still breaches."""
        with self._conn() as conn:
            job = self._resolve(conn, ref)
            if job.state == S.THROTTLED:
                return store.transition(
                    conn, job.id, S.RUNNING, actor=self.actor,
                    reason="operator override of the controller's throttle: "
                           + (reason or "resumed by operator"),
                    expect=frozenset({S.THROTTLED}), action="resume",
                    details={"override": "throttle", "throttled_for": job.state_reason})
            return store.transition(conn, job.id, S.PENDING, actor=self.actor,
                                    reason=reason or "resumed by operator",
                                    expect=frozenset({S.PAUSED}), action="resume")

    def cancel(self, ref: JobRef, reason: str | None = None) -> store.JobRecord:
        return self._transition(ref, S.CANCELLED, reason or "cancelled by operator")

    def approve(self, ref: JobRef, reason: str | None = None) -> store.JobRecord:
        """awaiting_approval -> pending once the canary verified: the rest of the job runs
        (``backfill run`` again inline; on the workers, their reaper sends it)."""
        from backfill.engine.canary import approve

        with self._conn() as conn:
            job = self._resolve(conn, ref)
            return approve(conn, job, actor=self.actor, reason=reason or "approved by operator")

    def rehearse(self, ref: JobRef, on: str) -> Rehearsal:
        """Run the job for real on a clone (``on``: its DSN), measure rows/s, WAL, batch
        durations and lock waits, verify it, and keep the figures on this job."""
        from backfill.engine.runner import Runner
        from backfill.safety.rehearsal import rehearse

        job = self.get(ref)

        def run(dsn: str, job_id: int) -> store.JobRecord:

            return Runner(dsn, job_id, actor=self.actor).run()

        return rehearse(self.dsn, on, job, actor=self.actor, run=run)

    def rehearsal(self, ref: JobRef) -> dict[str, Any] | None:
        """The last rehearsal's figures, if the job was rehearsed."""
        from backfill.safety.rehearsal import latest

        with self._conn() as conn:
            return latest(conn, self._resolve(conn, ref).id)

    def canary(self, ref: JobRef) -> dict[str, Any] | None:
        """The canary's rows, seconds, rows/s and verification, once it ran."""
        from backfill.state import checkpoints

        with self._conn() as conn:
            return checkpoints.canary_report(conn, self._resolve(conn, ref).id)

    def retry(self, ref: JobRef, reason: str | None = None) -> store.JobRecord:
        """failed -> pending; the next run resumes from the checkpoint."""
        return self._transition(ref, S.PENDING, reason or "retried by operator",
                                expect=frozenset({S.FAILED}), action="retry")

    def tune(self, ref: JobRef, **changes: Any) -> store.JobRecord:
        """Change options (``batch_size``, ``target_duration``, ``rate``, ``pause``, …);
        a running job applies them before its next batch, whichever process runs it."""
        if not any(v is not None for v in changes.values()):
            raise InvalidInput("nothing to tune: give at least one option")
        with self._conn() as conn:
            job = self._resolve(conn, ref)
            return store.tune(conn, job.id, changes, actor=self.actor)

    # -- running ------------------------------------------------------------------------

    def preflight(self, ref: JobRef, *, config: PreflightConfig | None = None,
                  record: bool = True) -> builtins.list[Check]:
        """Run the pre-flight checks for ``ref`` (an event records them); writes nothing."""
        from backfill.safety.preflight import PreflightConfig, blocked, run_checks

        with self._conn() as conn:
            job = self._resolve(conn, ref)
            checks = run_checks(conn, job, config or PreflightConfig.load(), self.dsn)
            if record:
                failed = blocked(checks)
                store.add_event(conn, job.id, "preflight", actor=self.actor,
                                reason=("blocked: " + "; ".join(f"{c.name}: {c.reason}"
                                                                for c in failed))
                                if failed else "all checks passed or warned",
                                details={"checks": [c.to_json() for c in checks]})
            return checks

    def gate(self, job: store.JobRecord, *, skip: bool = False,
             config: PreflightConfig | None = None) -> None:
        """Before a job's first write: the pre-flight checks, or a recorded skip."""
        # Never started: pending, or paused before its first batch (by an operator, or by a
        # failed pre-flight on the workers). Every such start goes through here.
        if job.state not in (S.PENDING, S.PAUSED) or job.started_at is not None:
            return
        with self._conn() as conn:
            self._gate(conn, job, skip=skip, config=config)

    def _gate(self, conn: Conn, job: store.JobRecord, *, skip: bool,
              config: PreflightConfig | None) -> None:
        from backfill.safety.preflight import PreflightConfig
        from backfill.safety.preflight import gate as preflight_gate

        if job.state not in (S.PENDING, S.PAUSED) or job.started_at is not None:
            return
        if skip:
            store.add_event(conn, job.id, "preflight_skipped", actor=self.actor,
                            reason=f"pre-flight skipped by {self.actor} (--skip-preflight)")
            return
        preflight_gate(conn, store.get_job(conn, job.id), config or PreflightConfig.load(),
                       self.dsn, actor=self.actor)

    def run(
        self,
        ref: JobRef | JobSpec,
        *,
        stop: threading.Event | None = None,
        on_tick: Callable[[Tick], None] | None = None,
        takeover_after_s: float = 30.0,
        skip_preflight: bool = False,
        preflight: PreflightConfig | None = None,
    ) -> store.JobRecord:
        """Run a job inline until it ends or is paused. A spec or a defined name with no
        active job is enqueued first. Before the first write the pre-flight gate runs
        (:class:`PreflightFailed`, nothing written, when a check fails). Returns the job as
        it stands afterwards."""
        from backfill.engine.runner import Runner

        job: store.JobRecord | None = None
        stored: JobRef | None = None
        if isinstance(ref, JobSpec):
            job = self.enqueue(ref)
        elif isinstance(ref, str) and not ref.strip().isdigit() and ref in self.registry:
            with self._conn() as conn:
                existing = [j for j in store.find_jobs_by_name(conn, ref)
                            if j.state not in TERMINAL]
            job = existing[0] if existing else self.enqueue(ref)
        else:
            stored = ref
        if stored is not None:  # the job and its gate over one connection (fixed costs, issue 16)
            with self._conn() as conn:
                job = self._resolve(conn, stored)
                self._gate(conn, job, skip=skip_preflight, config=preflight)
        else:
            assert job is not None
            self.gate(job, skip=skip_preflight, config=preflight)
        while True:
            cross_move = job.kind == "move" and job.spec.source_dsn is not None
            if not (cross_move and job.state == S.SUCCEEDED):
                runner = Runner(self.dsn, job.id, actor=self.actor, stop=stop,
                                on_tick=on_tick, takeover_after_s=takeover_after_s)
                job = runner.run()
            if cross_move and job.state == S.SUCCEEDED:
                # A cross-database move's second phase: delete what the copy wrote. Created
                # here once (by this run, or by any later `run` of the move if this process
                # died or the source was unreachable right after the copy), then resumed.
                phase2 = self._move_delete_phase(job)
                if phase2 is None or phase2.state == S.SUCCEEDED:
                    return job   # nothing to delete (an empty range), or deleted already
                done = self.run(phase2.id, stop=stop, on_tick=on_tick,
                                takeover_after_s=takeover_after_s,
                                skip_preflight=skip_preflight, preflight=preflight)
                return job if done.state == S.SUCCEEDED else done
            if job.state != S.AWAITING_APPROVAL or job.spec.auto_approve_after_ms is None:
                return job
            # --auto-approve-after: wait out the quiet period here, then go on by itself.
            if not self._wait_auto_approval(job, stop):
                return self.get(job.id)

    def move_phase2(self, move: JobRef) -> store.JobRecord | None:
        """The second job of a cross-database move, once created (not a cancelled one)."""
        with self._conn() as conn:
            return _phase2(conn, self._resolve(conn, move))

    def _move_delete_phase(self, move: store.JobRecord) -> store.JobRecord | None:
        """The delete job of a cross-database move (created once): the source rows of the
        copied range, each batch deleted only if it matches the destination."""
        from backfill.state import leases

        with self._conn() as conn:
            existing = _phase2(conn, move)
            if existing is not None:
                return existing
            slices = leases.slices(conn, move.id)
            codec = KeyCodec(move.key_types)
            uppers = [u for u in (codec.decode(s.upper_bound) for s in slices) if u is not None]
            if not uppers:
                return None
            upper = max(uppers)
            keys = sql.SQL(", ").join(map(sql.Identifier, move.key_columns))
            bound = sql.SQL("ROW({}) <= ROW({})").format(
                keys, sql.SQL(", ").join(map(sql.Literal, upper))).as_string(conn)
            where = f"({move.spec.where}) AND {bound}" if move.spec.where else bound
            spec = dataclasses.replace(
                move.spec, kind="delete",
                table=sqltext.render_qualified(move.source_schema, move.source_table),
                where=where, undo_log=False, name=_phase2_name(move.id), key=tuple(move.key_columns),
                canary=None, auto_approve_after_ms=None)
            with conn.transaction():
                job = create_job(conn, spec, actor=self.actor, workers=False)
                if job.source_oid != move.source_oid:
                    raise InvalidInput(
                        f"move job {move.id}: its source table {job.table} was dropped and "
                        "recreated since the copy; nothing is deleted there. Reconcile the "
                        "two databases by hand")
                store.add_event(conn, move.id, "phase2", actor=self.actor,
                                reason=f"copy phase done; job {job.id} deletes the copied rows "
                                       "from the source, range by range, each checked against "
                                       "the destination first", details={"job_id": job.id})
            return job

    def _wait_auto_approval(self, job: store.JobRecord, stop: threading.Event | None) -> bool:
        from backfill.engine.canary import approve, auto_approval_due

        stop = stop or threading.Event()
        while not stop.is_set():
            with self._conn() as conn:
                current = store.get_job(conn, job.id)
                if current.state != S.AWAITING_APPROVAL:
                    return current.state == S.PENDING
                due = auto_approval_due(conn, current)
                if due is False:
                    return False     # withheld: an operator decides
                if due is True:
                    approve(conn, current, actor="auto-approve",
                            reason="auto-approved after a quiet period")
                    return True
            stop.wait(min(1.0, (job.spec.auto_approve_after_ms or 1000) / 1000.0))
        return False

    def wait(self, ref: JobRef, *, timeout: float | None = None, poll: float = 0.5,
             until: frozenset[JobState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
             ) -> store.JobRecord:
        """Block until the job reaches one of ``until`` (default: an end state)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(ref)
            if job.state in until:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job.id} is still {job.state} after {timeout}s")
            time.sleep(poll)

    # -- undo logs ----------------------------------------------------------------------

    def revert(self, ref: JobRef, *, force: bool = False, workers: bool = False,
               **options: Any) -> store.JobRecord:
        """Enqueue a job that applies ``ref``'s undo log back: each row the job changed gets
        its old values (deleted rows come back), batched and checkpointed like any job. Rows
        changed since by someone else are left alone and counted, unless ``force``."""
        from backfill.engine.undo import undo_log_exists

        with self._conn() as conn:
            job = self._resolve(conn, ref)
            if not job.spec.undo_enabled:
                why = ("it was enqueued with undo_log off" if job.kind in UNDOABLE else
                       f"{job.kind} jobs keep no undo log")
                raise InvalidInput(f"job {job.id} cannot be reverted: {why}")
            if job.state in ACTIVE:
                raise InvalidInput(f"job {job.id} is {job.state}: cancel it (or let it finish) "
                                   "before reverting it")
            undo = undo_table(job.id).as_string(conn)
            spec = JobSpec("revert", f"backfill.undo_{job.id}",
                           dest=sqltext.render_qualified(job.source_schema, job.source_table),
                           reverts=job.id, on_conflict="update" if force else "nothing",
                           name=f"revert job {job.id}" + (" (force)" if force else ""),
                           options=job.options).with_options(**options)
            with conn.transaction():
                # The job's row lock, as prune takes it: the undo log cannot go meanwhile.
                conn.execute("SELECT 1 FROM backfill.jobs WHERE id = %s FOR UPDATE", (job.id,))
                if not undo_log_exists(conn, job.id):
                    raise InvalidInput(f"job {job.id}'s undo log {undo} was pruned; it cannot "
                                       "be reverted")
                # Written without an index (cheaper per batch): keyed now, for the walk.
                index_undo_table(conn, job.id, tuple(job.key_columns))
                rec = create_job(conn, spec, actor=self.actor, workers=workers)
                if job.state == S.FAILED:
                    # A retry after the revert would resume past the reverted range.
                    store.transition(conn, job.id, S.CANCELLED, actor=self.actor,
                                     reason=f"reverted by job {rec.id}")
            return rec

    def undo_logs(self) -> builtins.list[UndoLog]:
        """Every undo table with its job, rows and size."""
        from backfill.engine.undo import list_undo_logs

        with self._conn() as conn:
            return list_undo_logs(conn)

    def prune_undo_logs(self, *, older_than_s: float, dry_run: bool = False
                        ) -> builtins.list[UndoLog]:
        """Drop the undo logs of jobs that ended more than ``older_than_s`` ago (and are not
        being reverted); each drop is an event on its job."""
        from backfill.engine.undo import list_undo_logs

        with self._conn() as conn:
            gone = [u for u in list_undo_logs(conn)
                    if u.ended_s_ago is not None and u.ended_s_ago > older_than_s
                    and not u.reverting]
            if dry_run:
                return gone
            for u in gone:
                with conn.transaction():
                    # The job's row lock, as revert takes it; then check no revert came since.
                    conn.execute("SELECT 1 FROM backfill.jobs WHERE id = %s FOR UPDATE",
                                 (u.job_id,))
                    busy = conn.execute(
                        """SELECT 1 FROM backfill.jobs WHERE kind = 'revert'
                             AND (spec ->> 'reverts')::bigint = %s AND state IN
                             ('pending', 'running', 'throttled', 'paused', 'awaiting_approval')""",
                        (u.job_id,)).fetchone()
                    if busy:
                        continue
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(undo_table(u.job_id)))
                    store.add_event(conn, u.job_id, "undo_pruned", actor=self.actor,
                                    reason=f"undo log dropped ({u.rows} rows, {u.bytes} bytes)",
                                    details={"rows": u.rows, "bytes": u.bytes})
            return gone

    def verify(self, ref: JobRef, *, chunk: int = 50_000) -> VerifyReport:
        from backfill.engine.verify import verify

        with self._conn() as conn:
            return verify(conn, self._resolve(conn, ref).id, chunk=chunk)


__all__ = ["Backfill", "KeyCodec", "Plan"]
