"""CLI commands of the distributed mode, added to ``backfill`` when Celery is importable:
``backfill worker``, ``backfill dispatch JOB`` and ``backfill reap``."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from backfill.cli import _fail, _guard, _settings, app, out
from backfill.db import connect
from backfill.schema import require_current
from workers.tasks import dispatch, reap


@app.command()
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Task slots.")] = 2,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Celery node name.")] = None,
) -> None:
    """Start a Celery worker for backfill tasks (checks the state schema first)."""
    s = _settings(ctx)

    def check() -> None:
        conn = connect(s.dsn)
        try:
            require_current(conn)
        finally:
            conn.close()

    _guard(check)
    os.environ["BACKFILL_DSN"] = s.dsn
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "backfill",
            "--concurrency", str(concurrency), "--loglevel", "INFO", "-E"]
    if name:
        argv += ["-n", name]
    os.execv(sys.executable, argv)


@app.command("dispatch")
def dispatch_(ctx: typer.Context, job: Annotated[str, typer.Argument()]) -> None:
    """Run a job on the workers: start it (or resume a paused one) and send one task per
    unfinished slice. Sending a running job again replaces tasks that were lost."""
    s = _settings(ctx)
    if not job.isdigit():
        _fail("dispatch takes a job id", 2)
    slices = _guard(lambda: dispatch(s.dsn, int(job), actor=s.actor))
    out.print(f"job {job}: dispatched {len(slices)} slice(s) to the workers")


@app.command("reap")
def reap_(
    ctx: typer.Context,
    every: Annotated[float, typer.Option("--every", help="Repeat every N seconds (0: once).")] = 0,
) -> None:
    """Re-dispatch slices of worker-run jobs that nobody holds a live lease on (a worker was
    killed, or tasks were lost with the broker)."""
    s = _settings(ctx)
    while True:
        sent = _guard(lambda: reap(s.dsn, actor=s.actor))
        out.print(f"re-dispatched {len(sent)} slice(s)" + (f": {sent}" if sent else ""))
        if every <= 0:
            return
        time.sleep(every)
