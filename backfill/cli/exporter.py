"""``backfill exporter``: Prometheus metrics read from the state store."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from backfill.cli.base import app, cli_settings, escape, fail, guard, out
from backfill.core.durations import format_duration, parse_duration_ms
from backfill.core.errors import DatabaseUnavailable


@app.command()
def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535,
                                       help="HTTP port for /metrics.")] = 9187,
    addr: Annotated[str, typer.Option("--addr", help="Address to listen on.")] = "0.0.0.0",
    finished_for: Annotated[str, typer.Option(
        "--finished-for", help="Keep exporting succeeded and cancelled jobs this long.")] = "1h",
    dispatch_stale: Annotated[float, typer.Option(
        "--dispatch-stale-after", envvar="BACKFILL_DISPATCH_STALE_S",
        help="Seconds after which the workers' reaper re-sends a task no worker started: the "
        "workers' BACKFILL_DISPATCH_STALE_S (exported for the queue alerts).")] = 120.0,
    timeout: Annotated[str, typer.Option(
        "--timeout", help="Longest a scrape waits for the database (then backfill_up 0); keep "
        "it below Prometheus's scrape_timeout.")] = "5s",
) -> None:
    """Serve Prometheus metrics for every job and the controller, read from the state store
    at each scrape (so they are right whichever process did the work). Runs until SIGTERM."""
    # Imported here: prometheus_client is only needed by this command.
    from backfill.observe.metrics import serve
    from backfill.state.schema import check_schema

    s = cli_settings(ctx)
    keep_s = guard(lambda: parse_duration_ms(finished_for, option="--finished-for") / 1000)
    timeout_s = guard(lambda: parse_duration_ms(timeout, option="--timeout") / 1000)
    if not 0 < port < 65536:
        fail(f"--port must be a TCP port, not {port}", 2)
    if not dispatch_stale > 0:
        fail(f"--dispatch-stale-after must be a positive number of seconds, not {dispatch_stale}", 2)
    if timeout_s <= 0:
        fail("--timeout must be more than 0s", 2)

    def check() -> None:
        try:
            check_schema(s.dsn)
        except DatabaseUnavailable as exc:
            # Serve anyway: `backfill_up 0` is what Prometheus must see (an exporter that is
            # not there only says "exporter down"); every scrape reads the database afresh.
            out.print(f"[yellow]{escape(str(exc))}: serving backfill_up 0 until it answers[/]")

    guard(check)  # a database that answers with the wrong schema is still refused
    try:
        server, _ = serve(s.dsn, port=port, addr=addr, finished_for_s=keep_s,
                          timeout_s=timeout_s, dispatch_stale_s=dispatch_stale)
    except OSError as exc:
        fail(f"cannot listen on {addr}:{port}: {exc.strerror or exc}", 1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    out.print(f"exporting metrics on http://{addr}:{port}/metrics (finished jobs for "
              f"{format_duration(keep_s)})")
    stop.wait()
    server.shutdown()
