"""``drop_table``: the table goes in ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.migrate.operations.base import Operation


class DropTable(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        self.add("complete", f"drop table {t.qualified}", "tx",
                 sql.SQL("DROP TABLE IF EXISTS {}").format(t.ident), lock=self.brief(t),
                 risk="high")
        self.check("complete", f"{t.qualified} is gone", sql.SQL(
            "SELECT to_regclass({}) IS NULL").format(sql.Literal(t.regclass)))
        self.t = t
        self.shape.drop(t)
        return f"drop table {t.qualified} (on complete, once nothing reads it)"

    def irreversible(self) -> str | None:
        return f"table {self.t.qualified} and its rows"
