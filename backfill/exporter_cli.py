"""``backfill exporter``: Prometheus metrics read from the state store."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from backfill.cli import _fail, _guard, _settings, app, out
from backfill.durations import format_duration, parse_duration_ms
from backfill.schema import check_schema


@app.command()
def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535,
                                       help="HTTP port for /metrics.")] = 9187,
    addr: Annotated[str, typer.Option("--addr", help="Address to listen on.")] = "0.0.0.0",
    finished_for: Annotated[str, typer.Option(
        "--finished-for", help="Keep exporting succeeded and cancelled jobs this long.")] = "1h",
) -> None:
    """Serve Prometheus metrics for every job and the controller, read from the state store
    at each scrape (so they are right whichever process did the work). Runs until SIGTERM."""
    # Imported here: prometheus_client is only needed by this command.
    from backfill.metrics import serve

    s = _settings(ctx)
    keep_s = _guard(lambda: parse_duration_ms(finished_for, option="--finished-for") / 1000)
    if not 0 < port < 65536:
        _fail(f"--port must be a TCP port, not {port}", 2)

    _guard(lambda: check_schema(s.dsn))
    try:
        server, _ = serve(s.dsn, port=port, addr=addr, finished_for_s=keep_s)
    except OSError as exc:
        _fail(f"cannot listen on {addr}:{port}: {exc.strerror or exc}", 1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    out.print(f"exporting metrics on http://{addr}:{port}/metrics (finished jobs for "
              f"{format_duration(keep_s)})")
    stop.wait()
    server.shutdown()
