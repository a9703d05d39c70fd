"""Every command and subcommand, with hostile arguments: a clean exit 1 or 2 (0 or 3 where the
input happens to be fine), one line saying what is wrong, never a traceback.

The commands are read from the typer app itself, so a new command is covered when it is added.
In-process (typer's CliRunner) for the generated cases, as the real entry point for a few.
An unexpected exception is not hidden by the CLI's error handling: it prints "internal
error", which fails here as a bug.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from backfill import Backfill, update
from backfill.cli import main as cli
from tests.integration.helpers import ROOT, cli_env, make_counter_table

cli._load_plugins()  # the commands of every layer, as `backfill` has them

#: Commands that run until stopped, or replace the process: not run in-process here (their
#: argument checks are covered as subprocesses below, and their work by their own tests).
LONG_RUNNING = {
    ("worker",): "execs a Celery worker",
    ("exporter",): "serves metrics until SIGTERM",
    ("controller", "run"): "polls until SIGTERM",
}
#: Extra arguments that bound a command that would otherwise keep going.
BOUNDED = {("watch",): ["--once"]}
#: Options not generated: they talk to the Celery broker (covered by test_workers) or
#: repeat forever.
NOT_GENERATED = {"--workers", "--every"}

MISSING = "/nonexistent/backfill-hostile/file.sql"


def _commands() -> Iterator[tuple[tuple[str, ...], Any]]:
    def walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    yield from walk(typer.main.get_command(cli.app), ())


COMMANDS = [(path, cmd) for path, cmd in _commands() if path not in LONG_RUNNING]


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("hostile")
    (d / "binary.sql").write_bytes(b"\xff\xfe\x00\x01CREATE\x00INDEX \x80\x81")
    (d / "empty.toml").write_bytes(b"")
    (d / "garbage.toml").write_text("[[[ not toml = = \n")
    return {"binary": str(d / "binary.sql"), "empty": str(d / "empty.toml"),
            "garbage": str(d / "garbage.toml"), "dir": str(d)}


def _values(files: dict[str, str]) -> st.SearchStrategy[str]:
    """Empty, NaN, negative, huge, wrong type, a missing file, a binary file, and text."""
    fixed = ["", " ", "nan", "NaN", "inf", "-inf", "-1", "-0", "0", "1", "1.5", "1e400",
             "99999999999999999999999", "-99999999999999999999", "9223372036854775808",
             "abc", "²", "٣", "1_000", "0x10", "1m30x", "%s", "%(lower)s", "' OR 1=1 --",
             "é", "\udcff", "-", "--",
             "a=b", "items", "items.missing", "x:y", "os:system", "no.such.module:f",
             MISSING, files["binary"], files["empty"], files["garbage"], files["dir"]]
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=12)
    hostile = st.sampled_from(fixed)
    return st.one_of(hostile, hostile, hostile, text)  # mostly the known-hostile values


def _argv(draw: Any, path: tuple[str, ...], cmd: Any, values: st.SearchStrategy[str]) -> list[str]:
    args: list[str] = list(path)
    positional: list[str] = []
    for param in cmd.params:
        if param.name == "help":
            continue
        if param.param_type_name == "argument":
            count = 1 if param.nargs == 1 else draw(st.integers(1, 2))
            if param.required or draw(st.booleans()):
                # a job or migration that exists, now and then, so commands get past the lookup
                real = st.just("1") if param.name in ("job", "ref") else values
                positional += [draw(st.one_of(values, real)) for _ in range(count)]
            continue
        opts = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
        if not opts or any(o in NOT_GENERATED for o in opts) or not draw(st.booleans()):
            continue
        opt = draw(st.sampled_from(opts))
        args += [opt] if getattr(param, "is_flag", False) else [opt, draw(values)]
    args += BOUNDED.get(path, [])
    if path == ("dispatch",):  # a real job would be sent to the broker
        positional = [p for p in positional if p.strip() != "1"] or ["-1"]
    return [*args, "--", *positional] if positional else args


@pytest.fixture
def db(dsn: str) -> str:
    """A database with a table and one pending job (id 1) to act on."""
    make_counter_table(dsn, 200)
    bf = Backfill(dsn)
    bf.upgrade()
    bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=100))
    return dsn


def _invoke(argv: list[str], **kwargs: Any) -> Any:
    """Run the CLI in this process, then put logging back as it was: the CLI configures it
    to write to the runner's stream, which is closed afterwards (later tests would fail)."""
    configured, config = structlog.is_configured(), structlog.get_config()
    try:
        return CliRunner().invoke(cli.app, argv, **kwargs)
    finally:
        if configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()


