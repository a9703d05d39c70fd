"""``backfill enqueue`` and ``backfill run``: a job is made, then run inline with a live
progress view, or sent to the workers."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from backfill.cli import base
from backfill.cli.base import (
    EXIT_INTERRUPTED,
    EXIT_PAUSED,
    app,
    cli_settings,
    client,
    err,
    escape,
    fail,
    guard,
    interruptible,
    out,
    seconds_option,
)
from backfill.cli.render import canary_text, job_json
from backfill.core import logs
from backfill.core.durations import format_duration, parse_duration_ms
from backfill.core.errors import BackfillError, BrokerMisconfigured, BrokerUnavailable, InvalidInput
from backfill.job.states import JobState

if TYPE_CHECKING:
    from backfill.api import Backfill
    from backfill.engine.runner import Tick
    from backfill.job.spec import JobSpec
    from backfill.state import store

# The API, the engine, psycopg, pglast (through job.spec and core.sqltext) and rich.progress
# are imported by the commands that use them, not by `--help` (fixed costs, issue 16).

# -- enqueue ----------------------------------------------------------------------------------

OptBatch = Annotated[str | None, typer.Option("--batch-size", help="Starting rows per batch.")]
OptMinBatch = Annotated[str | None, typer.Option("--min-batch-size")]
OptMaxBatch = Annotated[str | None, typer.Option("--max-batch-size")]
OptTarget = Annotated[str | None, typer.Option(
    "--target-duration", help="Batch duration the size adapts to (e.g. 500ms, 2s).")]
OptRate = Annotated[str | None, typer.Option("--rate", help="Rows/s cap (0 or none: no cap).")]
OptPause = Annotated[str | None, typer.Option("--pause", help="Sleep between batches (e.g. 100ms).")]
OptStmt = Annotated[str | None, typer.Option("--statement-timeout", help="Per batch (e.g. 30s).")]
OptLock = Annotated[str | None, typer.Option("--lock-timeout", help="Per batch (e.g. 2s).")]
OptRetries = Annotated[str | None, typer.Option("--max-retries", help="Per batch.")]
OptLockWait = Annotated[str | None, typer.Option(
    "--lock-wait-budget", help="Longest an application session may wait behind a batch's "
    "locks (e.g. 100ms): batches that make one wait longer get smaller (0: no bound).")]
OptParallel = Annotated[str | None, typer.Option(
    "--parallelism", help="Slices of about equal row counts, sampled from the table; on the "
    "workers, how many run at once (changeable any time).")]


def _option_changes(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def enqueue(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(
        help="A defined job (see `backfill list --defined`); or give --table and a kind.",
        show_default=False)] = None,
    table: Annotated[str | None, typer.Option("--table", "-t", help=(
        "Source table, written as in SQL: orders, app.orders, \"Sales Data\".\"Order-Items\" "
        "(unquoted names fold to lower case; quotes keep case, spaces and dots). --dest, "
        "--key and --columns read names the same way."))] = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", help="update, sql, copy, move, transform or delete (inferred when clear).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="`column = expression` (repeatable), for update jobs.")] = None,
    where: Annotated[str | None, typer.Option(
        "--where", help="Extra predicate per batch: one SQL expression.")] = None,
    statement: Annotated[str | None, typer.Option(
        "--sql", help="Per-batch statement; bounds in %(lower)s / %(upper)s (inclusive).")] = None,
    dest: Annotated[str | None, typer.Option("--dest", help="Destination table (copy/move).")] = None,
    columns: Annotated[str | None, typer.Option(
        "--columns", help="Comma-separated columns (copy/move: copied; transform: read).")] = None,
    on_conflict: Annotated[str, typer.Option(
        "--on-conflict", help="copy/move: error, nothing or update.")] = "error",
    function: Annotated[str | None, typer.Option(
        "--function", help="transform: module:function applied to each row.")] = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="Key columns, comma-separated (default: the primary key).")] = None,
    job_name: Annotated[str | None, typer.Option("--name", help="A name for an ad hoc job.")] = None,
    batch_size: OptBatch = None,
    min_batch_size: OptMinBatch = None,
    max_batch_size: OptMaxBatch = None,
    target_duration: OptTarget = None,
    rate: OptRate = None,
    pause: OptPause = None,
    statement_timeout: OptStmt = None,
    lock_timeout: OptLock = None,
    max_retries: OptRetries = None,
    parallelism: OptParallel = None,
    lock_wait_budget: OptLockWait = None,
    workers: Annotated[bool, typer.Option(
        "--workers", help="Run it on the Celery workers: dispatched at once, or by the "
        "workers' reaper if the broker is down.")] = False,
    source: Annotated[str | None, typer.Option(
        "--source", help="copy: read --table from this other database, PostgreSQL or "
        "mysql://user@host:port/db (a DSN without password: use ~/.pgpass or ~/.my.cnf); "
        "the job's state lives here, with the written rows.",
        show_default=False)] = None,
    cast: Annotated[list[str] | None, typer.Option(
        "--cast", help="copy from MySQL/MariaDB: table.column=pgtype, as given to "
        "convert-schema (repeatable).", show_default=False)] = None,
    column_map: Annotated[list[str] | None, typer.Option(
        "--map", help="copy: `dest_column=source_column` for a renamed column (repeatable).",
        show_default=False)] = None,
    canary: Annotated[str | None, typer.Option(
        "--canary", help="Run this many rows first (5000, or 2%), verify them, then wait in "
        "awaiting_approval for `backfill approve`.", show_default=False)] = None,
    auto_approve_after: Annotated[str | None, typer.Option(
        "--auto-approve-after", help="With --canary: approve by itself after this quiet "
        "period (10m) if nothing was retried, throttled or failed.", show_default=False)] = None,
    undo_log: Annotated[bool | None, typer.Option(
        "--undo-log/--no-undo-log", help="Keep every changed row's old values (deleted rows "
        "whole) so `backfill revert` can restore them (default: on for update, transform and "
        "delete).", show_default=False)] = None,
    skip_preflight: Annotated[bool, typer.Option(
        "--skip-preflight", help="With --workers: start without the pre-flight checks "
        "(recorded as an event).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate a job against the database (dry EXPLAIN included) and store it as pending.

    Nothing is written to your tables; `backfill run JOB` executes it inline, or with
    --workers the Celery workers do.
    """
    bf = client(ctx)
    options = _option_changes(
        batch_size=batch_size, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
        target_duration=target_duration, rate=rate, pause=pause,
        statement_timeout=statement_timeout, lock_timeout=lock_timeout, max_retries=max_retries,
        parallelism=parallelism, lock_wait_budget=lock_wait_budget)

    def build() -> store.JobRecord:
        from backfill.core.sqltext import identifier

        spec: JobSpec | str
        if name is not None:
            if any(v is not None for v in (table, kind, set_, statement, dest, function)):
                raise InvalidInput("give either a defined job name or --table/--kind options, not both")
            spec = name
        else:
            spec = _adhoc_spec(table, kind, set_, where, statement, dest, columns, on_conflict,
                               function, key, job_name)
        changes: dict[str, Any] = {}
        if source is not None:
            changes["source_dsn"] = source
        if cast:
            changes["casts"] = tuple(cast)
        if column_map:
            pairs = [m.split("=", 1) for m in column_map]
            if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
                raise InvalidInput("--map takes dest_column=source_column")
            changes["column_map"] = tuple((identifier(d, slot="--map column"),
                                           identifier(s, slot="--map column")) for d, s in pairs)
        if undo_log is not None:
            changes["undo_log"] = undo_log
        if canary is not None:
            changes["canary"] = canary
        if auto_approve_after is not None:
            changes["auto_approve_after_ms"] = parse_duration_ms(
                auto_approve_after, option="--auto-approve-after")
        if changes:
            base = bf.spec_for(spec) if isinstance(spec, str) else spec
            spec = dataclasses.replace(base, **changes)
        return bf.enqueue(spec, workers=workers, **options)

    job = guard(build)
    if skip_preflight:
        guard(lambda: bf.gate(job, skip=True))
    if workers:
        send_to_workers(ctx, job.id, "enqueued")
    if quiet:
        out.print(job.id)
    elif as_json:
        out.print_json(json.dumps(job_json(job), default=str))
    elif workers:
        out.print(f"enqueued job {job.id} ({job.name}) on {job.table}, key "
                  f"({', '.join(job.key_columns)}), and sent it to the workers: "
                  f"`backfill watch {job.id}`")
    else:
        out.print(f"enqueued job {job.id} ({job.name}) on {job.table}, key "
                  f"({', '.join(job.key_columns)}): run it with `backfill run {job.id}`")


