"""CLI commands of the distributed mode, added to ``backfill`` when Celery is importable:
``backfill worker``, ``backfill dispatch JOB`` and ``backfill reap``; it also lets
``enqueue --workers`` and ``resume`` send jobs to the workers."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Annotated, Any

import typer

from backfill.cli import base as cli_base
from backfill.cli.base import app, cli_settings, fail, guard, out, seconds_option

if importlib.util.find_spec("celery") is None:   # the inline CLI works without these commands
    raise ModuleNotFoundError("No module named 'celery'", name="celery")


# Celery (~0.1-0.3 s to import) only when a command sends or reaps: `backfill run` and the
# other inline commands do not pay for it.
def dispatch(dsn: str, job_id: int, **kwargs: Any) -> Any:
    from workers.tasks import dispatch as send

    return send(dsn, job_id, **kwargs)


def reap_once(dsn: str, **kwargs: Any) -> Any:
    from workers.tasks import reap_once as reap

    return reap(dsn, **kwargs)


cli_base.DISPATCH_HOOK = dispatch


@app.command()
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=1024,
                                             help="Task slots.")] = 2,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Celery node name.")] = None,
) -> None:
    """Start a Celery worker for backfill tasks (checks the state schema first). Each worker
    also runs the reaper, which starts and re-sends work without an operator."""
    from backfill.state.schema import check_schema
    from workers.app import app as celery_app
    from workers.tasks import check_broker_setup

    s = cli_settings(ctx)

    guard(lambda: check_schema(s.dsn))
    guard(check_broker_setup)
    os.environ["BACKFILL_DSN"] = s.dsn
    # The queue tasks are sent to: a BACKFILL_CELERY_CONFIG module may rename it.
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "-Q", str(celery_app.conf.task_default_queue),
            "--concurrency", str(concurrency), "--loglevel", "INFO", "-E"]
    if name:
        argv += ["-n", name]
    os.execv(sys.executable, argv)


@app.command("dispatch")
def dispatch_(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument()],
    skip_preflight: Annotated[bool, typer.Option(
        "--skip-preflight", help="Start without the pre-flight checks (recorded as an "
        "event).")] = False,
) -> None:
    """Run a job on the workers: start it (or resume a paused one) and send a task per slice,
    up to its parallelism. Sending a running job again replaces tasks that were lost. A job's
    first start runs the pre-flight checks; a failure pauses it with the reasons."""
    s = cli_settings(ctx)
    if not (job.isascii() and job.isdigit()):
        fail("dispatch takes a job id", 2)
    if skip_preflight:
        from backfill.cli.base import client

        bf = client(ctx)
        guard(lambda: bf.gate(bf.get(int(job)), skip=True))
    sent = guard(lambda: dispatch(s.dsn, int(job), actor=s.actor))
    out.print(f"job {job}: sent {len(sent)} task(s) to the workers"
              + (f" (slices {', '.join(str(d.slice_no) for d in sent)})" if sent else ""))


@app.command("reap")
def reap_(
    ctx: typer.Context,
    every: Annotated[float, typer.Option(
        "--every", parser=seconds_option(), metavar="DURATION",
        help="Repeat every N seconds (0: once).")] = 0,
) -> None:
    """One reaper pass by hand (every worker runs one on its own): start pending jobs marked
    for the workers, and re-send slices whose lease expired or whose task was lost."""
    s = cli_settings(ctx)
    while True:
        sent = guard(lambda: reap_once(s.dsn, actor=s.actor))
        out.print(f"sent {len(sent)} task(s)"
                  + (f": {[(d.job_id, d.slice_no) for d in sent]}" if sent else ""))
        if every <= 0:
            return
        time.sleep(every)
