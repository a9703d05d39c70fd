"""The ``backfill`` command line: operators' and scripts' entry point.

Exit codes: 0 success; 1 operational failure (job failed or cancelled, database unreachable,
verify found differences, a pre-flight check failed); 2 bad input (nothing was written); 3 the
job is paused or throttled (by an operator or the controller), or its canary awaits approval;
130 interrupted with Ctrl-C (job paused, checkpoint kept).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import psycopg
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from backfill.api import Backfill, default_actor
from backfill.core import logs
from backfill.core.db import connect, describe, redact_text
from backfill.core.durations import format_duration, parse_duration_ms
from backfill.core.errors import BackfillError, BrokerMisconfigured, BrokerUnavailable, InvalidInput
from backfill.core.settings import Settings, dsn_from_env
from backfill.core.sqltext import identifier, identifier_list
from backfill.engine.runner import Tick
from backfill.engine.throttle import eta_seconds
from backfill.job.spec import JobSpec, parse_set
from backfill.job.states import JobState
from backfill.state import checkpoints, pace, store, views
from backfill.state.schema import LATEST, MIGRATIONS, current_version


def explain_error(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the one line a user sees for an error we expect to meet (bad input, an
    unreadable file, an unreachable database), or ``None`` for one we did not expect (a bug).

    2: the input must be fixed (nothing was written); 1: an operational failure."""
    if isinstance(exc, BackfillError):
        return exc.exit_code, str(exc)
    if isinstance(exc, psycopg.Error):
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return 1, f"database error: {type(exc).__name__}: {redact_text(lines[0]) if lines else ''}"
    if isinstance(exc, UnicodeDecodeError):
        return 2, f"input is not UTF-8 text (byte {exc.start}: {exc.reason})"
    if isinstance(exc, UnicodeError):  # e.g. an argument with bytes that are not UTF-8
        return 2, f"input is not valid text: {exc}"
    if isinstance(exc, ImportError):  # modules users name are checked where they are named
        return 1, f"cannot import {exc.name or 'a module'}: {exc} (is it installed?)"
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return 2, f"cannot read {exc.filename}: {exc.strerror or exc}"
        return 1, f"{exc.strerror or exc}"
    return None


class _Commands(TyperGroup):
    """The root command group: whatever a command raises ends as one line on stderr and an exit
    code, never a traceback. Expected errors (see :func:`explain_error`) exit 2 or 1; anything
    else is a bug, reported as ``internal error`` (exit 1), with its traceback under
    ``--log-level debug``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # the one place errors become exit codes
            known = explain_error(exc)
            settings = ctx.obj
            debug = isinstance(settings, Settings) and settings.log_level.lower() == "debug"
            if known is None:
                if debug:
                    err.print(traceback.format_exc(), markup=False, highlight=False)
                _fail(f"internal error: {type(exc).__name__}: {redact_text(str(exc))} (a bug; "
                      "`--log-level debug` shows the traceback)", 1)
            _fail(known[1], known[0])


app = typer.Typer(
    name="backfill",
    cls=_Commands,
    help="Run large PostgreSQL backfills and data moves safely: keyset batches, checkpoints "
    "in the batch's transaction, live pause/resume/tune.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Create, upgrade and inspect the `backfill` state schema.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")

# Off a terminal, do not wrap at 80 columns: lines go to logs and scripts whole.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
T = TypeVar("T")

EXIT_PAUSED = 3
EXIT_INTERRUPTED = 130

#: The largest count an option takes (PostgreSQL's int): beyond it a value is a typo.
MAX_COUNT = 2**31 - 1


def seconds_option(minimum: float = 0.0) -> Callable[[str], float]:
    """A parser for a duration option in seconds (``2``, ``500ms``, ``1m30s``): finite, not
    negative, at least ``minimum`` and at most a year (a sleep that long is a typo)."""

    def parse(value: str) -> float:
        try:
            seconds = parse_duration_ms(str(value), option="value") / 1000.0
        except InvalidInput as exc:
            raise typer.BadParameter(str(exc).removeprefix("value: ")) from None
        if not minimum <= seconds <= 366 * 86400:
            raise typer.BadParameter(f"{value!r} is not between {minimum:g}s and a year")
        return seconds

    return parse


def positive_number(value: str) -> float:
    """A parser for a finite number above zero (a rate, a budget)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise typer.BadParameter(f"{value!r} is not a finite number above 0")
    return number


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    if not isinstance(settings, Settings) or not settings.dsn:
        raise InvalidInput(
            "no database given: pass --dsn or set BACKFILL_DSN "
            "(e.g. postgresql://user@host:5432/dbname)"
        )
    return settings


