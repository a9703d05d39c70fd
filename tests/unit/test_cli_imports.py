"""Fixed costs: a command of the core CLI does not import what it never uses (issue 16).

Each probe runs in a fresh interpreter and reports which of the heavy modules it loaded:
psycopg (~80 ms), pglast (~30 ms), the API and the engine behind it, structlog (~35 ms),
pydantic (~50 ms, typer's coercion), rich (~15 ms; its live and progress views more), Celery."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Any

import pytest

from backfill.cli.main import _command_of

HEAVY = ("celery", "psycopg", "pglast", "structlog", "pydantic", "backfill.api",
         "backfill.engine.runner", "backfill.state.store", "backfill.migrate.file",
         "backfill.control.controller", "rich.console", "rich.live", "rich.progress")

PROBE = """
import sys
sys.argv = ["backfill", *{args!r}]
import backfill.cli.main as cli
cli._load_plugins()
print(sorted(m for m in {heavy!r} if m in sys.modules))
print(sys.modules['backfill.cli.base'].DISPATCH_HOOK is not None)
"""

# The whole command line, as the console script runs it (its output goes to /dev/null).
RUN = """
import contextlib, io, sys
sys.argv = ["backfill", *{args!r}]
from backfill.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        main()
    except SystemExit as exc:
        code = exc.code
print(sorted(m for m in {heavy!r} if m in sys.modules))
print(code)
"""


def _python(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items()   # rich would treat the pipe as a terminal
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(BACKFILL_DSN="", DATABASE_URL="")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, env=env).stdout.split("\n")


def _loaded(*args: str) -> tuple[list[str], bool]:
    out = _python(PROBE.format(args=list(args), heavy=HEAVY))
    return ast.literal_eval(out[0]), out[1] == "True"


def _ran(*args: str) -> tuple[list[str], Any]:
    out = _python(RUN.format(args=list(args), heavy=HEAVY))
    return ast.literal_eval(out[0]), ast.literal_eval(out[1])


def test_the_command_word_skips_the_global_options() -> None:
    assert _command_of(["--dsn", "host=x", "--log-level", "debug", "run", "3"]) == "run"
    assert _command_of(["--actor", "me", "db", "upgrade"]) == "db"
    assert _command_of(["--help"]) is None
    assert _command_of(["undo_log", "list"]) == "undo-log"


@pytest.mark.parametrize("args", [("--help",), ("enqueue", "--help"), ("run", "--help"),
                                  ("db", "upgrade", "--help"), ("list", "--help"), ()])
def test_help_loads_no_database_driver_parser_api_or_logging(args: tuple[str, ...]) -> None:
    # The help of the whole app lists every command (so the plugins' command modules load),
    # but loads none of what the commands do: it is what `backfill --help` waits for.
    modules, code = _ran(*args)
    assert modules == [], modules
    assert code in (0, 2)  # no command at all: the help, exit 2 (no_args_is_help)


@pytest.mark.parametrize("args", [("run", "1"), ("enqueue", "-t", "t"), ("db", "upgrade"),
                                  ("--dsn", "x", "show", "1")])
def test_core_commands_load_their_dependencies_when_they_run(args: tuple[str, ...]) -> None:
    # Registering the commands loads none of them: the API, psycopg and pglast load inside
    # the command that runs, Celery only when a job is sent to the workers.
    modules, hook = _loaded(*args)
    assert modules == []
    assert hook, "enqueue --workers and resume still reach the workers (Celery on demand)"


def test_a_command_without_a_database_fails_in_one_line_before_loading_the_api() -> None:
    modules, code = _ran("run", "1")
    assert code == 2  # no database given
    assert "backfill.api" not in modules
    assert "psycopg" not in modules


def test_other_commands_and_help_still_load_every_plugin() -> None:
    modules, _ = _loaded("lint", "x.sql")
    assert "backfill.migrate.file" not in modules  # loaded by `lint` when it runs, not before
    out = _python("import sys; sys.argv = ['backfill', 'lint', 'x.sql']\n"
                  "import backfill.cli.main as cli\ncli._load_plugins()\n"
                  "print('backfill.cli.lint' in sys.modules, 'backfill.cli.migrate' in sys.modules)")
    assert out[0] == "True True"
    out = _python("import sys; sys.argv = ['backfill', '--help']\n"
                  "import backfill.cli.main as cli\ncli._load_plugins()\n"
                  "print(all(f'backfill.cli.{m}' in sys.modules for m in "
                  "('controller', 'exporter', 'lint', 'migrate', 'safety')))")
    assert out[0] == "True"


def test_import_backfill_is_lazy_and_its_public_names_unchanged() -> None:
    out = _python(f"""
