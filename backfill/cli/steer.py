"""``backfill pause|resume|approve|cancel|retry|tune|verify``: steering a job, each change
recorded with who made it and why."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from backfill.cli.base import MAX_COUNT, app, client, escape, guard, out
from backfill.cli.jobs import (
    OptBatch,
    OptLock,
    OptLockWait,
    OptMaxBatch,
    OptMinBatch,
    OptParallel,
    OptPause,
    OptRate,
    OptRetries,
    OptStmt,
    OptTarget,
    _option_changes,
    send_to_workers,
)
from backfill.job.states import JobState

# -- operator actions -------------------------------------------------------------------------

Reason = Annotated[str | None, typer.Option("--reason", "-r", help="Why; recorded in the events.")]


@app.command()
def pause(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Pause a job: its runner stops before its next checkpoint (a batch in flight is rolled
    back); everything checkpointed is kept. `resume` continues from there."""
    rec = guard(lambda: client(ctx).pause(job, reason))
    out.print(f"job {rec.id} paused; `backfill resume {rec.id}` to continue")


@app.command()
def resume(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Resume a paused job: it becomes pending; `backfill run` (or a worker) continues it.
    On a throttled job: override the controller's throttle (for one whose controller is gone)."""
    rec = guard(lambda: client(ctx).resume(job, reason))
    if rec.runs_on == "workers":
        send_to_workers(ctx, rec.id, "resumed")
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
    rec = guard(lambda: client(ctx).approve(job, reason))
    if rec.runs_on == "workers":
        send_to_workers(ctx, rec.id, "approved")
        out.print(f"job {rec.id} approved: the workers run the rest")
        return
    out.print(f"job {rec.id} approved; `backfill run {rec.id}` runs the rest")


@app.command()
def cancel(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Cancel a job for good (rows already written stay written)."""
    rec = guard(lambda: client(ctx).cancel(job, reason))
    out.print(f"job {rec.id} cancelled")


@app.command()
def retry(ctx: typer.Context, job: Annotated[str, typer.Argument()], reason: Reason = None) -> None:
    """Move a failed job back to pending; it resumes from its checkpoint when run."""
    rec = guard(lambda: client(ctx).retry(job, reason))
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
    rec = guard(lambda: client(ctx).tune(job, **changes))
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
    report = guard(lambda: client(ctx).verify(job, chunk=chunk))
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