def send_to_workers(ctx: typer.Context, job_id: int, what: str) -> None:
    """Dispatch a job marked for the workers; if the broker is down, say so and exit 1 (the
    job stays pending, and the workers' reaper starts it once the broker is back)."""
    hook = base.DISPATCH_HOOK
    if hook is None:
        fail(f"job {job_id} is {what} for the workers, but the workers package (Celery) is "
              "not installed here: the workers' reaper starts it", 1)
    s = cli_settings(ctx)
    try:
        hook(s.dsn, job_id, actor=s.actor)
    except BrokerUnavailable as exc:
        fail(f"job {job_id} is {what} and left pending: {exc}; the workers' reaper starts it "
              f"once the broker is back, or `backfill dispatch {job_id}`", 1)
    except BrokerMisconfigured as exc:
        fail(f"job {job_id} is {what} and left pending: {exc}", exc.exit_code)
    except BackfillError as exc:
        fail(str(exc), exc.exit_code)


def _adhoc_spec(table: str | None, kind: str | None, set_: list[str] | None, where: str | None,
                statement: str | None, dest: str | None, columns: str | None, on_conflict: str,
                function: str | None, key: str | None, name: str | None) -> JobSpec:
    from backfill.core.sqltext import identifier_list
    from backfill.job.spec import JobSpec, parse_set

    if not table:
        raise InvalidInput("give a defined job name, or --table with --set/--sql/--dest/--function")
    if kind is None:
        inferred = [k for k, v in (("update", set_), ("sql", statement), ("copy", dest),
                                   ("transform", function)) if v]
        if len(inferred) != 1:
            raise InvalidInput("say what the job does: --set (update), --sql, --dest (copy; "
                               "--kind move to move), --function (transform) or --kind delete")
        kind = inferred[0]
    # Names as SQL reads them: T1 is t1, "Order-Items" keeps its case, "a,b" is one name.
    cols = identifier_list(columns, slot="columns") if columns else ()
    keys = identifier_list(key, slot="key") if key else ()
    return JobSpec(
        kind=kind, table=table, key=keys, set=parse_set(set_ or []) if kind == "update" else (),
        where=where, statement=statement, dest=dest, columns=cols, on_conflict=on_conflict,
        function=function, name=name,
    )


