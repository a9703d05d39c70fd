"""``backfill list|show|status|watch``: what the jobs are doing, for people and for scripts
(``--json``)."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from backfill.cli.base import MAX_COUNT, app, client, escape, guard, out, seconds_option
from backfill.cli.render import canary_text, job_json
from backfill.core.durations import format_duration
from backfill.core.settings import Settings
from backfill.job.states import JobState

if TYPE_CHECKING:
    from rich.table import Table

    from backfill.state import checkpoints, store, views

# psycopg, the API and rich.live load in the commands, not for `--help` (fixed costs, issue 16).


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


def _bar(fraction: float | None, width: int = 12) -> str:
    """A text progress bar (plain characters: it survives SSH, logs and `watch`)."""
    if fraction is None:
        return "-"
    filled = round(fraction * width)
    return "#" * filled + "." * (width - filled)


def _jobs_table(rows: list[tuple[store.JobRecord, checkpoints.Progress]]) -> Table:
    from rich.table import Table

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
    from backfill.state import store

    if not page.more:
        return ""
    states = ", ".join(f"{page.by_state[st]:,} {st}" for st in store.LIST_ORDER
                       if page.by_state.get(st))
    return (f"... and {page.more:,} more ({page.total:,} jobs: {states}); "
            "--limit N shows more, --limit 0 all")


def _page_text(page: views.JobPage, include_all: bool) -> Any:
    from rich.console import Group

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
    from rich.table import Table

    s = ctx.obj if isinstance(ctx.obj, Settings) else None
    if defined:
        from backfill.job import registry

        reg = guard(lambda: registry.load(s.jobs_module if s else "jobs"))
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
    bf = client(ctx)
    paged = limit is not None or offset > 0
    if as_json and not paged:  # complete: every job
        rows = guard(lambda: bf.overview(include_finished=include_all))
        out.print_json(json.dumps([job_json(j, p) for j, p in rows], default=str))
        return
    size = DEFAULT_LIMIT if limit is None else limit or None
    page = guard(lambda: bf.page(include_finished=include_all, limit=size, offset=offset))
    if as_json:  # explicitly paginated
        out.print_json(json.dumps({
            "jobs": [job_json(j, p) for j, p in page.jobs], "total": page.total,
            "by_state": page.by_state, "limit": page.limit, "offset": page.offset,
            "next_offset": page.next_offset}, default=str))
        return
    out.print(_page_text(page, include_all))


def _mysql_copy(rec: Any) -> bool:
    from backfill.job.spec import source_engine

    return rec.kind == "copy" and source_engine(rec.spec.source_dsn) == "mysql"


def _catch_up(dsn: str, rec: Any) -> dict[str, Any]:
    """A MySQL copy job's binlog catch-up (bounded in time: the source may hang)."""
    try:
        from backfill.mysql.online import catch_up_status
    except ImportError as exc:   # the driver is an optional extra
        return {"state": "unknown", "reason": str(exc)}
    return catch_up_status(dsn, rec)


def _catch_up_text(c: dict[str, Any]) -> str:
    parts = [str(c["state"])]
    if "lag_seconds" in c:
        parts.append(f"lag {c['lag_seconds']}s / {c['lag_events']} events (source at "
                     f"{c['binlog_source']})")
    if "binlog_start" in c:
        parts.append(f"from {c['binlog_start']}, applied {c['binlog_applied']} "
                     f"({c['events_applied']} events)")
    if c.get("reason"):
        parts.append(str(c["reason"]))
    return "; ".join(parts)


def _show(ctx: typer.Context, job: str, as_json: bool, events: int) -> None:
    from rich.table import Table

    bf = client(ctx)
    rec, prog, evs, slices = guard(lambda: bf.inspect(job))
    if as_json:
        data = job_json(rec, prog)
        data["spec"] = rec.spec.to_json()
        if rec.canary_rows is not None:
            data["canary"] = {"rows": rec.canary_rows, "approved_by": rec.approved_by,
                              "approved_at": rec.approved_at,
                              "report": guard(lambda: bf.canary(rec.id))}
        data["slices"] = [{"slice": s.slice_no, "lower": s.lower_bound, "upper": s.upper_bound,
                           "cursor": s.cursor, "done": s.done, "rows": s.rows_scanned,
                           "batches": s.batches} for s in slices]
        if _mysql_copy(rec):
            data["catch_up"] = _catch_up(bf.dsn, rec)
        data["events"] = [{"at": e.at, "kind": e.kind, "from": e.from_state, "to": e.to_state,
                           "actor": e.actor, "reason": e.reason, "details": e.details}
                          for e in evs]
        out.print_json(json.dumps(data, default=str))
        return
    d = job_json(rec, prog)
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
        report = guard(lambda: bf.canary(rec.id))
        lines.append("  canary    " + escape(canary_text(rec, report)))
    rehearsed = guard(lambda: bf.rehearsal(rec.id))
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
        phase2 = guard(lambda: bf.move_phase2(rec.id))
        lines.append("  phase 2   " + (f"job {phase2.id} ({phase2.state}) deletes the copied "
                                       "rows from the source" if phase2 else
                                       "not started" + (f": `backfill run {rec.id}` starts it"
                                                        if rec.state == "succeeded" else
                                                        ": it starts when the copy is done")))
    if _mysql_copy(rec):
        lines.append("  catch-up  " + escape(_catch_up_text(_catch_up(bf.dsn, rec))))
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
    from rich.console import Group

    bf = client(ctx)
    size = DEFAULT_LIMIT if limit is None else limit or None

    def page() -> Any:
        return _page_text(guard(lambda: bf.page(include_finished=include_all, limit=size)),
                          include_all)

    if once:
        out.print(page())
        return

    from rich.live import Live

    from backfill.core.db import describe

    def render() -> Any:
        header = f"backfill jobs on {describe(bf.dsn)}  ({time.strftime('%H:%M:%S')})"
        return Group(header, page())

    n = 0
    try:
        with Live(render(), console=out.console, refresh_per_second=4, transient=False) as live:
            while True:
                n += 1
                if count and n >= count:
                    break
                time.sleep(interval)
                live.update(render())
    except KeyboardInterrupt:
        pass