def _client(ctx: typer.Context) -> Backfill:
    s = _settings(ctx)
    return Backfill(s.dsn, actor=s.actor, jobs_module=s.jobs_module)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (BackfillError, psycopg.Error) as exc:
        known = explain_error(exc)
        assert known is not None
        _fail(known[1], known[0])


@app.callback()
def main_options(
    ctx: typer.Context,
    dsn: Annotated[str | None, typer.Option(
        "--dsn", help="Database to work on (default: $BACKFILL_DSN, then $DATABASE_URL).",
        show_default=False)] = None,
    actor: Annotated[str | None, typer.Option(
        "--actor", envvar="BACKFILL_ACTOR",
        help="Who you are, recorded with every state change (default: user@host).")] = None,
    jobs_module: Annotated[str, typer.Option(
        "--jobs-module", envvar="BACKFILL_JOBS_MODULE",
        help="Module holding defined jobs (a `registry`).")] = "jobs",
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="BACKFILL_LOG_FORMAT",
        help="auto (console on a terminal, JSON otherwise), json or console.")] = "auto",
    log_level: Annotated[str, typer.Option(
        "--log-level", envvar="BACKFILL_LOG_LEVEL",
        help="debug, info, warning or error (debug logs every batch).")] = "info",
) -> None:
    settings = _guard(lambda: Settings(
        dsn=dsn or dsn_from_env() or "", actor=actor or default_actor(),
        jobs_module=jobs_module, log_format=log_format, log_level=log_level))
    logs.configure(
        json=None if log_format == "auto" else log_format == "json", level=log_level
    )
    ctx.obj = settings


# -- db ---------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the `backfill` schema or apply pending migrations (idempotent, concurrency-safe)."""
    bf = _client(ctx)
    before, after = _guard(bf.upgrade)
    if before == after:
        out.print(f"state schema already at version {after} ({describe(bf.dsn)})")
    else:
        out.print(f"state schema upgraded from version {before} to {after} ({describe(bf.dsn)})")


@db_app.command("status")
def db_status(ctx: typer.Context,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the state schema's version and whether it is current."""
    s = _settings(ctx)

    def read() -> int | None:
        conn = connect(s.dsn)
        try:
            return current_version(conn)
        finally:
            conn.close()

    version = _guard(read)
    state = ("missing" if version is None else "current" if version == LATEST
             else "outdated" if version < LATEST else "newer than this backfill")
    if as_json:
        out.print_json(json.dumps({"version": version, "latest": LATEST, "state": state}))
    else:
        out.print(f"database: {describe(s.dsn)}\nstate schema: {state} "
                  f"(version {version if version is not None else '-'}, latest {LATEST})")
        for m in MIGRATIONS:
            mark = "applied" if version is not None and m.version <= version else "pending"
            out.print(f"  {m.version:>3}  {mark:<8} {m.description}")
    if version != LATEST:
        raise typer.Exit(1)


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

#: Set by the workers plugin (``workers.cli``): send a job to the Celery workers now.
#: Called as ``DISPATCH_HOOK(dsn, job_id, actor=...)``; raises BrokerUnavailable or
#: BrokerMisconfigured.
DISPATCH_HOOK: Callable[..., object] | None = None


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
        "--source", help="copy: read --table from this other database (a DSN without "
        "password: use ~/.pgpass); the job's state lives here, with the written rows.",
        show_default=False)] = None,
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
    bf = _client(ctx)
    options = _option_changes(
        batch_size=batch_size, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
        target_duration=target_duration, rate=rate, pause=pause,
        statement_timeout=statement_timeout, lock_timeout=lock_timeout, max_retries=max_retries,
        parallelism=parallelism, lock_wait_budget=lock_wait_budget)

    def build() -> store.JobRecord:
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

    job = _guard(build)
    if skip_preflight:
        _guard(lambda: bf.gate(job, skip=True))
    if workers:
        _send_to_workers(ctx, job.id, "enqueued")
    if quiet:
        out.print(job.id)
    elif as_json:
        out.print_json(json.dumps(_job_json(job), default=str))
    elif workers:
        out.print(f"enqueued job {job.id} ({job.name}) on {job.table}, key "
                  f"({', '.join(job.key_columns)}), and sent it to the workers: "
                  f"`backfill watch {job.id}`")
    else:
        out.print(f"enqueued job {job.id} ({job.name}) on {job.table}, key "
                  f"({', '.join(job.key_columns)}): run it with `backfill run {job.id}`")