# -- run --------------------------------------------------------------------------------------


@app.command()
def run(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id, or a defined job's name.")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the plan (key, estimated rows, first batch, SQL, EXPLAIN); "
        "write nothing.")] = False,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Live progress bar (default: on a terminal).")] = True,
    takeover_after: Annotated[float, typer.Option(
        "--takeover-after", parser=seconds_option(), metavar="DURATION",
        help="Seconds after which a silent previous runner's job is taken over.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: the plan as JSON.")] = False,
    skip_preflight: Annotated[bool, typer.Option(
        "--skip-preflight", help="Start without the pre-flight checks (recorded as an "
        "event).")] = False,
) -> None:
    """Run a job in this process (no broker) until it finishes. Before its first write the
    pre-flight checks run (a failure writes nothing; --skip-preflight is recorded). Ctrl-C
    pauses it with the checkpoint kept; running it again resumes. Exit: 0 done, 1 failed,
    3 paused, throttled or awaiting approval, 130 Ctrl-C."""
    bf = client(ctx)
    if dry_run:
        plan = guard(lambda: bf.plan(job))
        if as_json:
            out.print_json(json.dumps(plan.to_json(), default=str))
            return
        estimate = plan.rows_estimate if plan.rows_estimate is not None else "unknown (not analyzed)"
        out.print(f"[bold]dry run[/] - nothing will be written\n"
                  f"table:          {plan.table}\nkind:           {plan.kind}\n"
                  f"key:            ({', '.join(plan.key)}) {', '.join(plan.key_types)}\n"
                  f"estimated rows: {estimate}\n"
                  f"batch size:     {plan.batch_size} (adapts toward "
                  f"{plan.options['target_duration_ms']:.0f} ms per batch)\n"
                  f"first batch:    "
                  + (f"keys {plan.first_batch[0]} .. {plan.first_batch[1]}" if plan.first_batch
                     else "none (table is empty)"), highlight=False)
        out.print("statement per batch:", highlight=False)
        out.print(f"  {escape(plan.statement)}", highlight=False, soft_wrap=True)
        out.print("EXPLAIN (first batch):", highlight=False)
        for line in plan.explain.splitlines():
            out.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
        return

    view = _ProgressView(progress and out.is_terminal)

    def go(stop: threading.Event) -> store.JobRecord:
        with view:
            return guard(lambda: bf.run(job, stop=stop, on_tick=view.tick,
                                         takeover_after_s=takeover_after,
                                         skip_preflight=skip_preflight))

    result, interrupted = interruptible(
        go, stopping="pausing after the current batch (Ctrl-C again to abort it)",
        aborted="the batch in flight was rolled back; the job keeps its last checkpoint (it "
                "may show as running until taken over; `backfill run` again resumes it)")
    _report_run(bf, result, interrupted)


