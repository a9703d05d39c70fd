"""``add_unique``: a unique index built CONCURRENTLY, then attached as a constraint."""

from __future__ import annotations

from psycopg import sql

from backfill.migrate.operations.base import Operation, object_name


class AddUnique(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        cols = self.names("columns")
        for c in cols:
            t.column(c)
        name = self.claim("constraint", t, self.ident("name", object_name("uq", t.name, *cols)))
        self.shape.claim("relation", t, name, self.where())
        self.create_index_steps(t, name, sql.SQL("({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols))), unique=True)
        self.add("start", f"attach {name} as a UNIQUE constraint (no scan: the index proves it)",
                 "tx", sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                     t.ident, sql.Identifier(name), sql.Identifier(name)), lock=self.brief(t))
        # Rollback runs in reverse: the constraint goes first, then its index.
        self.add("rollback", f"drop constraint {name}", "tx",
                 sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                     t.ident, sql.Identifier(name)), lock=self.brief(t))
        return f"unique ({', '.join(cols)}) on {t.qualified}"
