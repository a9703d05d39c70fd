"""``sql``: the escape hatch, statements per phase, linted."""

from __future__ import annotations

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation


class RawSql(Operation):
    """An escape hatch: statements for each phase, linted; flagged rules must be allowed."""

    def build(self) -> str:
        from backfill.migrate.lint import lint_sql

        # The executor sets lock_timeout itself; the linter cannot see that.
        allow = set(self.names("allow", required=False, idents=False)) | {"missing-lock-timeout"}
        concurrent = self.flag("concurrent")
        described = self.opt("description", "custom SQL")
        for phase, key in (("start", "up"), ("complete", "complete"), ("rollback", "down")):
            text = self.text(key) if key == "up" else self.opt(key)
            if text is None:
                continue
            # One statement per string, sent one at a time; no transaction control.
            split = sqltext.statements(text, slot=f"`{key}`")
            findings = [f for f in lint_sql(text, f"{self.where()} `{key}`")
                        if f.rule not in allow]
            if findings:
                raise InvalidInput(
                    f"{self.where()}: `{key}` is flagged by the linter:\n  "
                    + "\n  ".join(f.render() for f in findings)
                    + "\nrewrite it, or list the rules in `allow` if you accept the risk")
            statements = tuple(sql.SQL(st) for st in split)
            self.add(phase, f"{described} ({key})", "concurrent" if concurrent else "tx",
                     *statements, lock="as written", risk="medium")
        return described
