"""What every command module shares: the Typer app, the consoles, the option parsers, and the
guard that turns an error into one line and an exit code."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from backfill.cli import params
from backfill.core import logs
from backfill.core.durations import parse_duration_ms
from backfill.core.errors import BackfillError, InvalidInput
from backfill.core.settings import Settings, default_actor, dsn_from_env

if TYPE_CHECKING:
    from rich.console import Console

    from backfill.api import Backfill

# Heavy modules (psycopg, the API, the engine, rich.live/progress, pglast) are imported inside
# the commands that use them: `backfill --help` and a command's own `--help` load none of them
# (fixed costs, issue 16; tests/unit/test_cli_imports.py keeps it so).


params.install()  # option values without pydantic where typer's coercion is the identity


def _is_db_error(exc: BaseException) -> bool:
    """A psycopg error, without importing psycopg: a process that never loaded it cannot
    have raised one."""
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


def explain_error(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the one line a user sees for an error we expect to meet (bad input, an
    unreadable file, an unreachable database), or ``None`` for one we did not expect (a bug).

    2: the input must be fixed (nothing was written); 1: an operational failure."""
    if isinstance(exc, BackfillError):
        return exc.exit_code, str(exc)
    if _is_db_error(exc):
        from backfill.core.db import redact_text

        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return 1, f"database error: {type(exc).__name__}: {redact_text(lines[0]) if lines else ''}"
    if isinstance(exc, UnicodeDecodeError):
        return 2, f"input is not UTF-8 text (byte {exc.start}: {exc.reason})"
    if isinstance(exc, UnicodeError):  # e.g. an argument with bytes that are not UTF-8
        return 2, f"input is not valid text: {exc}"
    if isinstance(exc, ImportError):  # modules users name are checked where they are named
        from backfill.mysql.source import EXTRA_MODULES, MISSING_EXTRA

        if (exc.name or "").split(".")[0] in EXTRA_MODULES:   # a plain install, no extra
            return 2, MISSING_EXTRA
        return 1, f"cannot import {exc.name or 'a module'}: {exc} (is it installed?)"
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return 2, f"cannot read {exc.filename}: {exc.strerror or exc}"
        return 1, f"{exc.strerror or exc}"
    return None


class _Commands(TyperGroup):
    """The root command group: whatever a command raises ends as one line on stderr and an exit
    code, never a traceback. Expected errors (see :func:`explain_error`) exit 2 or 1; anything
    else is a bug, reported as ``internal error`` (exit 1), with its traceback under
    ``--log-level debug``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # the one place errors become exit codes
            known = explain_error(exc)
            settings = ctx.obj
            debug = isinstance(settings, Settings) and settings.log_level.lower() == "debug"
            if known is None:
                from backfill.core.db import redact_text

                if debug:
                    err.print(traceback.format_exc(), markup=False, highlight=False)
                fail(f"internal error: {type(exc).__name__}: {redact_text(str(exc))} (a bug; "
                      "`--log-level debug` shows the traceback)", 1)
            fail(known[1], known[0])


app = typer.Typer(
    name="backfill",
    cls=_Commands,
    help="Run large PostgreSQL backfills and data moves safely: keyset batches, checkpoints "
    "in the batch's transaction, live pause/resume/tune.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



#: Environment variables that make rich treat a pipe as a terminal.
_RICH_TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


class _Console:
    """rich's Console for stdout or stderr, made when first used: `--help` never prints
    through it, and rich.console takes about 15 ms to import (fixed costs, issue 16)."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Off a terminal, do not wrap at 80 columns: lines go to logs and scripts whole.
            self._console = Console(stderr=self._stderr,
                                    width=None if stream.isatty() else 200)
        return self._console

    def _plain(self) -> bool:
        """Output goes to a file or pipe and rich is not asked to treat it as a terminal."""
        stream = sys.stderr if self._stderr else sys.stdout
        return (self._console is None and not stream.isatty()
                and not any(os.environ.get(v) for v in _RICH_TERMINAL_ENV))

    @property
    def is_terminal(self) -> bool:
        return False if self._plain() else self.console.is_terminal

    def print(self, *objects: Any, **kwargs: Any) -> None:
        text = str(objects[0]) if len(objects) == 1 and isinstance(objects[0], str | int) else None
        if not kwargs and text is not None and "[" not in text and self._plain():
            # A plain line off a terminal is what rich would print (no markup, no colour, no
            # wrapping at our width): skip importing rich for it (~15 ms per process).
            (sys.stderr if self._stderr else sys.stdout).write(text + "\n")
            return
        self.console.print(*objects, **kwargs)

    def print_json(self, json: str | None = None, **kwargs: Any) -> None:
        self.console.print_json(json, **kwargs)