def _send_to_workers(ctx: typer.Context, job_id: int, what: str) -> None:
    """Dispatch a job marked for the workers; if the broker is down, say so and exit 1 (the
    job stays pending, and the workers' reaper starts it once the broker is back)."""
    hook = DISPATCH_HOOK
    if hook is None:
        _fail(f"job {job_id} is {what} for the workers, but the workers package (Celery) is "
              "not installed here: the workers' reaper starts it", 1)
    s = _settings(ctx)
    try:
        hook(s.dsn, job_id, actor=s.actor)
    except BrokerUnavailable as exc:
        _fail(f"job {job_id} is {what} and left pending: {exc}; the workers' reaper starts it "
              f"once the broker is back, or `backfill dispatch {job_id}`", 1)
    except BrokerMisconfigured as exc:
        _fail(f"job {job_id} is {what} and left pending: {exc}", exc.exit_code)
    except BackfillError as exc:
        _fail(str(exc), exc.exit_code)


def _adhoc_spec(table: str | None, kind: str | None, set_: list[str] | None, where: str | None,
                statement: str | None, dest: str | None, columns: str | None, on_conflict: str,
                function: str | None, key: str | None, name: str | None) -> JobSpec:
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
    bf = _client(ctx)
    if dry_run:
        plan = _guard(lambda: bf.plan(job))
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
            return _guard(lambda: bf.run(job, stop=stop, on_tick=view.tick,
                                         takeover_after_s=takeover_after,
                                         skip_preflight=skip_preflight))

    result, interrupted = interruptible(
        go, stopping="pausing after the current batch (Ctrl-C again to abort it)",
        aborted="the batch in flight was rolled back; the job keeps its last checkpoint (it "
                "may show as running until taken over; `backfill run` again resumes it)")
    _report_run(bf, result, interrupted)


