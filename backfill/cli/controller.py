"""``backfill controller run|check|status``: the health controller from the command line."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from backfill.cli import base as cli_base
from backfill.cli.base import app, cli_settings, escape, fail, guard, out, positive_number
from backfill.control.policy import Limit, Reading, kind_of, show
from backfill.core.durations import format_duration
from backfill.core.errors import InvalidOption

if TYPE_CHECKING:
    from rich.table import Table

    from backfill.control.controller import ControllerConfig
    from backfill.state import store

# The controller, psycopg and the state SQL load in the commands, not for `--help` (fixed
# costs, issue 16).

controller_app = typer.Typer(
    help="The health controller: throttles running jobs when the database is under strain "
    "(lock waiters, replica lag, retained WAL, long transactions, probes) and resumes them.",
    no_args_is_help=True)
app.add_typer(controller_app, name="controller")

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML file: limits, per-job limits, replicas, probes, budgets "
    "(see deploy/controller.example.toml).")]
ReplicaOpt = Annotated[list[str] | None, typer.Option(
    "--replica", help="NAME=DSN of a replica to read the heartbeat lag on (repeatable).")]
PollOpt = Annotated[str | None, typer.Option("--poll", help="Seconds between polls (1s).")]
HoldOpt = Annotated[str | None, typer.Option(
    "--hold", help="How long every signal must stay below its resume threshold (10s).")]
LagOpt = Annotated[str | None, typer.Option("--max-replica-lag", help="e.g. 10s.")]
WaitersOpt = Annotated[str | None, typer.Option("--max-lock-waiters", help="Sessions, e.g. 5.")]
XactOpt = Annotated[str | None, typer.Option("--max-long-transaction", help="e.g. 10m.")]
SlotOpt = Annotated[str | None, typer.Option("--max-slot-retained", help="e.g. 10GB.")]
RowsOpt = Annotated[float | None, typer.Option(
    "--rows-per-s", parser=positive_number,
    help="Global budget of rows/s, shared by all running jobs.")]
BatchesOpt = Annotated[float | None, typer.Option(
    "--batches-per-s", parser=positive_number,
    help="Global budget of batches/s, shared by all running jobs.")]


def _config(config: Path | None, replica: list[str] | None, poll: str | None, hold: str | None,
            max_replica_lag: str | None, max_lock_waiters: str | None,
            max_long_transaction: str | None, max_slot_retained: str | None,
            rows_per_s: float | None, batches_per_s: float | None) -> ControllerConfig:
    from backfill.control.controller import ControllerConfig

    replicas: dict[str, str] = {}
    for item in replica or []:
        name, sep, dsn = item.partition("=")
        if not sep or not name.strip() or not dsn.strip():
            raise InvalidOption(f"--replica takes NAME=DSN, got {item!r}")
        replicas[name.strip()] = dsn.strip()
    limits = {k: v for k, v in (("replica_lag", max_replica_lag),
                                ("lock_waiters", max_lock_waiters),
                                ("long_transaction", max_long_transaction),
                                ("slot_retained", max_slot_retained)) if v is not None}
    overrides: dict[str, Any] = {"replicas": replicas, "limits": limits, "poll": poll,
                                 "hold": hold, "rows_per_s": rows_per_s,
                                 "batches_per_s": batches_per_s}
    if config is not None:
        return ControllerConfig.from_file(config, **overrides)
    return ControllerConfig.from_mapping({}, **overrides)


@controller_app.command("run")
def run_(
    ctx: typer.Context, config: ConfigOpt = None, replica: ReplicaOpt = None,
    poll: PollOpt = None, hold: HoldOpt = None, max_replica_lag: LagOpt = None,
    max_lock_waiters: WaitersOpt = None, max_long_transaction: XactOpt = None,
    max_slot_retained: SlotOpt = None, rows_per_s: RowsOpt = None,
    batches_per_s: BatchesOpt = None,
) -> None:
    """Run the controller until SIGTERM or Ctrl-C. One acts at a time (advisory lock); start
    a second one anywhere and it stands by."""
    from backfill.control.controller import Controller, default_actor
    from backfill.state.schema import check_schema

    s = cli_settings(ctx)
    cfg = guard(lambda: _config(config, replica, poll, hold, max_replica_lag, max_lock_waiters,
                                 max_long_transaction, max_slot_retained, rows_per_s,
                                 batches_per_s))

    guard(lambda: check_schema(s.dsn))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hook = cli_base.DISPATCH_HOOK
    # The controller's own identity, not the operator's (--actor): its transitions, its
    # leadership and its resumes are recorded as controller:host:pid, so two on one host
    # are told apart and a failover shows as a new leader.
    actor = default_actor()

    def on_resume(job: store.JobRecord) -> None:
        if job.runs_on == "workers" and hook is not None:
            hook(s.dsn, job.id, actor=actor)

    out.print(f"controller {actor}: polling every {format_duration(cfg.poll_s)}; "
              "standing by if another one acts")
    Controller(s.dsn, cfg, actor=actor, stop=stop, on_resume=on_resume).run_forever()


@controller_app.command("check")
def check_(
    ctx: typer.Context, config: ConfigOpt = None, replica: ReplicaOpt = None,
    max_replica_lag: LagOpt = None, max_lock_waiters: WaitersOpt = None,
    max_long_transaction: XactOpt = None, max_slot_retained: SlotOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Read every signal once and show what the controller would decide; changes nothing."""
    from backfill.control.controller import Controller

    s = cli_settings(ctx)
    cfg = guard(lambda: _config(config, replica, None, None, max_replica_lag, max_lock_waiters,
                                 max_long_transaction, max_slot_retained, None, None))
    result = guard(lambda: Controller(s.dsn, cfg).tick(act=False))
    assert result is not None
    if as_json:
        out.print_json(json.dumps({
            "readings": [r.to_json() for r in result.readings],
            "decisions": [{"job_id": d.job_id, "action": d.action, "reason": d.reason}
                          for d in result.decisions]}))
        return
    names = guard(lambda: _job_names(s.dsn, result.readings))
    out.print(_readings_table(result.readings, _limits_in_force(cfg.to_json(), names)))
    for d in result.decisions:
        out.print(escape(f"job {d.job_id}: would {d.action}: {d.reason}"), highlight=False)
    if not result.decisions:
        out.print("no job would change state")


