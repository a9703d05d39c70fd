"""``create_table``: a new table, created in ``start``; dropped by ``rollback``."""

from __future__ import annotations

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation
from backfill.migrate.shape import ColumnShape


class CreateTable(Operation):
    def build(self) -> str:
        name = self.text("table")
        cols = self.get("columns", required=True)
        if not isinstance(cols, list) or not cols or not all(isinstance(c, dict) for c in cols):
            raise InvalidInput(f"{self.where()}: `columns` must be a list of "
                               "{{ name, type, not_null, default, primary_key }} tables")
        shapes, defs, pk = [], [], []
        for c in cols:
            unknown = set(c) - {"name", "type", "not_null", "default", "primary_key"}
            if unknown or not isinstance(c.get("name"), str) or not isinstance(c.get("type"), str):
                raise InvalidInput(f"{self.where()}: each column needs `name` and `type` "
                                   f"(and optionally not_null, default, primary_key): {c!r}")
            cname = sqltext.identifier(c["name"], slot="column `name`")
            ctype = sqltext.type_name(c["type"], slot=f"`type` of {cname}")
            cdefault = (None if c.get("default") is None else
                        sqltext.expression(str(c["default"]), slot=f"`default` of {cname}"))
            d = sql.SQL("{} {}").format(sql.Identifier(cname), sqltext.type_sql(ctype))
            if c.get("not_null") or c.get("primary_key"):
                d = sql.SQL("{} NOT NULL").format(d)
            if cdefault is not None:
                d = sql.SQL("{} DEFAULT {}").format(
                    d, sqltext.expression_sql(cdefault, percent=False))
            if c.get("primary_key"):
                pk.append(cname)
            defs.append(d)
            shapes.append(ColumnShape(cname, ctype, bool(c.get("not_null")), cdefault))
        if len({c.name for c in shapes}) != len(shapes):
            raise InvalidInput(f"{self.where()}: a column is named twice")
        if not pk:
            self.warnings.append(f"{name} has no primary key: backfill jobs on it need a key "
                                 "with a unique index (give one column primary_key = true)")
        if pk:
            defs.append(sql.SQL("PRIMARY KEY ({})").format(
                sql.SQL(", ").join(sql.Identifier(p) for p in pk)))
        for c in shapes:
            if c.name in pk and c.type.lower() in ("integer", "int", "int4", "serial", "smallint"):
                self.warnings.append(f"{c.name} is a {c.type} primary key: it runs out at "
                                     "2^31; use bigint (bigserial or identity)")
        t = self.shape.create(name, shapes, tuple(pk))
        for c in shapes:   # the types and defaults, checked before anything is written
            self.expr(t, c.default or "NULL", f"{c.name} {c.type}", cast_to=c.type)
        self.shape.claim("relation", t, t.name, self.where())
        self.add("start", f"create table {t.qualified}", "tx",
                 sql.SQL("CREATE TABLE {} ({})").format(t.ident, sql.SQL(", ").join(defs)),
                 lock="none (a new table)")
        self.add("rollback", f"drop table {t.qualified} (and any rows written to it since)",
                 "tx", sql.SQL("DROP TABLE IF EXISTS {}").format(t.ident),
                 lock=self.brief(t), risk="medium")
        return f"create table {t.qualified}"