def interruptible(fn: Callable[[threading.Event], T], *, stopping: str,
                  aborted: str) -> tuple[T, bool]:
    """Run ``fn(stop)`` with Ctrl-C wired to it: the first sets ``stop`` (``fn`` winds down
    at its next safe point), the second aborts (exit 130). Returns ``fn``'s result and
    whether it was interrupted."""
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        err.print(f"\n[yellow]interrupt: {stopping}[/]")
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return fn(stop), stop.is_set()
    except KeyboardInterrupt:
        err.print(f"[red]aborted: {aborted}[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGINT, previous)


class _ProgressView:
    """A rich progress bar on a terminal; a log line every few seconds elsewhere."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("batch {task.fields[size]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=err,
            transient=False,
        )
        self.task: Any = None
        self.last_log = 0.0
        self.log = logs.get_logger()

    def __enter__(self) -> _ProgressView:
        if self.show_bar:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.show_bar:
            self.progress.__exit__(None, None, None)

    def tick(self, t: Tick) -> None:
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
    opts = t.job.options
    cap, _ = pace.ceiling(pace.Limits(
        rate_limit=opts.rate_limit, rows_share=t.job.rate_share,
        batches_share=t.job.batch_rate_share, pause_s=opts.pause_ms / 1000,
        batch_size=t.batch_size), None, (t.batch.duration_ms / 1000) if t.batch else 0.0)
    if t.rows_per_s is None:
        return cap
    return min(t.rows_per_s, cap) if cap is not None else t.rows_per_s


def _report_run(bf: Backfill, job: store.JobRecord, interrupted: bool) -> None:
    prog = _guard(lambda: bf.progress(job.id))
    if job.state == JobState.SUCCEEDED:
        elapsed = ((job.finished_at - job.started_at).total_seconds()
                   if job.finished_at and job.started_at else None)
        out.print(f"job {job.id} succeeded: {prog.rows_scanned:,} rows in range, "
                  f"{prog.rows_affected:,} changed, {prog.batches:,} batches"
                  + (f", {format_duration(elapsed)} since first start" if elapsed else ""))
        return
    if job.state == JobState.FAILED:
        _fail(f"job {job.id} failed: {job.state_reason}\n"
              f"  fix the cause, then `backfill retry {job.id}` and `backfill run {job.id}` "
              "(it resumes from the checkpoint)", 1)
    if job.state == JobState.CANCELLED:
        _fail(f"job {job.id} was cancelled: {job.state_reason}", 1)
    if job.state == JobState.AWAITING_APPROVAL:
        canary = _guard(lambda: bf.canary(job.id))
        err.print(escape(f"job {job.id} ran its canary and waits for approval: "
                         + _canary_text(job, canary)
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


# -- inspect ----------------------------------------------------------------------------------


def _job_json(job: store.JobRecord, prog: checkpoints.Progress | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": job.id, "name": job.name, "kind": job.kind, "table": job.table,
        "key": list(job.key_columns), "state": str(job.state), "state_reason": job.state_reason,
        "rows_estimate": job.rows_estimate, "options": job.options.to_json(),
        "created_by": job.created_by, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "owner": job.owner,
        "last_error": job.last_error, "error_range": job.error_range,
    }
    if prog is not None:
        data.update({"rows_done": prog.rows_scanned, "rows_changed": prog.rows_affected,
                     "batches": prog.batches, "rows_per_s": prog.recent_rows_per_s,
                     "batch_size": prog.current_batch_size, "eta_s": prog.eta_s,
                     "last_batch_at": prog.last_batch_at, "stalled_since": prog.stalled_since,
                     "expected_interval_s": prog.expected_interval_s})
    return data


def _clock(at: dt.datetime) -> str:
    """A moment in this machine's local time: HH:MM today, with the date otherwise."""
    local = at.astimezone()
    return f"{local:%H:%M}" if local.date() == dt.datetime.now().astimezone().date() \
        else f"{local:%Y-%m-%d %H:%M}"


def _stalled_text(prog: checkpoints.Progress) -> str:
    """``stalled since 12:03`` for a running job with no batch for longer than expected."""
    if prog.stalled_since is None:
        return ""
    quiet = (dt.datetime.now(dt.UTC) - prog.stalled_since).total_seconds()
    return f"stalled since {_clock(prog.stalled_since)} (no batch for {format_duration(quiet)})"


_STATE_STYLE = {
    "pending": "cyan", "running": "green", "throttled": "yellow", "paused": "magenta",
    "succeeded": "bold green", "failed": "bold red", "cancelled": "dim",
    "awaiting_approval": "bold yellow",
}


def _canary_text(job: store.JobRecord, canary: dict[str, Any] | None) -> str:
    """The canary's measured rows/s, its verification, and the rest's projected duration."""
    if canary is None:
        return f"canary of {job.canary_rows:,} rows not reached yet" if job.canary_rows else ""
    rows, rate = int(canary.get("canary_rows") or 0), float(canary.get("canary_rows_per_s") or 0)
    rest = max(0, (job.rows_estimate or 0) - rows)
    verified = {True: "verified", False: "FAILED verification",
                None: "being verified"}[canary.get("verified")]
    projected = format_duration(rest / rate) if rate > 0 else "-"
    return (f"canary {rows:,} rows at {rate:,.0f} rows/s, {verified}; the other ~{rest:,} "
            f"rows projected at {projected}"
            + (f"; approved by {job.approved_by}" if job.approved_by else ""))


def _bar(fraction: float | None, width: int = 12) -> str:
    """A text progress bar (plain characters: it survives SSH, logs and `watch`)."""
    if fraction is None:
        return "-"
    filled = round(fraction * width)
    return "#" * filled + "." * (width - filled)


def _jobs_table(rows: list[tuple[store.JobRecord, checkpoints.Progress]]) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ID", "NAME", "TABLE", "STATE", "PROGRESS", "DONE", "ROWS/S", "BATCH", "ETA",
                "REASON"):
        t.add_column(col, justify="right" if col in ("ID", "ROWS/S", "BATCH") else "left",
                     overflow="fold")
    for job, prog in rows:
        total = job.rows_estimate
        fraction = min(1.0, prog.rows_scanned / total) if total else None
        if job.state == JobState.SUCCEEDED:
            fraction = 1.0
        pct = f"{100 * fraction:.1f}%" if fraction is not None else "-"
        rate = prog.recent_rows_per_s
        stalled = _stalled_text(prog)
        reason = "; ".join(x for x in (stalled, job.state_reason or "") if x)
        t.add_row(str(job.id), job.name, job.table,
                  f"[{_STATE_STYLE.get(str(job.state), '')}]{job.state}[/]",
                  _bar(fraction), f"{prog.rows_scanned:,} ({pct})",
                  f"{rate:,.0f}" if rate is not None else "-",
                  f"{prog.current_batch_size:,}" if prog.current_batch_size else "-",
                  format_duration(prog.eta_s),
                  (f"[bold red]{escape(reason)}[/]" if stalled else escape(reason)))
    return t


