"""``backfill lint FILE...``: unsafe migration SQL, found with PostgreSQL's own parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from backfill.cli.base import app, err, escape, fail, out
from backfill.core.errors import InvalidInput


@app.command()
def lint(
    files: Annotated[list[Path], typer.Argument(help="SQL files (`-` for standard input).")],
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Flag SQL that would lock the application out, rewrite a table or lose data, with the
    safe alternative. Exit 1 when anything is flagged, 2 on unreadable input. Opt a statement
    out with `-- backfill-lint: ignore <rule>` in or just before it. Needs no database."""
    # Imported here: the parser is only needed by this command.
    from backfill.migrate.lint import RULES, Finding, lint_sql

    if fmt not in ("text", "json"):
        fail(f"--format must be text or json, not {fmt!r}", 2)
    findings: list[Finding] = []
    for path in files:
        name = "<stdin>" if str(path) == "-" else str(path)
        try:
            data = (typer.get_binary_stream("stdin").read() if str(path) == "-"
                    else path.read_bytes())
            text = data.decode("utf-8")
        except OSError as exc:
            fail(f"cannot read {name}: {exc.strerror or exc}", 2)
        except UnicodeDecodeError as exc:
            fail(f"{name} is not UTF-8 text (byte {exc.start}: {exc.reason})", 2)
        if "\x00" in text:
            fail(f"{name} is not SQL text (it holds NUL bytes)", 2)
        try:
            findings += lint_sql(text, name)
        except InvalidInput as exc:
            fail(str(exc), 2)
    if fmt == "json":
        out.print_json(json.dumps({"findings": [f.to_json() for f in findings],
                                   "rules": sorted(RULES)}))
    else:
        for f in findings:
            out.print(escape(f.render()), highlight=False, soft_wrap=True)
        summary = (f"{len(findings)} finding(s) in {len(files)} file(s)" if findings
                   else f"{len(files)} file(s) clean")
        err.print(summary)
    if findings:
        raise typer.Exit(1)
