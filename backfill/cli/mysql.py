"""Commands for moves from MySQL/MariaDB (a copy as a job is ``backfill enqueue --kind copy
--source mysql://…``, which records the binlog position the catch-up below follows; these are
the schema, the standalone copy, the catch-up and the cutover):

    backfill convert-schema --source mysql://… [--tables a,b] [--cast t.c=type] [--apply]
    backfill mysql copy      --source mysql://… --tables a,b [--batch-size N]
    backfill mysql catch-up  --source mysql://… --tables a,b [--follow]
    backfill mysql verify    --source mysql://… --tables a,b
    backfill mysql show      --source mysql://… --tables a,b
    backfill mysql cutover   --source mysql://… --tables a,b   (the sequences; see docs)

The destination is the global ``--dsn`` (or ``$BACKFILL_DSN``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from backfill.cli.base import app, cli_settings, err, fail, out, seconds_option
from backfill.core.errors import InvalidOption

if TYPE_CHECKING:   # the commands import the driver, psycopg and pglast when they run
    from backfill.mysql.model import TablePlan
    from backfill.mysql.source import MySQLSource

T = TypeVar("T")

mysql_app = typer.Typer(help="Move tables from MySQL/MariaDB, online (see docs/mysql.md).",
                        no_args_is_help=True)
app.add_typer(mysql_app, name="mysql")

SourceOpt = Annotated[str, typer.Option(
    "--source", envvar="BACKFILL_MYSQL_SOURCE",
    help="mysql://user@host:port/db; the password in an option file (~/.my.cnf, or "
         "?read_default_file=PATH), never in the DSN.")]
TablesOpt = Annotated[str | None, typer.Option(
    "--tables", help="Comma-separated source tables (default: all base tables).")]
CastOpt = Annotated[list[str] | None, typer.Option(
    "--cast", help="Override a column's cast: table.column=pgtype (repeatable).")]
Tiny1Opt = Annotated[bool, typer.Option(
    "--tinyint1-boolean/--no-tinyint1-boolean", help="tinyint(1) to boolean (default).")]
CaseOpt = Annotated[str, typer.Option(
    "--identifier-case", help="lower (default) or preserve MySQL's spelling.")]
SchemaOpt = Annotated[str, typer.Option("--schema", help="PostgreSQL schema of the tables.")]


def _tables(tables: str | None) -> list[str] | None:
    if tables is None:
        return None
    names = [t.strip() for t in tables.split(",") if t.strip()]
    if not names:
        raise InvalidOption("--tables names no table")
    return names


def _mysql_errors(fn: Callable[[], T]) -> T:
    """The driver's errors as one line and exit 1 (ours pass through to the CLI's handler)."""
    from backfill.mysql.source import driver

    pymysql = driver()
    try:
        return fn()
    except pymysql.err.MySQLError as exc:
        args: tuple[object, ...] = tuple(getattr(exc, "args", ()))
        fail(f"MySQL error: {args[1] if len(args) > 1 else exc}", 1)


@contextmanager
def _plans(source_dsn: str, tables: str | None, casts: list[str] | None, tinyint1: bool,
           case: str, pg_schema: str) -> Iterator[tuple[MySQLSource, list[TablePlan]]]:
    from backfill.mysql import schema
    from backfill.mysql.schema import CastOptions
    from backfill.mysql.source import MySQLSource, connect

    source = MySQLSource.parse(source_dsn)
    if case not in ("lower", "preserve"):
        raise InvalidOption("--identifier-case is lower or preserve")
    options = CastOptions.from_specs(casts or [], tinyint1_boolean=tinyint1,
                                     identifier_case=case,  # type: ignore[arg-type]
                                     schema=pg_schema)
    conn = connect(source, raw=False)
    try:
        yield source, _mysql_errors(
            lambda: schema.convert(conn, source.database, _tables(tables), options))
    finally:
        conn.close()


@app.command("convert-schema")
def convert_schema(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
    apply: Annotated[bool, typer.Option("--apply", help="Create the tables in --dsn.")] = False,
) -> None:
    """Print the PostgreSQL DDL for MySQL tables (with --apply, create the tables; the
    indexes and foreign keys printed after the copy marker come after the copy)."""
    from backfill.core.db import connect as pg_connect
    from backfill.mysql import schema

    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (_, plans):
        for plan in plans:
            out.print(f"-- {plan.source.database}.{plan.source.name}: keyset key "
                      f"({', '.join(plan.key)})", highlight=False, markup=False)
            for c in plan.columns:
                out.print(f"--   {c.source.name} {c.source.column_type} -> {c.pg_type} "
                          f"[{c.rule}]", highlight=False, markup=False)
            for note in plan.notes:
                out.print(f"--   note: {note}", highlight=False, markup=False)
            out.print(schema.render([schema.create_statement(plan)]), highlight=False,
                      markup=False, soft_wrap=True)
        out.print("-- after the copy:", highlight=False, markup=False)
        for plan in plans:
            out.print(schema.render(schema.post_copy_statements(plan, plans)),
                      highlight=False, markup=False, soft_wrap=True)
        if apply:
            with pg_connect(cli_settings(ctx).dsn) as pg:
                schema.create_tables(pg, plans)
            err.print(f"created {len(plans)} table(s)")


@mysql_app.command("copy")
def copy_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=1_000_000)] = 10_000,
    pause: Annotated[float, typer.Option("--pause", parser=seconds_option(),
                                         help="Sleep between batches.")] = 0.0,
) -> None:
    """Copy the tables (created by convert-schema --apply) in keyset batches, each committed
    with its checkpoint; run again to resume after a kill."""
    from backfill.mysql.copy import copy_table

    dest = cli_settings(ctx).dsn
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        for plan in plans:
            res = _mysql_errors(lambda plan=plan: copy_table(  # type: ignore[misc]
                src, dest, plan, batch_size=batch_size, pause=pause))
            out.print(json.dumps({"table": plan.name, "rows": res.rows, "batches": res.batches,
                                  "seconds": round(res.seconds, 3),
                                  "rows_total": res.state.rows_copied,
                                  "binlog_start": str(res.state.start)}), highlight=False)


def _print_json(data: dict[str, object]) -> None:
    out.print(json.dumps(data, default=str), highlight=False, markup=False, soft_wrap=True)


@mysql_app.command("catch-up")
def catch_up_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep applying new changes until interrupted (Ctrl-C).")] = False,
    batch_events: Annotated[int, typer.Option("--batch-events", min=1)] = 10_000,
) -> None:
    """Apply the source's binlog since the copy's snapshot (to its end, or --follow)."""
    from backfill.mysql.binlog import catch_up

    dest = cli_settings(ctx).dsn
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        try:
            res = _mysql_errors(lambda: catch_up(src, dest, plans, batch_events=batch_events,
                                                 follow=follow))
        except KeyboardInterrupt:   # the position committed with the last batch stands
            err.print("interrupted: the applied position is committed; run again to continue")
            raise typer.Exit(130) from None
        _print_json({"events": res.events, "rows_written": res.rows_written,
                     "batches": res.batches, "position": str(res.position)})


@mysql_app.command("show")
def show_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
) -> None:
    """Each table's copy progress, applied binlog position, and catch-up lag (seconds and
    row changes not yet applied)."""
    from backfill.core.db import connect as pg_connect
    from backfill.mysql.binlog import measure_lag
    from backfill.mysql.copy import read_state

    dest = cli_settings(ctx).dsn
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        with pg_connect(dest) as pg:
            states = {p.name: read_state(pg, p) for p in plans}
        for plan in plans:
            state = states[plan.name]
            row: dict[str, object] = {"table": plan.name, "source": plan.source.name}
            if state is None:
                row["state"] = "not started"
            else:
                if state.job_id is not None:   # the copy's progress: `backfill show JOB`
                    row.update(job=state.job_id, job_state=state.job_state)
                else:
                    row["rows_copied"] = state.rows_copied
                row.update(state="caught up" if state.copy_done else "copying",
                           binlog_start=str(state.start),
                           binlog_applied=str(state.applied),
                           events_applied=state.events_applied,
                           last_event_at=state.applied_event_at)
                if state.copy_done:
                    lag = _mysql_errors(lambda plan=plan: measure_lag(  # type: ignore[misc]
                        src, dest, [plan]))
                    row.update(lag_seconds=round(lag.seconds, 1), lag_events=lag.events,
                               binlog_source=str(lag.source))
                    if lag.events:
                        row["state"] = "catching up"
            _print_json(row)


@mysql_app.command("verify")
def verify_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
    range_size: Annotated[int, typer.Option("--range-size", min=1, max=1_000_000)] = 10_000,
) -> None:
    """Compare per-range counts and checksums across the two engines; exit 1 on a
    difference."""
    from backfill.mysql.verify import verify_table

    dest = cli_settings(ctx).dsn
    bad = False
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        for plan in plans:
            rep = _mysql_errors(lambda plan=plan: verify_table(  # type: ignore[misc]
                src, dest, plan, range_size=range_size))
            bad = bad or not rep.ok
            _print_json({"table": rep.table, "ok": rep.ok, "ranges": rep.ranges,
                         "source_rows": rep.source_rows, "dest_rows": rep.dest_rows,
                         "extra_in_dest": rep.extra_in_dest,
                         "mismatched": [{"after": r.after, "last": r.last,
                                         "source_rows": r.source_rows,
                                         "dest_rows": r.dest_rows,
                                         "differences": r.differences}
                                        for r in rep.mismatched[:20]]})
    if bad:
        raise typer.Exit(1)


@mysql_app.command("gate")
def gate_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
    max_lag: Annotated[float, typer.Option("--max-lag", parser=seconds_option())] = 5.0,
    max_events: Annotated[int, typer.Option("--max-events", min=0)] = 10_000,
    hold: Annotated[float, typer.Option("--hold", parser=seconds_option())] = 30.0,
    timeout: Annotated[float, typer.Option("--timeout", parser=seconds_option())] = 600.0,
) -> None:
    """Wait until the catch-up lag has stayed under --max-lag for --hold (a follower must be
    running); exit 0 when the gate opens, 3 when it did not within --timeout."""
    from backfill.mysql.cutover import GatePolicy, wait_for_gate

    dest = cli_settings(ctx).dsn
    policy = GatePolicy(max_lag_seconds=max_lag, max_lag_events=max_events, hold_seconds=hold)
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        decision = _mysql_errors(lambda: wait_for_gate(src, dest, plans, policy,
                                                       timeout=timeout))
    _print_json({"open": decision.open, "reason": decision.reason})
    if not decision.open:
        raise typer.Exit(3)


@mysql_app.command("cutover")
def cutover_cmd(
    ctx: typer.Context, source: SourceOpt, tables: TablesOpt = None, cast: CastOpt = None,
    tinyint1_boolean: Tiny1Opt = True, identifier_case: CaseOpt = "lower",
    pg_schema: SchemaOpt = "public",
) -> None:
    """After the application stopped writing to the source: drain the binlog, verify every
    table, move the identity sequences. Then switch the application (docs/mysql.md)."""
    from backfill.mysql.cutover import cutover

    dest = cli_settings(ctx).dsn
    with _plans(source, tables, cast, tinyint1_boolean, identifier_case, pg_schema) as (
            src, plans):
        rep = _mysql_errors(lambda: cutover(src, dest, plans))
    _print_json({"drained_events": rep.drained.events if rep.drained else 0,
                 "verified": {v.table: v.source_rows for v in rep.verify},
                 "sequences": rep.sequences})
