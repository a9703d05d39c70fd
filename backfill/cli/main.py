"""The ``backfill`` command line: operators' and scripts' entry point.

Exit codes: 0 success; 1 operational failure (job failed or cancelled, database unreachable,
verify found differences, a pre-flight check failed); 2 bad input (nothing was written); 3 the
job is paused or throttled (by an operator or the controller), or its canary awaits approval;
130 interrupted with Ctrl-C (job paused, checkpoint kept).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from backfill.cli import db, jobs, listing, steer  # noqa: F401  (their commands register on the app)
from backfill.cli.base import app, err, escape, explain_error


def _load_plugins() -> None:
    """Commands of the layers above the core (``workers.cli`` adds worker, dispatch, reap).
    Imported by name so the core never imports Celery itself."""
    # A command of this module's own (run, enqueue, db …) needs none of the core plugins:
    # skipping them spares each process pglast and the controller (fixed cost, issue 16).
    own = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    own |= {g.name for g in app.registered_groups if g.name}
    if _command_of(sys.argv[1:]) not in own:
        for core in ("backfill.cli.controller", "backfill.cli.exporter", "backfill.cli.lint",
                     "backfill.cli.migrate", "backfill.cli.mysql", "backfill.cli.safety"):
            importlib.import_module(core)
    for name in os.environ.get("BACKFILL_CLI_PLUGINS", "workers.cli").split(","):
        if not name.strip():
            continue
        try:
            importlib.import_module(name.strip())
        except ModuleNotFoundError as exc:  # Celery not installed: the inline CLI still works
            if exc.name not in (name.strip(), "celery", "workers"):
                raise


def _command_of(args: list[str]) -> str | None:
    """The command word of a command line (after the global options), or None."""
    valued = {"--dsn", "--actor", "--jobs-module", "--log-format", "--log-level"}
    it = iter(args)
    for a in it:
        if a in valued:
            next(it, None)
        elif not a.startswith("-"):
            return a.replace("_", "-")
    return None


def main() -> None:
    try:
        _load_plugins()
    except Exception as exc:  # a broken plugin: one line, not a traceback
        known = explain_error(exc) or (1, f"cannot load the commands: {type(exc).__name__}: {exc}")
        err.print(f"[bold red]error:[/] {escape(known[1])}", highlight=False)
        sys.exit(known[0])
    with _only(_command_of(sys.argv[1:])):
        app()  # errors become one line and an exit code in _Commands.invoke


@contextlib.contextmanager
def _only(word: str | None) -> Iterator[None]:
    """While a command line runs, the app holds just the command it names (when it names
    one): Typer turns every registered command into a click command before parsing, about
    1 ms each (their signatures and type hints), and only one of them runs (fixed costs,
    issue 16). `--help`, no command, or a word that is not a command: all of them, so the
    list and the "no such command" error read as before."""
    named = [c for c in app.registered_commands
             if (c.name or (c.callback.__name__ if c.callback else "").replace("_", "-")) == word]
    groups = [g for g in app.registered_groups if g.name == word]
    if not named and not groups:
        yield
        return
    everything = app.registered_commands, app.registered_groups
    app.registered_commands, app.registered_groups = named, groups
    try:
        yield
    finally:
        app.registered_commands, app.registered_groups = everything


if __name__ == "__main__":
    # Through the imported module, so plugins register their commands on that module's app.
    importlib.import_module("backfill.cli.main").main()
