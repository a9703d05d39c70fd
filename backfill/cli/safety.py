"""Safety commands: `revert` and `undo-log list|prune` (reversible backfills), `preflight`, `rehearse`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from backfill.cli.base import app, client, err, escape, fail, guard, out
from backfill.cli.jobs import run, send_to_workers
from backfill.core.durations import format_duration, parse_duration_ms

undo_app = typer.Typer(help="Undo logs: the old values kept by update, transform and delete "
                       "jobs for `backfill revert`.", no_args_is_help=True)
app.add_typer(undo_app, name="undo-log")


@app.command()
def revert(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The job to revert (id or name).")],
    force: Annotated[bool, typer.Option(
        "--force", help="Also restore rows changed since by someone else (default: leave "
        "them alone and count them).")] = False,
    workers: Annotated[bool, typer.Option(
        "--workers", help="Enqueue the revert for the Celery workers instead of running it "
        "here.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    skip_preflight: Annotated[bool, typer.Option(
        "--skip-preflight", help="Start the revert without the pre-flight checks (recorded "
        "as an event): a revert is often what the database needs most.")] = False,
) -> None:
    """Restore what a job changed from its undo log, as a job of its own (batched, throttled,
    checkpointed; pause, resume and watch it like any job). Rows changed since by the
    application are left alone and reported, unless --force. Deleted rows are inserted back."""
    bf = client(ctx)
    rec = guard(lambda: bf.revert(job, force=force, workers=workers))
    err.print(f"revert job {rec.id} enqueued: it restores job {rec.spec.reverts}'s rows",
              highlight=False)
    if skip_preflight:
        guard(lambda: bf.gate(rec, skip=True))
    if workers:
        send_to_workers(ctx, rec.id, "enqueued")
        out.print(rec.id)
        return
    run(ctx, str(rec.id), dry_run=False, progress=progress, takeover_after=30.0, as_json=False,
        skip_preflight=skip_preflight)


@undo_app.command("list")
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every undo log with its job, estimated rows and size."""
    from rich.table import Table

    logs = guard(client(ctx).undo_logs)
    if as_json:
        out.print_json(json.dumps([u.__dict__ for u in logs], default=str))
        return
    t = Table("JOB", "UNDO TABLE", "~ROWS", "SIZE", "JOB STATE", "ENDED", box=None)
    for u in logs:
        t.add_row(str(u.job_id), u.table, f"{u.rows:,}", f"{u.bytes / 2**20:,.1f} MB",
                  u.job_state, format_duration(u.ended_s_ago) + " ago" if u.ended_s_ago else "-")
    out.print(t if logs else "no undo logs")


@undo_app.command("prune")
def prune(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option(
        "--older-than", help="Drop the undo logs of jobs that ended longer ago than this.")]
    = "7d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list them.")] = False,
) -> None:
    """Drop old undo logs (default: of jobs that ended more than 7 days ago, the rollback
    window people keep). Logs of active jobs, and of jobs being reverted, are kept."""
    text = older_than.strip().lower()
    days = text.endswith("d") and text[:-1].replace(".", "", 1).isascii() \
        and text[:-1].replace(".", "", 1).isdigit()
    seconds = float(text[:-1]) * 86400 if days else guard(
        lambda: parse_duration_ms(older_than, option="--older-than")) / 1000.0
    if not seconds < 1e12:  # a typo (or an overflow to inf), not an age
        fail(f"--older-than: {older_than!r} is too long", 2)
    gone = guard(lambda: client(ctx).prune_undo_logs(older_than_s=seconds, dry_run=dry_run))
    verb = "would drop" if dry_run else "dropped"
    for u in gone:
        out.print(f"{verb} {escape(u.table)} (job {u.job_id}, {u.bytes / 2**20:,.1f} MB)",
                  highlight=False)
    if not gone:
        out.print(f"no undo log older than {older_than}")


@app.command()
def preflight(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id or name.")],
    config: Annotated[str | None, typer.Option(
        "--config", help="Pre-flight settings (TOML, [preflight]); default: "
        "$BACKFILL_PREFLIGHT_CONFIG.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check the database can take the job now: its table and WAL (sampled from one rolled-back
    batch), free disk, WAL archiving, replicas, long transactions, invalid indexes, a recent
    backup (backup_command) and timeouts. Exit 1 when a check fails. `run` and the workers run
    it before a job's first write."""
    from backfill.safety.preflight import PreflightConfig, blocked

    bf = client(ctx)
    cfg = guard(lambda: PreflightConfig.load(config))
    checks = guard(lambda: bf.preflight(job, config=cfg))
    if as_json:
        out.print_json(json.dumps({"checks": [c.to_json() for c in checks],
                                   "blocked": bool(blocked(checks))}, default=str))
    else:
        style = {"pass": "green", "warn": "yellow", "fail": "bold red"}
        for c in checks:
            out.print(f"[{style[c.status]}]{c.status:<4}[/] {c.name:<18} {escape(c.reason)}",
                      highlight=False, soft_wrap=True)
    if blocked(checks):
        raise typer.Exit(1)


@app.command()
def rehearse(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id or name.")],
    on: Annotated[str, typer.Option(
        "--on", help="DSN of a clone or staging copy holding the same table (never the "
        "job's own database).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the job for real on a clone, then verify it there: rows/s, WAL, batch durations and
    lock waits are measured and kept on this job, so `show`, `preflight` and migration plans
    use them instead of guesses. Exit 1 when the rehearsal fails or does not verify."""
    bf = client(ctx)
    result = guard(lambda: bf.rehearse(job, on))
    if as_json:
        out.print_json(json.dumps(result.to_json(), default=str))
    else:
        out.print(
            f"rehearsal of job {result.job_id} on {escape(result.clone)}: {result.state}, "
            f"{result.rows:,} rows ({result.rows_changed:,} changed) in "
            f"{format_duration(result.seconds)}, {result.rows_per_s:,.0f} rows/s\n"
            f"  WAL {result.wal_bytes / 2**20:,.1f} MB ({result.wal_bytes_per_row:,.0f} bytes "
            f"per changed row); {result.batches:,} batches, p50 "
            f"{result.batch_ms_p50 or 0:,.0f} ms, p95 {result.batch_ms_p95 or 0:,.0f} ms; "
            f"{result.retries} retries ({result.lock_timeouts} lock timeouts)\n"
            f"  verify: " + {True: "no differences", False: f"DIFFERENCES: "
                             f"{escape(result.verify_detail or '')}",
                             None: escape(result.verify_detail or "not run")}[result.verified],
            highlight=False)
    if result.state != "succeeded" or result.verified is False:
        raise typer.Exit(1)
