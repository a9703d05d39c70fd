"""``drop_column``: the column goes in ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation, no_column


class DropColumn(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        col = self.ident("column")
        t.column(col)
        if col in t.primary_key:
            raise InvalidInput(f"{self.where()}: {col} is part of the primary key of "
                               f"{t.qualified}")
        refs = self.column_refs(t, col)
        if refs:
            self.warnings.append(f"dropping {col} also drops: {', '.join(refs)}")
        self.add("complete", f"drop column {col}", "tx",
                 sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
                     t.ident, sql.Identifier(col)), lock=self.brief(t), risk="high")
        self.check("complete", f"{col} is gone", no_column(t, col))
        del t.columns[col]
        self.t, self.col = t, col
        return f"drop column {t.qualified}.{col} (on complete, once nothing reads it)"

    def irreversible(self) -> str | None:
        return f"column {self.t.qualified}.{self.col} and its values"
