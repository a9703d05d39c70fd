"""``drop_index``: dropped CONCURRENTLY in ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core.catalog import split_name
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation
from backfill.migrate.shape import quote


class DropIndex(Operation):
    def build(self) -> str:
        name = self.text("name")
        schema, idx = split_name(name)
        row = self.conn.execute(
            """SELECT n.nspname, t.relname, tn.nspname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
               JOIN pg_namespace tn ON tn.oid = t.relnamespace
               WHERE c.relname = %s AND c.relkind = 'i'
                 AND (n.nspname = %s OR (%s::text IS NULL AND n.nspname = ANY (current_schemas(false))))
               LIMIT 1""", (idx, schema, schema)).fetchone()
        if row is None:
            raise InvalidInput(f"{self.where()}: index {name!r} does not exist")
        used = self.conn.execute(
            "SELECT conname FROM pg_constraint WHERE conindid = %s::regclass AND contype IN "
            "('p', 'u', 'x')", (f"{quote(str(row[0]))}.{quote(idx)}",)).fetchone()
        if used:
            raise InvalidInput(f"{self.where()}: index {name} backs constraint {used[0]}; "
                               "drop the constraint instead")
        self.q = f"{row[0]}.{idx}"
        regclass = f"{quote(str(row[0]))}.{quote(idx)}"
        self.add("complete", f"drop index {idx} CONCURRENTLY", "concurrent",
                 sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                     sql.Identifier(str(row[0]), idx)),
                 lock=f"SHARE UPDATE EXCLUSIVE on {row[2]}.{row[1]}", risk="medium")
        self.check("complete", f"index {idx} is gone", sql.SQL(
            "SELECT to_regclass({}) IS NULL").format(sql.Literal(regclass)))
        return f"drop index {self.q} (on complete)"

    def irreversible(self) -> str | None:
        return f"index {self.q} (a create_index can build it again)"