#: Jobs `list` and `watch` show unless told otherwise.
DEFAULT_LIMIT = 50
OptLimit = Annotated[int | None, typer.Option(
    "--limit", min=0, max=MAX_COUNT, show_default=False,
    help=f"Show at most N jobs, failed and active first (default {DEFAULT_LIMIT}; 0: all). "
    "With --json: a page, {jobs, total, by_state, limit, offset, next_offset}.")]
OptWatchLimit = Annotated[int | None, typer.Option(
    "--limit", min=0, max=MAX_COUNT, show_default=False,
    help=f"Show at most N jobs, failed and active first (default {DEFAULT_LIMIT}; 0: all).")]
OptOffset = Annotated[int, typer.Option(
    "--offset", min=0, max=MAX_COUNT, help="Skip the first N jobs (with --limit: the next page).")]


def _more_text(page: views.JobPage) -> str:
    """The line under a page that hides jobs: how many, in which states, how to see them."""
    if not page.more:
        return ""
    states = ", ".join(f"{page.by_state[st]:,} {st}" for st in store.LIST_ORDER
                       if page.by_state.get(st))
    return (f"... and {page.more:,} more ({page.total:,} jobs: {states}); "
            "--limit N shows more, --limit 0 all")


def _page_text(page: views.JobPage, include_all: bool) -> Any:
    if not page.jobs and page.total:
        return f"no jobs after the first {page.offset:,} ({page.total:,} in all)"
    if not page.jobs:
        return "no jobs" + ("" if include_all else " (active or failed; --all shows finished)")
    more = _more_text(page)
    return Group(_jobs_table(page.jobs), more) if more else _jobs_table(page.jobs)


@app.command("list")
def list_(
    ctx: typer.Context,
    include_all: Annotated[bool, typer.Option("--all", "-a", help="Include finished jobs.")] = False,
    defined: Annotated[bool, typer.Option("--defined", help="List defined jobs instead.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Every job as a JSON array (a page with --limit or --offset).")] = False,
    limit: OptLimit = None,
    offset: OptOffset = 0,
) -> None:
    """List jobs (active and failed by default, --all: finished too), failed and active first,
    at most --limit of them (50) with a line saying how many more; or the defined jobs with
    --defined."""
    s = ctx.obj if isinstance(ctx.obj, Settings) else None
    if defined:
        from backfill.job import registry

        reg = _guard(lambda: registry.load(s.jobs_module if s else "jobs"))
        defs = [{"name": d.name, "description": d.summary, "doc": d.doc} for d in reg]
        if as_json:
            out.print_json(json.dumps(defs))
            return
        t = Table(box=None, pad_edge=False, header_style="bold")
        t.add_column("NAME")
        t.add_column("DESCRIPTION")
        for d in defs:
            t.add_row(d["name"], d["description"])
        out.print(t)
        return
    bf = _client(ctx)
    paged = limit is not None or offset > 0
    if as_json and not paged:  # complete: every job
        rows = _guard(lambda: bf.overview(include_finished=include_all))
        out.print_json(json.dumps([_job_json(j, p) for j, p in rows], default=str))
        return
    size = DEFAULT_LIMIT if limit is None else limit or None
    page = _guard(lambda: bf.page(include_finished=include_all, limit=size, offset=offset))
    if as_json:  # explicitly paginated
        out.print_json(json.dumps({
            "jobs": [_job_json(j, p) for j, p in page.jobs], "total": page.total,
            "by_state": page.by_state, "limit": page.limit, "offset": page.offset,
            "next_offset": page.next_offset}, default=str))
        return
    out.print(_page_text(page, include_all))