import sys
import backfill
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
from backfill import Backfill, JobState, update
import backfill.api, backfill.job.spec, backfill.job.states
print(Backfill is backfill.api.Backfill and update is backfill.job.spec.update
      and JobState is backfill.job.states.JobState)
print(all(getattr(backfill, n) is not None for n in backfill.__all__),
      set(backfill.__all__) <= set(dir(backfill)))
try:
    backfill.no_such_name
except AttributeError:
    print("AttributeError")
""")
    assert ast.literal_eval(out[0]) == []
    assert out[1] == "True"
    assert out[2] == "True True"
    assert out[3] == "AttributeError"


def test_plain_option_values_coerce_as_typers_own_coercion_does() -> None:
    # backfill.cli.params passes str, flag, list-of-str and parser options through without
    # pydantic; for every such option of every command, the result (or the error) must be
    # what typer's own coercion gives.
    import typer
    from typer import core as typer_core
    from typer import main as typer_main

    from backfill.cli import main as cli_main
    from backfill.cli import params

    build = getattr(typer_core, "build_runtime_param", None)
    if build is None:
        pytest.skip("this typer coerces through click's types")
    for name in ("controller", "exporter", "lint", "migrate", "safety"):
        __import__(f"backfill.cli.{name}")
    assert getattr(build, "_backfill_plain", False)
    samples: dict[str, list[Any]] = {
        "str": ["x", "", "ünï ; DROP", "--"], "bool": [True, False],
        "list": [("a", "b"), ["c"], ()],
        "parser": ["2", "500ms", "1m30s", "0", "-1", "nan", "abc", "1e400", 30.0, "5"],
    }
    typers_own = build._typers_own
    ctx = typer.Context(typer_main.get_command(cli_main.app))
    checked = 0

    def walk(cmd: Any) -> None:
        nonlocal checked
        for p in cmd.params:
            kind = params._plain_kind(p.type_descriptor)
            if kind is None:
                continue
            fast, slow = build(p.type_descriptor), typers_own(p.type_descriptor)
            for value in samples[kind]:
                got = _outcome(fast, value, p, ctx)
                assert got == _outcome(slow, value, p, ctx), (cmd.name, p.name, value)
                checked += 1
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer_main.get_command(cli_main.app))
    assert checked > 100


def _outcome(runtime: Any, value: Any, param: Any, ctx: Any) -> tuple[str, Any]:
    import typer

    try:
        return "ok", runtime.coerce(value, param=param, ctx=ctx)
    except typer.BadParameter as exc:
        return "error", exc.format_message()


def test_plain_lines_and_json_logs_off_a_terminal_load_no_rich() -> None:
    # `enqueue -q`, `db upgrade` and `run` off a terminal print plain lines and log JSON:
    # rich (and structlog's rich console) stay unloaded; markup still goes through rich.
    out = _python("""
import sys
from backfill.cli.base import escape, out
from backfill.core import logs
logs.configure(json=True)
out.print("job 1 succeeded"); out.print(7); print(escape("no tag"), out.is_terminal)
logs.get_logger().info("a line")
print("rich" in sys.modules, "structlog" in sys.modules)
out.print("[bold]x[/bold] " + escape("[b]") + " [red]" + escape("C:\\\\") + "[/]")
print("rich" in sys.modules)
""")
    assert out[:4] == ["job 1 succeeded", "7", "no tag False", "False True"]
    assert out[4:6] == ["x [b] C:\\", "True"]
