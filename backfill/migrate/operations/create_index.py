"""``create_index``: built CONCURRENTLY; an invalid leftover is dropped first."""

from __future__ import annotations

import re
from typing import cast

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation, object_name


class CreateIndex(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        cols = self.names("columns", required=False)
        expr = self.expression("expression")
        if bool(cols) == bool(expr):
            raise InvalidInput(f"{self.where()}: give `columns` or `expression` (one of them)")
        for c in cols:
            t.column(c)
        method = self.opt("method", "btree").lower()
        if not re.match(r"^[a-z_]+$", method):
            raise InvalidInput(f"{self.where()}: malformed index method {method!r}")
        where = self.expression("where")
        unique = self.flag("unique")
        name = self.ident("name", object_name("idx", t.name, *(cols or ("expr",))))
        self.shape.claim("relation", t, name, self.where())
        if expr:
            self.expr(t, expr, "expression")
        if where:
            self.expr(t, where, "where", boolean=True)
        body = (sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, cols))) if cols
                else sql.SQL("({})").format(
                    sqltext.expression_sql(cast(str, expr), percent=False)))
        definition = sql.SQL("USING {} {}{}").format(
            sql.SQL(method), body,
            sql.SQL(" WHERE {}").format(sqltext.expression_sql(where, percent=False))
            if where else sql.SQL(""))
        self.create_index_steps(t, name, definition, unique=unique)
        return (f"{'unique ' if unique else ''}index {name} on {t.qualified} "
                f"({', '.join(cols) or expr})")