out = _Console(stderr=False)
err = _Console(stderr=True)


def escape(markup: str) -> str:
    """rich's markup escape (rich is imported by the first command that prints)."""
    if "[" not in markup and not markup.endswith("\\"):
        return markup  # nothing to escape: no need to import rich for it
    from rich.markup import escape as rich_escape

    return rich_escape(markup)

T = TypeVar("T")

EXIT_PAUSED = 3
EXIT_INTERRUPTED = 130

#: The largest count an option takes (PostgreSQL's int): beyond it a value is a typo.
MAX_COUNT = 2**31 - 1


def seconds_option(minimum: float = 0.0) -> Callable[[str], float]:
    """A parser for a duration option in seconds (``2``, ``500ms``, ``1m30s``): finite, not
    negative, at least ``minimum`` and at most a year (a sleep that long is a typo)."""

    def parse(value: str) -> float:
        try:
            seconds = parse_duration_ms(str(value), option="value") / 1000.0
        except InvalidInput as exc:
            raise typer.BadParameter(str(exc).removeprefix("value: ")) from None
        if not minimum <= seconds <= 366 * 86400:
            raise typer.BadParameter(f"{value!r} is not between {minimum:g}s and a year")
        return seconds

    return parse


def positive_number(value: str) -> float:
    """A parser for a finite number above zero (a rate, a budget)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise typer.BadParameter(f"{value!r} is not a finite number above 0")
    return number


def cli_settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    if not isinstance(settings, Settings) or not settings.dsn:
        raise InvalidInput(
            "no database given: pass --dsn or set BACKFILL_DSN "
            "(e.g. postgresql://user@host:5432/dbname)"
        )
    return settings


def client(ctx: typer.Context) -> Backfill:
    s = cli_settings(ctx)  # no database: one line, before the API loads
    from backfill.api import Backfill

    return Backfill(s.dsn, actor=s.actor, jobs_module=s.jobs_module)


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as exc:
        if not (isinstance(exc, BackfillError) or _is_db_error(exc)):
            raise
        known = explain_error(exc)
        assert known is not None
        fail(known[1], known[0])


@app.callback()
def main_options(
    ctx: typer.Context,
    dsn: Annotated[str | None, typer.Option(
        "--dsn", help="Database to work on (default: $BACKFILL_DSN, then $DATABASE_URL).",
        show_default=False)] = None,
    actor: Annotated[str | None, typer.Option(
        "--actor", envvar="BACKFILL_ACTOR",
        help="Who you are, recorded with every state change (default: user@host).")] = None,
    jobs_module: Annotated[str, typer.Option(
        "--jobs-module", envvar="BACKFILL_JOBS_MODULE",
        help="Module holding defined jobs (a `registry`).")] = "jobs",
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="BACKFILL_LOG_FORMAT",
        help="auto (console on a terminal, JSON otherwise), json or console.")] = "auto",
    log_level: Annotated[str, typer.Option(
        "--log-level", envvar="BACKFILL_LOG_LEVEL",
        help="debug, info, warning or error (debug logs every batch).")] = "info",
) -> None:
    settings = guard(lambda: Settings(
        dsn=dsn or dsn_from_env() or "", actor=actor or default_actor(),
        jobs_module=jobs_module, log_format=log_format, log_level=log_level))
    logs.configure(
        json=None if log_format == "auto" else log_format == "json", level=log_level
    )
    ctx.obj = settings

#: Set by the workers plugin (``workers.cli``): send a job to the Celery workers now.
#: Called as ``DISPATCH_HOOK(dsn, job_id, actor=...)``; raises BrokerUnavailable or
#: BrokerMisconfigured.
DISPATCH_HOOK: Callable[..., object] | None = None


def interruptible(fn: Callable[[threading.Event], T], *, stopping: str,
                  aborted: str) -> tuple[T, bool]:
    """Run ``fn(stop)`` with Ctrl-C wired to it: the first sets ``stop`` (``fn`` winds down
    at its next safe point), the second aborts (exit 130). Returns ``fn``'s result and
    whether it was interrupted."""
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        err.print(f"\n[yellow]interrupt: {stopping}[/]")
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return fn(stop), stop.is_set()
    except KeyboardInterrupt:
        err.print(f"[red]aborted: {aborted}[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGINT, previous)
