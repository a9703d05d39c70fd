"""``rename_column``: both names readable and writable until ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import _DOLLAR
from backfill.migrate.operations.copied import _Copied
from backfill.migrate.shape import ColumnShape, TableShape, quote


class RenameColumn(_Copied):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        old, new = self.ident("column"), self.ident("to")
        src = t.column(old)
        if new in t.columns:
            raise InvalidInput(f"{self.where()}: column {new!r} already exists in {t.qualified}")
        if old in t.primary_key:
            raise InvalidInput(f"{self.where()}: {old} is part of the primary key; "
                               "renaming a key column is not supported")
        view_schema = self.opt("view_schema")
        if view_schema is not None:
            view_schema = sqltext.identifier(view_schema, slot="`view_schema`")
            return self.by_view(t, old, new, view_schema)
        self.sync(t, old, new, src.type, quote(old), quote(new))
        self.warnings.append(self.moves_to_end(t, new))
        # The default moves with the swap: on the new column before then, it would hide
        # which side an INSERT wrote.
        self.swap(t, old, new, rename_to=None, default=src.default)
        t.columns.pop(old)
        t.columns[new] = ColumnShape(new, src.type, src.not_null, src.default)
        self.shape.version(t)
        return f"rename {t.qualified}.{old} to {new}"

    def by_view(self, t: TableShape, old: str, new: str, view_schema: str) -> str:
        """pgroll's way, where it fits: an instant rename, and in the same transaction a view
        in ``view_schema`` that shows the table under the old column name. The old application
        reads and writes through it (a simple view is updatable) with ``search_path =
        view_schema, public``, set before start: until the view exists, that path falls
        through to the table itself."""
        self.view = True
        self.shape.claim("relation", t, t.name, self.where(), schema=view_schema)
        view = sql.Identifier(view_schema, t.name)
        cols = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.Identifier(new), sql.Identifier(old)) if c == old
            else sql.Identifier(c) for c in t.columns)
        self.add("start", f"rename {old} to {new}, and view {view_schema}.{t.name} showing it "
                 f"as {old} (one transaction)", "tx",
                 sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                     t.ident, sql.Identifier(old), sql.Identifier(new)),
                 sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(view_schema)),
                 sql.SQL("CREATE VIEW {} AS SELECT {} FROM {}").format(view, cols, t.ident),
                 lock=self.brief(t))
        self.check("start", f"view {view_schema}.{t.name} exists", sql.SQL(
            "SELECT to_regclass({}) IS NOT NULL").format(
                sql.Literal(f"{quote(view_schema)}.{quote(t.name)}")))
        rename_back = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            t.ident, sql.Identifier(new), sql.Identifier(old)).as_string(self.conn)
        self.add("rollback", f"drop view {view_schema}.{t.name}, rename {new} back to {old}",
                 "tx", sql.SQL("DROP VIEW IF EXISTS {}").format(view),
                 sql.SQL("DO {d} BEGIN IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                         "{t}::regclass AND attname = {n} AND NOT attisdropped) THEN {r}; "
                         "END IF; END {d}").format(
                     d=sql.SQL(_DOLLAR), t=sql.Literal(t.regclass), n=sql.Literal(new),
                     r=sql.SQL(rename_back)), lock=self.brief(t))
        self.add("complete", f"drop view {view_schema}.{t.name} (the old application is gone)",
                 "tx", sql.SQL("DROP VIEW IF EXISTS {}").format(view),
                 lock=f"ACCESS EXCLUSIVE on the view {view_schema}.{t.name}")
        src = t.columns.pop(old)
        t.columns[new] = ColumnShape(new, src.type, src.not_null, src.default)
        self.warnings.append(f"before start, point the old application at the view: "
                             f"search_path = {view_schema}, {t.schema}")
        return f"rename {t.qualified}.{old} to {new}, old name kept in view {view_schema}.{t.name}"

    def irreversible(self) -> str | None:
        if getattr(self, "view", False):
            return None
        return f"column {self.t.qualified}.{self.old} (its values live on in the new column)"