def _show(ctx: typer.Context, job: str, as_json: bool, events: int) -> None:
    bf = _client(ctx)
    rec, prog, evs, slices = _guard(lambda: bf.inspect(job))
    if as_json:
        data = _job_json(rec, prog)
        data["spec"] = rec.spec.to_json()
        if rec.canary_rows is not None:
            data["canary"] = {"rows": rec.canary_rows, "approved_by": rec.approved_by,
                              "approved_at": rec.approved_at,
                              "report": _guard(lambda: bf.canary(rec.id))}
        data["slices"] = [{"slice": s.slice_no, "lower": s.lower_bound, "upper": s.upper_bound,
                           "cursor": s.cursor, "done": s.done, "rows": s.rows_scanned,
                           "batches": s.batches} for s in slices]
        data["events"] = [{"at": e.at, "kind": e.kind, "from": e.from_state, "to": e.to_state,
                           "actor": e.actor, "reason": e.reason, "details": e.details}
                          for e in evs]
        out.print_json(json.dumps(data, default=str))
        return
    d = _job_json(rec, prog)
    rate_text = f"{d['rows_per_s']:,.0f} rows/s" if d["rows_per_s"] is not None else "-"
    stalled = _stalled_text(prog)
    style = _STATE_STYLE.get(str(rec.state), "")
    lines = [
        f"[bold]job {rec.id}[/]  {rec.name}",
        f"  state     [{style}]{rec.state}[/]"
        + (f"  ({escape(rec.state_reason)})" if rec.state_reason else ""),
        f"  table     {rec.table}  key ({', '.join(rec.key_columns)})  kind {rec.kind}",
        f"  progress  {prog.rows_scanned:,} of ~{rec.rows_estimate or 0:,} rows, "
        f"{prog.rows_affected:,} changed, {prog.batches:,} batches",
        f"  rate      {rate_text}"
        f"  batch {prog.current_batch_size or '-'}  ETA {format_duration(d['eta_s'])}"
        + (f"  [bold red]{stalled}[/]" if stalled else ""),
        "  options   " + ", ".join(f"{k}={v}" for k, v in rec.options.to_json().items()),
        f"  created   {rec.created_at:%Y-%m-%d %H:%M:%S} by {rec.created_by}"
        + (f"; owner {rec.owner}" if rec.owner else ""),
    ]
    if rec.canary_rows is not None:
        report = _guard(lambda: bf.canary(rec.id))
        lines.append("  canary    " + escape(_canary_text(rec, report)))
    rehearsed = _guard(lambda: bf.rehearsal(rec.id))
    if rehearsed:
        rate = float(rehearsed.get("rows_per_s") or 0)
        rest = max(0, (rec.rows_estimate or 0) - prog.rows_scanned)
        lines.append(
            f"  rehearsed {rehearsed.get('rows', 0):,} rows at {rate:,.0f} rows/s on "
            f"{rehearsed.get('clone')}, {float(rehearsed.get('wal_bytes') or 0) / 2**20:,.1f} MB "
            f"WAL; projected here: {format_duration(rest / rate) if rate else '-'}")
    if rec.spec.undo_enabled:
        lines.append(f"  undo log  backfill.undo_{rec.id}: `backfill revert {rec.id}` restores "
                     "the old values")
    if rec.kind == "move" and rec.spec.source_dsn:
        phase2 = _guard(lambda: bf.move_phase2(rec.id))
        lines.append("  phase 2   " + (f"job {phase2.id} ({phase2.state}) deletes the copied "
                                       "rows from the source" if phase2 else
                                       "not started" + (f": `backfill run {rec.id}` starts it"
                                                        if rec.state == "succeeded" else
                                                        ": it starts when the copy is done")))
    if rec.kind == "revert":
        left = prog.rows_scanned - prog.rows_affected
        lines.append(f"  reverts   job {rec.spec.reverts}: {prog.rows_affected:,} rows restored"
                     + (f", {left:,} changed since and left alone" if left else ""))
    if rec.last_error:
        lines.append(f"  [red]error     {rec.last_error}[/]")
        if rec.error_range:
            lines.append(f"  range     after {rec.error_range.get('after')}")
    for s in slices:
        lines.append(f"  slice {s.slice_no}   cursor {s.cursor} of {s.upper_bound}"
                     f"{'  done' if s.done else ''}")
    out.print("\n".join(lines), highlight=False)
    t = Table(title="events", box=None, pad_edge=False, header_style="bold", title_justify="left")
    for col in ("AT", "EVENT", "FROM", "TO", "BY", "REASON"):
        t.add_column(col, overflow="fold")
    for e in evs[-events:] if events else evs:
        t.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.kind, e.from_state or "", e.to_state or "",
                  escape(e.actor), escape(e.reason or ""))
    out.print(t)