class _ProgressView:
    """A rich progress bar on a terminal; a log line every few seconds elsewhere."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.progress: Any = self._bar() if show_bar else None  # rich.progress: ~15 ms
        self.task: Any = None
        self.last_log = 0.0
        self.log = logs.get_logger()

    @staticmethod
    def _bar() -> Any:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("batch {task.fields[size]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=err.console,
            transient=False,
        )

    def __enter__(self) -> _ProgressView:
        if self.show_bar:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.show_bar:
            self.progress.__exit__(None, None, None)

    def tick(self, t: Tick) -> None:
        from backfill.engine.throttle import eta_seconds

        total = t.job.rows_estimate or None
        if total is not None and t.rows_scanned > total:
            total = t.rows_scanned
        eta = eta_seconds(t.rows_scanned, total, _capped_rate(t))
        fields: dict[str, Any] = {
            "rows": f"{t.rows_scanned:,}/{total:,}" if total else f"{t.rows_scanned:,}",
            "rate": f"{t.rows_per_s:,.0f} rows/s" if t.rows_per_s else "- rows/s",
            "size": f"{t.batch_size:,}",
            "eta": format_duration(eta),
            "note": f"[yellow]{t.state}: {t.note}[/]" if t.state == JobState.THROTTLED else "",
        }
        if self.show_bar:
            if self.task is None:
                self.task = self.progress.add_task(f"job {t.job.id}", total=total, **fields)
            self.progress.update(self.task, completed=t.rows_scanned, total=total, **fields)
            return
        now = time.monotonic()
        if t.state == JobState.SUCCEEDED:
            return  # the runner logs job.succeeded with the totals
        if now - self.last_log >= 5.0:
            self.last_log = now
            self.log.info("job.progress", job_id=t.job.id, state=str(t.state),
                          rows_done=t.rows_scanned, rows_total=total,
                          rows_per_s=round(t.rows_per_s or 0), batch_size=t.batch_size,
                          eta_s=round(eta) if eta is not None else None)


def _capped_rate(t: Tick) -> float | None:
    """The run's measured rows/s, within what the job's limits allow (before the second batch,
    only the limits say how fast a `--rate 5` job goes)."""
    from backfill.state import pace

    opts = t.job.options
    cap, _ = pace.ceiling(pace.Limits(
        rate_limit=opts.rate_limit, rows_share=t.job.rate_share,
        batches_share=t.job.batch_rate_share, pause_s=opts.pause_ms / 1000,
        batch_size=t.batch_size), None, (t.batch.duration_ms / 1000) if t.batch else 0.0)
    if t.rows_per_s is None:
        return cap
    return min(t.rows_per_s, cap) if cap is not None else t.rows_per_s


def _report_run(bf: Backfill, job: store.JobRecord, interrupted: bool) -> None:
    prog = guard(lambda: bf.progress(job.id))
    if job.state == JobState.SUCCEEDED:
        elapsed = ((job.finished_at - job.started_at).total_seconds()
                   if job.finished_at and job.started_at else None)
        out.print(f"job {job.id} succeeded: {prog.rows_scanned:,} rows in range, "
                  f"{prog.rows_affected:,} changed, {prog.batches:,} batches"
                  + (f", {format_duration(elapsed)} since first start" if elapsed else ""))
        return
    if job.state == JobState.FAILED:
        fail(f"job {job.id} failed: {job.state_reason}\n"
              f"  fix the cause, then `backfill retry {job.id}` and `backfill run {job.id}` "
              "(it resumes from the checkpoint)", 1)
    if job.state == JobState.CANCELLED:
        fail(f"job {job.id} was cancelled: {job.state_reason}", 1)
    if job.state == JobState.AWAITING_APPROVAL:
        canary = guard(lambda: bf.canary(job.id))
        err.print(escape(f"job {job.id} ran its canary and waits for approval: "
                         + canary_text(job, canary)
                         + f"\n  `backfill approve {job.id}` lets the rest run (then "
                           f"`backfill run {job.id}`); `backfill revert {job.id}` after "
                           "cancelling it undoes the canary"), highlight=False)
        raise typer.Exit(EXIT_PAUSED)
    if interrupted and job.state == JobState.PAUSED:
        err.print(f"job {job.id} paused at {prog.rows_scanned:,} rows; "
                  f"`backfill run {job.id}` resumes it")
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(escape(f"job {job.id} is {job.state}"
                     + (f": {job.state_reason}" if job.state_reason else "")))
    raise typer.Exit(EXIT_PAUSED)