def _check(result: Any, argv: list[str]) -> None:
    output = result.output  # stdout and stderr
    assert "Traceback" not in output, (argv, output)
    assert "internal error" not in output, (argv, output)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{argv}: {result.exception!r}") from result.exception
    assert result.exit_code in (0, 1, 2, 3), (argv, result.exit_code, output)


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_with_hostile_arguments(path: tuple[str, ...], cmd: Any, db: str,
                                              hostile_files: dict[str, str]) -> None:
    values = _values(hostile_files)

    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(st.data())
    def once(data: st.DataObject) -> None:
        argv = _argv(data.draw, path, cmd, values)
        result = _invoke(["--dsn", db, *argv], input=b"\xff\xfe\x00binary",
                         env={"BACKFILL_LOG_FORMAT": "json", "BACKFILL_ACTOR": "tester"})
        _check(result, argv)

    once()


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(option=st.sampled_from(["--dsn", "--actor", "--jobs-module", "--log-format",
                               "--log-level"]),
       value=st.sampled_from(["", "nan", "-1", "no.such", "os", "\udcff", "debug", "json",
                              "postgresql://x@127.0.0.1:1/x", "host=", "%s", MISSING]),
       command=st.sampled_from([["list"], ["list", "--defined"], ["show", "1"],
                                ["db", "status"], ["enqueue", "nope"]]))
def test_global_options_with_hostile_values(option: str, value: str, command: list[str],
                                            db: str) -> None:
    argv = [*(["--dsn", db] if option != "--dsn" else []), option, value, *command]
    result = _invoke(argv, env={"BACKFILL_LOG_FORMAT": "json"})
    _check(result, argv)


def _real(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The installed entry point (``backfill.cli.main:main``) in its own process."""
    return subprocess.run(
        [sys.executable, "-c", "from backfill.cli.main import main; main()", *args],
        input=stdin, capture_output=True, timeout=60, env=cli_env(), cwd=ROOT, check=False)


def test_the_real_entry_point_exits_2_with_one_line(db: str, tmp_path: Path) -> None:
    binary = tmp_path / "binary.sql"
    binary.write_bytes(b"\xff\xfe\x00CREATE INDEX")
    cases: list[tuple[list[str], bytes | None, str]] = [
        (["lint", str(binary)], None, "is not UTF-8 text"),
        (["lint", "-"], b"\xff\xfe\x00", "<stdin> is not UTF-8 text"),
        (["lint", MISSING], None, "cannot read"),
        (["--dsn", db, "watch", "--interval", "nan", "--once"], None, "finite"),
        (["--dsn", db, "watch", "--interval", "-1", "--once"], None, "negative"),
        (["--dsn", db, "--jobs-module", "no.such", "list", "--defined"], None, "no.such"),
        (["--dsn", db, "verify", "1", "--chunk", "99999999999999999999"], None, "--chunk"),
        (["--dsn", db, "tune", "1", "--max-retries", "99999999999999999999"], None,
         "max_retries"),
        (["--dsn", db, "tune", "1", "--statement-timeout", "1e300"], None, "at most"),
        (["--dsn", db, "exporter", "--port", "99999999"], None, "--port"),
        (["--dsn", db, "exporter", "--finished-for", "nan"], None, "finite"),
        (["--dsn", db, "controller", "run", "--rows-per-s", "nan"], None, "--rows-per-s"),
        (["--dsn", db, "worker", "--concurrency", "-1"], None, "--concurrency"),
        (["--dsn", db, "migrate", "plan", str(binary)], None, f"{binary} is not UTF-8 text"),
        (["--dsn", db, "preflight", "1", "--config", str(binary)], None, str(binary)),
        (["--dsn", db, "controller", "check", "--config", str(binary)], None, str(binary)),
    ]
    for args, stdin, says in cases:
        proc = _real(*args, stdin=stdin)
        text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        assert proc.returncode == 2, (args, proc.returncode, text)
        assert "Traceback" not in text, (args, text)
        assert says in text, (args, text)
    # An unreachable database is operational (1), still one line.
    down = _real("--dsn", "postgresql://nobody@127.0.0.1:1/none", "list")
    assert down.returncode == 1
    assert b"Traceback" not in down.stderr
    assert len(down.stderr.decode().strip().splitlines()) == 1


def test_a_bug_is_one_line_that_says_so_and_debug_shows_its_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Backfill, "page", bug)
    argv = ["--dsn", "postgresql://nobody@127.0.0.1:1/none", "list"]
    plain = _invoke(argv)
    assert plain.exit_code == 1
    assert plain.output.strip() == ("error: internal error: ZeroDivisionError: a bug (a bug; "
                                    "`--log-level debug` shows the traceback)")
    debug = _invoke([*argv[:2], "--log-level", "debug", *argv[2:]])
    assert debug.exit_code == 1
    assert "Traceback" in debug.output
    assert "raise ZeroDivisionError" in debug.output