@app.command()
def show(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id or name.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    events: Annotated[int, typer.Option("--events", min=0, max=MAX_COUNT,
                                        help="Show the last N events (0: all).")] = 0,
) -> None:
    """Show one job: state, progress, options, slices and its event history."""
    _show(ctx, job, as_json, events)


@app.command("status")
def status_(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id or name.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    events: Annotated[int, typer.Option("--events", min=0, max=MAX_COUNT,
                                        help="Show the last N events (0: all).")] = 0,
) -> None:
    """Same as `show`."""
    _show(ctx, job, as_json, events)


@app.command()
def watch(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(
        "--interval", "-n", parser=seconds_option(minimum=0.1), metavar="DURATION",
        help="Time between refreshes (2, 500ms).")] = 2.0,
    include_all: Annotated[bool, typer.Option("--all", "-a", help="Include finished jobs.")] = False,
    limit: OptWatchLimit = None,
    count: Annotated[int, typer.Option("--count", min=0, max=MAX_COUNT,
                                       help="Stop after N refreshes (0: until Ctrl-C).")] = 0,
    once: Annotated[bool, typer.Option("--once", help="Print the table once and exit (scripts).")] = False,
) -> None:
    """A live table of jobs (state, progress, rows/s, ETA, throttle reason or a stall), failed
    and active first, at most --limit (50) with a line saying how many more, refreshed every
    --interval seconds in place, until Ctrl-C."""
    bf = _client(ctx)
    size = DEFAULT_LIMIT if limit is None else limit or None

    def page() -> Any:
        return _page_text(_guard(lambda: bf.page(include_finished=include_all, limit=size)),
                          include_all)

    if once:
        out.print(page())
        return

    def render() -> Any:
        header = f"backfill jobs on {describe(bf.dsn)}  ({time.strftime('%H:%M:%S')})"
        return Group(header, page())

    n = 0
    try:
        with Live(render(), console=out, refresh_per_second=4, transient=False) as live:
            while True:
                n += 1
                if count and n >= count:
                    break
                time.sleep(interval)
                live.update(render())
    except KeyboardInterrupt:
        pass


# -- operator actions -------------------------------------------------------------------------

Reason = Annotated[str | None, typer.Option("--reason", "-r", help="Why; recorded in the events.")]


