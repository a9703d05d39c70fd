"""Fixed costs: a command of the core CLI does not import what it never uses (issue 16)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from backfill.cli.main import _command_of

PROBE = """
import sys
sys.argv = ["backfill", *{args!r}]
import backfill.cli.main as cli
cli._load_plugins()
print(sorted(m for m in ("celery", "pglast", "backfill.migrate.file", "backfill.control.controller")
             if m in sys.modules))
print(sys.modules['backfill.cli.base'].DISPATCH_HOOK is not None)
"""


def _loaded(*args: str) -> tuple[list[str], bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    return ast.literal_eval(out[0]), out[1] == "True"


def test_the_command_word_skips_the_global_options() -> None:
    assert _command_of(["--dsn", "host=x", "--log-level", "debug", "run", "3"]) == "run"
    assert _command_of(["--actor", "me", "db", "upgrade"]) == "db"
    assert _command_of(["--help"]) is None
    assert _command_of(["undo_log", "list"]) == "undo-log"


@pytest.mark.parametrize("args", [("run", "1"), ("enqueue", "-t", "t"), ("db", "upgrade"),
                                  ("--dsn", "x", "show", "1")])
def test_core_commands_import_neither_celery_nor_other_command_groups(
        args: tuple[str, ...]) -> None:
    # pglast (about 25 ms) is loaded by every command: it is the gate that reads names and
    # SQL fragments (backfill.core.sqltext), which a stored job's table name goes through too.
    modules, hook = _loaded(*args)
    assert modules == ["pglast"]
    assert hook, "enqueue --workers and resume still reach the workers (Celery on demand)"


def test_other_commands_and_help_still_load_every_plugin() -> None:
    modules, _ = _loaded("lint", "x.sql")
    assert "pglast" in modules
    assert "backfill.migrate.file" in modules
    modules, _ = _loaded("--help")
    assert "backfill.control.controller" in modules
