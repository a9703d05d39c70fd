"""``backfill db upgrade|status``: the state schema."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from backfill.cli.base import app, cli_settings, guard, out

# psycopg and the schema's SQL load in the commands, not for `--help` (fixed costs, issue 16).

db_app = typer.Typer(help="Create, upgrade and inspect the `backfill` state schema.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


# -- db ---------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create the `backfill` schema or apply pending migrations (idempotent, concurrency-safe)."""
    from backfill.core.db import connect, describe
    from backfill.state.schema import upgrade_conn

    s = cli_settings(ctx)

    def upgrade() -> tuple[int, int]:
        # What Backfill.upgrade does, without loading the API and the engine for it.
        conn = connect(s.dsn)
        try:
            return upgrade_conn(conn)
        finally:
            conn.close()

    before, after = guard(upgrade)
    if before == after:
        out.print(f"state schema already at version {after} ({describe(s.dsn)})")
    else:
        out.print(f"state schema upgraded from version {before} to {after} ({describe(s.dsn)})")


@db_app.command("status")
def db_status(ctx: typer.Context,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the state schema's version and whether it is current."""
    from backfill.core.db import connect, describe
    from backfill.state.schema import LATEST, MIGRATIONS, current_version

    s = cli_settings(ctx)

    def read() -> int | None:
        conn = connect(s.dsn)
        try:
            return current_version(conn)
        finally:
            conn.close()

    version = guard(read)
    state = ("missing" if version is None else "current" if version == LATEST
             else "outdated" if version < LATEST else "newer than this backfill")
    if as_json:
        out.print_json(json.dumps({"version": version, "latest": LATEST, "state": state}))
    else:
        out.print(f"database: {describe(s.dsn)}\nstate schema: {state} "
                  f"(version {version if version is not None else '-'}, latest {LATEST})")
        for m in MIGRATIONS:
            mark = "applied" if version is not None and m.version <= version else "pending"
            out.print(f"  {m.version:>3}  {mark:<8} {m.description}")
    if version != LATEST:
        raise typer.Exit(1)
