"""``backfill migrate plan|start|complete|rollback|status``: the zero-downtime migration workflow."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from backfill.cli.base import MAX_COUNT, app, cli_settings, err, escape, guard, interruptible, out
from backfill.cli.jobs import _ProgressView
from backfill.core.durations import format_duration

if TYPE_CHECKING:
    from backfill.migrate.file import MigrationFile
    from backfill.migrate.steps import OpPlan, Step

# The migration files' reader, the steps, pglast (core.sqltext) and psycopg load in the
# commands, not for `--help` (fixed costs, issue 16).

T = TypeVar("T")

migrate_app = typer.Typer(
    help="Zero-downtime schema changes: plan, start (expand + backfill), complete (contract, "
    "behind a gate), rollback, status. See docs/migrations.md.",
    no_args_is_help=True)
app.add_typer(migrate_app, name="migrate")

FileArg = Annotated[Path, typer.Argument(help="Migration file (TOML).", show_default=False)]
RefArg = Annotated[str, typer.Argument(help="Migration file, or the id of a started migration.",
                                       show_default=False)]

#: Rates the plan assumes when this database has no measured figure: guesses, labelled so.
ASSUMED_ROWS_PER_S = 10_000.0
ASSUMED_SCAN_BYTES_PER_S = 200 * 2**20
ASSUMED_BUILD_BYTES_PER_S = 50 * 2**20


def _migrator(ctx: typer.Context, notify: bool = True, **kw: Any) -> Any:
    from backfill.migrate.executor import Migrator

    s = cli_settings(ctx)
    return Migrator(s.dsn, actor=s.actor,
                    notify=(lambda m: err.print(escape(m), highlight=False)) if notify else None,
                    **kw)


def _ref(ref: str) -> str:
    """A path names a file (its id is read from it); anything else is an id."""
    from backfill.migrate.file import load_file

    p = Path(ref)
    if p.suffix == ".toml" or p.exists():
        return guard(lambda: load_file(p)).id
    return ref


# -- plan ---------------------------------------------------------------------------------------


def _sizes(ctx: typer.Context, steps: list[Step]) -> dict[str, tuple[int, int]]:
    from backfill.core.db import connect
    from backfill.core.sqltext import qualified_name

    tables = sorted({s.table for s in steps if s.table})
    sizes: dict[str, tuple[int, int]] = {}
    with connect(cli_settings(ctx).dsn) as conn:
        for t in tables:
            schema, name = qualified_name(t)   # the plan writes names as SQL does
            row = conn.execute(
                """SELECT greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = %s AND c.relname = %s""", (schema, name)).fetchone()
            sizes[t] = (int(row[0]), int(row[1])) if row else (0, 0)
    return sizes


def _estimate(step: Step, sizes: dict[str, tuple[int, int]],
              rates: dict[str, tuple[float, str]]) -> tuple[float, str]:
    rows, size = step.expected or sizes.get(step.table or "", (0, 0))
    mb = size / 2**20
    filled = " once filled" if step.expected else ""
    if step.duration == "backfill":
        rate, basis = rates.get(step.table or "", (ASSUMED_ROWS_PER_S, "assumed"))
        return rows / rate, f"{rows:,} rows at {rate:,.0f} rows/s ({basis})"
    if step.duration == "scan":
        return size / ASSUMED_SCAN_BYTES_PER_S, f"scans {mb:,.1f} MB{filled} (guess: 200 MB/s)"
    if step.duration == "build":
        return size / ASSUMED_BUILD_BYTES_PER_S, (f"builds over {mb:,.1f} MB{filled} "
                                                  "(guess: 50 MB/s)")
    return 0.0, ""


def _plan_json(mig: MigrationFile, plans: tuple[OpPlan, ...], steps: dict[str, list[Step]],
               sizes: dict[str, tuple[int, int]], rates: dict[str, tuple[float, str]],
               deps: dict[str, str]) -> dict[str, Any]:
    from backfill.migrate.steps import PHASES

    phases = {}
    for phase in PHASES:
        est = [_estimate(s, sizes, rates) for s in steps[phase]]
        phases[phase] = {"estimated_s": round(sum(e[0] for e in est), 1),
                         "steps": [{**s.to_json(), "estimated_s": round(e[0], 1),
                                    "estimate_basis": e[1] or None}
                                   for s, e in zip(steps[phase], est, strict=True)]}
    risk = max((s.risk for p in PHASES for s in steps[p]),
               key=("low", "medium", "high").index, default="low")
    return {
        "id": mig.id, "description": mig.description, "checksum": mig.checksum,
        "goal": [p.goal for p in plans],
        "impact": {t: {"rows_estimate": r, "bytes": b} for t, (r, b) in sizes.items()},
        "risk": risk,
        "irreversible_on_complete": [p.irreversible for p in plans if p.irreversible],
        "warnings": [w for p in plans for w in p.warnings],
        "start_refuses": [f"operation {p.op + 1}: {b}" for p in plans for b in p.blockers],
        "dependencies": deps, "settings": mig.settings.to_json(), "phases": phases,
        "rows_per_s": {t: {"rate": r, "basis": b} for t, (r, b) in rates.items()},
    }


@migrate_app.command("plan")
def plan(
    ctx: typer.Context,
    file: FileArg,
    as_json: Annotated[bool, typer.Option("--json", help="The plan as JSON.")] = False,
) -> None:
    """Print what the migration will do: goal, impact (tables, rows, size), every step with the
    lock it takes and its risk, rollback, dependencies and an estimated duration. Checks every
    operation against the database; writes nothing."""
    from backfill.core.db import connect
    from backfill.core.sqltext import qualified_name
    from backfill.migrate.estimates import estimate_rows_per_s, sample_rows_per_s
    from backfill.migrate.file import load_file
    from backfill.migrate.records import find_migration
    from backfill.migrate.steps import PHASES, ordered_steps
    from backfill.safety.rehearsal import latest_for_table

    mig = guard(lambda: load_file(file))
    plans = guard(lambda: _migrator(ctx, notify=False).plan(mig))
    steps = ordered_steps(plans)
    sizes = guard(lambda: _sizes(ctx, [s for p in PHASES for s in steps[p]]))
    deps: dict[str, str] = {}
    rates: dict[str, tuple[float, str]] = {}

    def read() -> None:
        with connect(cli_settings(ctx).dsn) as conn:
            general = estimate_rows_per_s(conn)
            for s in steps["start"]:
                if s.mode != "backfill" or not s.table:
                    continue
                schema, name = qualified_name(s.table)
                rehearsed = latest_for_table(conn, schema or "public", name)
                if rehearsed and rehearsed.get("rows_per_s"):
                    rates[s.table] = (float(rehearsed["rows_per_s"]),
                                      f"rehearsed on {rehearsed.get('clone')}")
                elif general:
                    rates[s.table] = (general, "measured on this database's recent jobs")
                elif s.table not in rates:
                    sampled = sample_rows_per_s(conn, s.table)
                    if sampled:
                        rates[s.table] = (sampled, "sampled: a rolled-back update of 1,000 "
                                                   "rows, triggers and pacing not counted")
            for d in mig.depends_on:
                rec = find_migration(conn, d)
                deps[d] = rec.state if rec else "never run here"

    guard(read)
    doc = _plan_json(mig, plans, steps, sizes, rates, deps)
    if as_json:
        out.print_json(json.dumps(doc, default=str))
        return
    p = out.print
    p(f"[bold]migration {escape(mig.id)}[/]" + (f": {escape(mig.description)}"
                                                 if mig.description else ""), highlight=False)
    p(f"file {escape(str(file))}, checksum {mig.checksum}; nothing has been written",
      highlight=False)
    p("\n[bold]Goal[/]", highlight=False)
    for op in plans:
        p(f"  {op.op + 1}. {escape(op.goal)}", highlight=False)
    p("\n[bold]Impact[/]", highlight=False)
    filled = {s.table: s.expected for ph in PHASES for s in steps[ph] if s.table and s.expected}
    for t, (rows, size) in sizes.items():
        if t in filled and not rows and not size:
            will_rows, will_bytes = filled[t]
            p(f"  {escape(t)}: created by this migration; ~{will_rows:,} rows, "
              f"{will_bytes / 2**20:,.1f} MB once filled", highlight=False)
            continue
        p(f"  {escape(t)}: ~{rows:,} rows, {size / 2**20:,.1f} MB", highlight=False)
    if not sizes:
        p("  no existing table is scanned or filled", highlight=False)
    st = mig.settings
    p(f"  every DDL lock is taken under lock_timeout {st.lock_timeout_ms:.0f}ms, retried up to "
      f"{st.lock_retries} times with backoff: a blocked step never queues the application "
      "behind it", highlight=False)
    for phase in PHASES:
        est = doc["phases"][phase]
        title = {"start": "start (expand + backfill): `backfill migrate start`",
                 "complete": "complete (contract, after the gate): `backfill migrate complete`",
                 "rollback": "rollback (undoes start, before complete): "
                             "`backfill migrate rollback`"}[phase]
        p(f"\n[bold]{title}[/] — about {format_duration(est['estimated_s'])}", highlight=False)
        if not steps[phase]:
            p("  (nothing)", highlight=False)
        for no, (s, e) in enumerate(zip(steps[phase], est["steps"], strict=True), 1):
            extra = f" — {e['estimate_basis']}" if e["estimate_basis"] else ""
            p(f"  {no:>2}. [{_risk_style(s.risk)}]{s.risk:<6}[/] {escape(s.description)}"
              f"{escape(extra)}", highlight=False, soft_wrap=True)
            p(f"      mode {s.mode}; lock: {escape(s.lock)}; duration: {s.duration}",
              highlight=False, soft_wrap=True)
            for stmt in s.statements:
                first = stmt.strip().splitlines()[0] if stmt.strip() else ""
                more = " …" if "\n" in stmt.strip() else ""
                p(f"      [dim]{escape(first)}{more}[/]", highlight=False, soft_wrap=True)
            if s.job:
                job = json.dumps({k: v for k, v in s.job.items() if k != "options"})
                p(f"      [dim]job: {escape(job)}[/]", highlight=False, soft_wrap=True)
    p("\n[bold]Risk[/]", highlight=False)
    p(f"  highest step risk: {doc['risk']}", highlight=False)
    for w in doc["warnings"]:
        p(f"  [yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for b in doc["start_refuses"]:
        p(f"  [red]start refuses:[/] {escape(b)}", highlight=False, soft_wrap=True)
    p("\n[bold]Rollback[/]", highlight=False)
    p(f"  before complete: `backfill migrate rollback {escape(mig.id)}` runs the "
      f"{len(steps['rollback'])} rollback step(s) above, whatever start got to",
      highlight=False)
    if doc["irreversible_on_complete"]:
        p("  after complete: no automatic rollback; complete destroys "
          + escape("; ".join(doc["irreversible_on_complete"])), highlight=False,
          soft_wrap=True)
    else:
        p("  after complete: nothing is destroyed; undo with a new migration", highlight=False)
    p("\n[bold]Dependencies[/]", highlight=False)
    if deps:
        for d, state in deps.items():
            p(f"  {escape(d)}: {state}" + ("" if state == "completed" else
                                           " [red](start refuses until it is completed)[/]"),
              highlight=False)
    else:
        p("  none declared (depends_on)", highlight=False)
    if any(s.mode == "backfill" for s in steps["start"]):
        p("  the application must tolerate the expanded schema before start, and stop using "
          "what complete removes before complete", highlight=False)


def _risk_style(risk: str) -> str:
    return {"low": "green", "medium": "yellow", "high": "red"}.get(risk, "white")


# -- start / complete / rollback ------------------------------------------------------------------


def _interruptible(fn: Callable[[threading.Event], T]) -> T:
    return interruptible(fn, stopping="stopping after the current step or batch (Ctrl-C "
                         "again to abort)",
                         aborted="run the same command again; every step is idempotent")[0]


@migrate_app.command("start")
def start(
    ctx: typer.Context,
    file: FileArg,
    workers: Annotated[bool, typer.Option(
        "--workers", help="Run the backfills on the Celery workers instead of in this "
        "process.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="With --workers: wait for the backfills (default), or "
        "return once they are enqueued (exit 3; run start again to finish).")] = True,
) -> None:
    """Expand: run the additive steps (nullable columns, sync triggers, NOT VALID constraints,
    concurrent indexes), then the backfills, then the validations. Idempotent: after a crash
    or Ctrl-C, run it again and it continues where it stopped. Exit: 0 started, 1 failed,
    2 bad input, 3 waiting (a backfill paused, or on the workers)."""
    from backfill.migrate.file import load_file

    mig = guard(lambda: load_file(file))
    view = _ProgressView(out.is_terminal)

    def go(stop: threading.Event) -> Any:
        with view:
            return guard(lambda: _migrator(ctx, stop=stop, on_tick=view.tick).start(
                mig, workers=workers, wait=wait))

    _interruptible(go)
    schema = guard(lambda: _migrator(ctx).version_schema(mig.id))
    if schema:
        out.print(f"migration {escape(mig.id)} started. Run the new application version with "
                  f"search_path = {schema}, public (its shape, as views; both versions' writes "
                  "are synced). When no old-version session is left: "
                  f"`backfill migrate complete {escape(mig.id)}`", highlight=False)
        return
    out.print(f"migration {escape(mig.id)} started. When every client uses the new schema: "
              f"`backfill migrate complete {escape(mig.id)}`", highlight=False)


@migrate_app.command("complete")
def complete(ctx: typer.Context, ref: RefArg) -> None:
    """Contract, behind the gate: refuses unless every backfill of start succeeded and
    verifies, and every validation of start still holds. Then runs the contract steps (SET NOT
    NULL, column swap, drops). Idempotent: run it again after a crash."""
    mid = _ref(ref)
    _interruptible(lambda stop: guard(lambda: _migrator(ctx, stop=stop).complete(mid)))
    out.print(f"migration {escape(mid)} completed", highlight=False)


@migrate_app.command("rollback")
def rollback(ctx: typer.Context, ref: RefArg) -> None:
    """Undo start, whatever it got to: cancel its backfill jobs, then run the rollback steps in
    reverse (each idempotent). Refused once complete has begun (it drops data)."""
    mid = _ref(ref)
    _interruptible(lambda stop: guard(lambda: _migrator(ctx, stop=stop).rollback(mid)))
    out.print(f"migration {escape(mid)} rolled back", highlight=False)


# -- status -------------------------------------------------------------------------------------


@migrate_app.command("status")
def status(
    ctx: typer.Context,
    ref: Annotated[str | None, typer.Argument(
        help="Migration file or id (default: list every migration).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
    events: Annotated[int, typer.Option("--events", min=0, max=MAX_COUNT,
                                        help="How many recent events to show.")] = 10,
) -> None:
    """Show a migration's state and each step (pending, running, done, failed) with its job's
    progress and the last error; without an argument, list the migrations."""
    from rich.table import Table

    from backfill.migrate.steps import PHASES

    m = _migrator(ctx, notify=False)
    if ref is None:
        recs = guard(m.list)
        if as_json:
            out.print_json(json.dumps([{"id": r.id, "state": r.state, "description":
                                        r.description, "created_by": r.created_by,
                                        "updated_at": r.updated_at,
                                        "last_error": r.last_error} for r in recs],
                                      default=str))
            return
        table = Table("ID", "STATE", "UPDATED", "BY", "DESCRIPTION", box=None)
        for r in recs:
            table.add_row(escape(r.id), r.state, r.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
                          escape(r.created_by), escape(r.description))
        out.print(table if recs else "no migrations on this database")
        return
    mid = _ref(ref)
    st = guard(lambda: m.status(mid))
    if as_json:
        out.print_json(json.dumps({
            "id": st.migration.id, "state": st.migration.state,
            "last_error": st.migration.last_error,
            "steps": [{"phase": s.phase, "step_no": s.step_no, "state": s.state,
                       "description": s.step.description, "mode": s.step.mode,
                       "attempts": s.attempts, "job_id": s.job_id,
                       "last_error": s.last_error} for s in st.steps],
            "jobs": {str(k): {"state": str(j.state), "rows_done": p.rows_scanned,
                              "rows_estimate": j.rows_estimate}
                     for k, (j, p) in st.jobs.items()},
            "events": [{"at": e.at, "actor": e.actor, "kind": e.kind, "phase": e.phase,
                        "step_no": e.step_no, "message": e.message} for e in st.events],
        }, default=str))
        return
    rec = st.migration
    out.print(f"[bold]migration {escape(rec.id)}[/]: {rec.state}"
              + (f" — {escape(rec.description)}" if rec.description else ""), highlight=False)
    out.print(f"started by {escape(rec.created_by)} at {rec.created_at:%Y-%m-%d %H:%M:%S}",
              highlight=False)
    if rec.last_error:
        out.print(f"[red]last error:[/] {escape(rec.last_error)}", highlight=False,
                  soft_wrap=True)
    style = {"done": "green", "running": "yellow", "failed": "red", "pending": "dim"}
    for phase in PHASES:
        rows = [s for s in st.steps if s.phase == phase]
        if not rows or (phase == "rollback"
                        and rec.state not in ("rolling_back", "rolled_back")):
            continue
        out.print(f"\n[bold]{phase}[/]", highlight=False)
        for s in rows:
            line = f"  {s.step_no:>2}. [{style[s.state]}]{s.state:<8}[/] {escape(s.step.description)}"
            if s.job_id is not None and s.job_id in st.jobs:
                job, prog = st.jobs[s.job_id]
                total = job.rows_estimate
                pct = (f" {min(100.0, 100 * prog.rows_scanned / total):.0f}%" if total else "")
                line += f" (job {job.id}: {job.state}{pct}, {prog.rows_scanned:,} rows)"
            if s.attempts > 1:
                line += f" [dim]{s.attempts} attempts[/]"
            out.print(line, highlight=False, soft_wrap=True)
            if s.last_error and s.state == "failed":
                out.print(f"      [red]{escape(s.last_error)}[/]", highlight=False,
                          soft_wrap=True)
    if events > 0 and st.events:
        out.print("\n[bold]events[/]", highlight=False)
        for e in st.events[-events:]:
            where = f" {e.phase} {e.step_no}" if e.step_no else (f" {e.phase}" if e.phase
                                                                  else "")
            out.print(f"  {e.at:%H:%M:%S} {escape(e.actor)} {e.kind}{where}: "
                      f"{escape(e.message)}", highlight=False, soft_wrap=True)