def _readings_table(readings: list[Reading], limits: Callable[[Reading], Limit | None]) -> Table:
    from rich.table import Table

    table = Table("signal", "value", "throttle at", "resume below", "detail")
    for r in readings:
        lim = limits(r)
        value = show(r.kind, r.value) if r.value is not None else f"unreadable: {r.error}"
        table.add_row(escape(r.signal), escape(value), _threshold(r.kind, lim, 0),
                      _threshold(r.kind, lim, 1), escape(r.detail or ""))
    return table


def _threshold(kind: str, lim: Limit | None, which: int) -> str:
    if lim is None:
        return "-"  # a reading with no limit is shown but never acts
    value = (lim.throttle_at, lim.resume_below)[which]
    return show(kind, value) if math.isfinite(value) else "off"


def _limits_in_force(settings: Mapping[str, Any] | None,
                     job_names: Mapping[int, str]) -> Callable[[Reading], Limit | None]:
    """The limit each reading was compared with, from the settings the acting controller
    recorded with its last poll: a per-job override by job name, else the global limit."""

    def parse(raw: Mapping[str, Any]) -> dict[str, Limit]:
        out = {}
        for kind, pair in raw.items():
            top, below = (float("inf") if v is None else float(v) for v in pair)
            out[kind] = Limit(top, min(top, below))
        return out

    settings = settings or {}
    limits = parse(settings.get("limits") or {})
    per_job = {name: parse(v) for name, v in (settings.get("per_job") or {}).items()}

    def find(r: Reading) -> Limit | None:
        mine = per_job.get(job_names.get(r.job_id, "")) if r.job_id is not None else None
        return (mine or {}).get(r.kind) or limits.get(r.kind)

    return find


@controller_app.command("status")
def status_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which controller is acting, when it last polled, and what it read."""
    from backfill.core.db import connect
    from backfill.state import control
    from backfill.state.schema import require_current

    s = cli_settings(ctx)

    def read() -> dict[str, Any] | None:
        conn = connect(s.dsn)
        try:
            require_current(conn)
            return control.controller_status(conn)
        finally:
            conn.close()

    st = guard(read)
    if st is None:
        fail("no controller has run on this database (`backfill controller run`)", 1)
    if as_json:
        out.print_json(json.dumps(st, default=str))
        return
    age = float(st["age_s"])
    alive = control.controller_alive(age, (st.get("settings") or {}).get("poll_s"))
    out.print(f"leader {st['leader']} since {st['leader_since']:%Y-%m-%d %H:%M:%S}; last poll "
              f"{format_duration(age)} ago" + ("" if alive else "  [red](stale: is it running?)[/]"))
    readings = [Reading(kind=kind_of(r["signal"]), signal=r["signal"], value=r.get("value"),
                        error=r.get("error"), detail=r.get("detail"), job_id=_job_of(r))
                for r in st["readings"]]
    names = guard(lambda: _job_names(s.dsn, readings))
    out.print(_readings_table(readings, _limits_in_force(st.get("settings"), names)))
    if not alive:
        raise typer.Exit(1)


def _job_of(reading: Mapping[str, Any]) -> int | None:
    """The job a recorded reading is about (``lock_waiters[job 3]``), if any."""
    if reading.get("job_id") is not None:
        return int(reading["job_id"])
    source = str(reading.get("signal", "")).partition("[")[2].removesuffix("]")
    number = source.removeprefix("job ")
    return int(number) if source.startswith("job ") and number.isdigit() else None


def _job_names(dsn: str, readings: list[Reading]) -> dict[int, str]:
    ids = sorted({r.job_id for r in readings if r.job_id is not None})
    if not ids:
        return {}
    from backfill.core.db import connect
    from backfill.state import control

    conn = connect(dsn)
    try:
        return control.job_names(conn, ids)
    finally:
        conn.close()