@app.command()
def pause(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Pause a job: its runner stops before its next checkpoint (a batch in flight is rolled
    back); everything checkpointed is kept. `resume` continues from there."""
    rec = _guard(lambda: _client(ctx).pause(job, reason))
    out.print(f"job {rec.id} paused; `backfill resume {rec.id}` to continue")


@app.command()
def resume(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Resume a paused job: it becomes pending; `backfill run` (or a worker) continues it.
    On a throttled job: override the controller's throttle (for one whose controller is gone)."""
    rec = _guard(lambda: _client(ctx).resume(job, reason))
    if rec.runs_on == "workers":
        _send_to_workers(ctx, rec.id, "resumed")
        out.print(f"job {rec.id} resumed on the workers from its checkpoints")
        return
    if rec.state == JobState.RUNNING:  # a throttle overridden: its waiting runner goes on
        out.print(f"job {rec.id} runs again, its throttle overridden (recorded as yours)")
        return
    out.print(f"job {rec.id} is pending again; `backfill run {rec.id}` continues from its checkpoint")


@app.command()
def approve(ctx: typer.Context, job: Annotated[str, typer.Argument()],
            reason: Reason = None) -> None:
    """Let a job whose canary verified run the rest: awaiting_approval -> pending."""
    rec = _guard(lambda: _client(ctx).approve(job, reason))
    if rec.runs_on == "workers":
        _send_to_workers(ctx, rec.id, "approved")
        out.print(f"job {rec.id} approved: the workers run the rest")
        return
    out.print(f"job {rec.id} approved; `backfill run {rec.id}` runs the rest")


@app.command()
def cancel(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Cancel a job for good (rows already written stay written)."""
    rec = _guard(lambda: _client(ctx).cancel(job, reason))
    out.print(f"job {rec.id} cancelled")


@app.command()
def retry(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Move a failed job back to pending; it resumes from its checkpoint when run."""
    rec = _guard(lambda: _client(ctx).retry(job, reason))
    out.print(f"job {rec.id} is pending; `backfill run {rec.id}` resumes from its checkpoint")


@app.command()
def tune(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument()],
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
) -> None:
    """Change a job's options; a running job applies them before its next batch."""
    changes = _option_changes(
        batch_size=batch_size, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
        target_duration=target_duration, rate=rate, pause=pause,
        statement_timeout=statement_timeout, lock_timeout=lock_timeout, max_retries=max_retries,
        parallelism=parallelism, lock_wait_budget=lock_wait_budget)
    rec = _guard(lambda: _client(ctx).tune(job, **changes))
    out.print(f"job {rec.id} options: " + ", ".join(f"{k}={v}" for k, v in rec.options.to_json().items()))


@app.command()
def verify(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument()],
    chunk: Annotated[int, typer.Option("--chunk", min=1, max=MAX_COUNT,
                                       help="Keys per checked range.")] = 50_000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-check every completed range: update jobs for rows where the SET is not true yet,
    copy jobs by count and checksum per range, move/delete jobs for rows left behind."""
    report = _guard(lambda: _client(ctx).verify(job, chunk=chunk))
    if as_json:
        out.print_json(json.dumps(report.to_json(), default=str))
    elif report.unverifiable:
        out.print(f"job {report.job_id}: not verifiable: {escape(report.unverifiable)}")
    elif report.ok:
        out.print(f"job {report.job_id} verified: {report.checked_rows:,} rows in "
                  f"{report.checked_chunks} ranges, no differences")
    else:
        out.print(f"[red]job {report.job_id}: {len(report.diffs)} ranges differ[/]")
        for d in report.to_json()["diffs"]:
            out.print(escape(f"  ({d['after']}, {d['through']}]: {d['detail']}"), highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _load_plugins() -> None:
    """Commands of the layers above the core (``workers.cli`` adds worker, dispatch, reap).
    Imported by name so the core never imports Celery itself."""
    # A command of this module's own (run, enqueue, db …) needs none of the core plugins:
    # skipping them spares each process pglast and the controller (fixed cost, issue 16).
    own = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    own |= {g.name for g in app.registered_groups if g.name}
    if _command_of(sys.argv[1:]) not in own:
        for core in ("backfill.cli.controller", "backfill.cli.exporter", "backfill.cli.lint",
                     "backfill.cli.migrate", "backfill.cli.safety"):
            importlib.import_module(core)
    for name in os.environ.get("BACKFILL_CLI_PLUGINS", "workers.cli").split(","):
        if not name.strip():
            continue
        try:
            importlib.import_module(name.strip())
        except ModuleNotFoundError as exc:  # Celery not installed: the inline CLI still works
            if exc.name not in (name.strip(), "celery", "workers"):
                raise


def _command_of(args: list[str]) -> str | None:
    """The command word of a command line (after the global options), or None."""
    valued = {"--dsn", "--actor", "--jobs-module", "--log-format", "--log-level"}
    it = iter(args)
    for a in it:
        if a in valued:
            next(it, None)
        elif not a.startswith("-"):
            return a.replace("_", "-")
    return None


def main() -> None:
    try:
        _load_plugins()
    except Exception as exc:  # a broken plugin: one line, not a traceback
        known = explain_error(exc) or (1, f"cannot load the commands: {type(exc).__name__}: {exc}")
        err.print(f"[bold red]error:[/] {escape(known[1])}", highlight=False)
        sys.exit(known[0])
    app()  # errors become one line and an exit code in _Commands.invoke


if __name__ == "__main__":
    # Through the imported module, so plugins register their commands on that module's app.
    importlib.import_module("backfill.cli.main").main()
