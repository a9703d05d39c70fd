"""``add_check``: NOT VALID first, validated after the backfills."""

from __future__ import annotations

from psycopg import sql

from backfill.core import sqltext
from backfill.migrate.operations.base import Operation


class AddCheck(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        name = self.claim("constraint", t, self.ident("name"))
        expr = self.text("check")
        expr = sqltext.expression(expr, slot="`check`")
        self.expr(t, expr, "check", boolean=True)
        self.add("start", f"add {name} NOT VALID (new rows are checked; no scan)", "tx",
                 sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}) NOT VALID").format(
                     t.ident, sql.Identifier(name), sqltext.expression_sql(expr, percent=False)),
                 lock=self.brief(t))
        self.validate_constraint(t, name)
        self.add("rollback", f"drop {name}", "tx",
                 sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                     t.ident, sql.Identifier(name)), lock=self.brief(t))
        return f"check {name} on {t.qualified}: {expr}"
