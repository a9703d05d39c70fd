"""``add_column``: nullable first, filled by a backfill, constrained after."""

from __future__ import annotations

from typing import cast

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.core.sqltext import column_names
from backfill.migrate.operations.base import Operation, any_changed, object_name
from backfill.migrate.shape import ColumnShape, quote


class AddColumn(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        col = self.ident("column")
        typ = self.type_field("type")
        default = self.expression("default")
        value = self.expression("value")
        not_null = self.flag("not_null")
        if col in t.columns:
            raise InvalidInput(f"{self.where()}: column {col!r} already exists in {t.qualified}")
        if not_null and default is None and value is None and t.exists:
            raise InvalidInput(f"{self.where()}: a NOT NULL column on an existing table needs "
                               "a `default` or a `value` to fill the rows already there")
        self.expr(t, default or "NULL", "type" if default is None else "default", cast_to=typ)
        if value is not None:
            self.expr(t, value, "value", cast_to=typ)
        ident, cident = t.ident, sql.Identifier(col)
        volatile = default is not None and self.shape.volatile(default)
        fill = value if value is not None else (default if volatile else None)
        col_def = sql.SQL("{} {}").format(cident, sqltext.type_sql(typ))
        goal = f"add column {t.qualified}.{col} {typ}"
        if default is not None and not volatile:
            col_def = sql.SQL("{} DEFAULT {}").format(
                col_def, sqltext.expression_sql(default, percent=False))
        drop = sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(ident, cident)
        if not_null and fill is None:
            # A non-volatile default: PostgreSQL 11+ stores it once; no rewrite, no backfill.
            self.add("start", f"add {col} NOT NULL with a stored default (no rewrite)", "tx",
                     sql.SQL("ALTER TABLE {} ADD COLUMN {} NOT NULL").format(ident, col_def),
                     lock=self.brief(t))
            self.add("rollback", f"drop column {col}", "tx", drop, lock=self.brief(t))
            t.columns[col] = ColumnShape(col, typ, True, default)
            return goal + " NOT NULL DEFAULT " + str(default)
        self.add("start", f"add {col} as a nullable column (no rewrite)", "tx",
                 sql.SQL("ALTER TABLE {} ADD COLUMN {}").format(ident, col_def),
                 lock=self.brief(t))
        # Registered now so that rollback, which runs in reverse, drops the trigger first.
        self.add("rollback", f"drop column {col}", "tx", drop, lock=self.brief(t))
        t.columns[col] = ColumnShape(col, typ, False, default)
        if volatile:
            self.add("start", f"default {default} for new rows only (no rewrite)", "tx",
                     sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                         ident, cident, sqltext.expression_sql(cast(str, default), percent=False)),
                     lock=self.brief(t))
        trig = None
        if fill is not None and t.exists:
            # Rows the application writes before the backfill reaches them get the value too,
            # so the NOT VALID check below never fails an application's INSERT or UPDATE.
            # The old version does not know the column: when one of its writes changes what
            # the value is computed from, the value follows. The new version writes it itself.
            trig = object_name("fill", t.name, col)
            inputs = [c for c in t.columns if c in column_names(fill) and c != col]
            follow: sql.Composable = sql.SQL("")
            if inputs:
                follow = sql.SQL(
                    "\n    ELSIF TG_OP = 'UPDATE' AND NOT {new_app} AND NEW.{c} IS NOT DISTINCT "
                    "FROM OLD.{c}\n          AND ({changed}) THEN NEW.{c} := ({v});").format(
                    new_app=self.from_new(), c=cident,
                    v=sqltext.expression_sql(fill, percent=False),
                    changed=any_changed(inputs))
            self.trigger(t, trig, "BEFORE", "INSERT OR UPDATE", sql.SQL(
                "    IF NEW.{c} IS NULL THEN NEW.{c} := ({v});{follow}\n    END IF;\n"
                "    RETURN NEW;").format(
                    c=cident, v=sqltext.expression_sql(fill, percent=False), follow=follow),
                variables=column_names(fill))
            self.shape.version(t)
            self.job(t, f"fill {col}", {"kind": "update", "set": [[col, fill]],
                                        "where": f"{quote(col)} IS NULL"})
        if not_null and t.exists:
            chk = self.not_null_check(t, col)
            # The trigger stays until NOT NULL holds: while VALIDATE scans, writes go on.
            self.validate_constraint(t, chk, "complete")
            stmts = self.not_null_statements(t, col, chk)
            if trig is not None:
                stmts += self.drop_trigger_statements(t, trig)
            self.add("complete", f"SET NOT NULL on {col} (instant: proven by {chk})"
                     + (", drop the fill trigger" if trig else ""), "tx", *stmts,
                     lock=self.brief(t))
            self.check_not_null(t, col)
        else:
            if trig is not None:
                self.drop_trigger(t, trig, "complete")
            if not_null:
                self.add("start", f"SET NOT NULL on {col} (a new table: nothing to scan)",
                         "tx", sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                             ident, cident), lock=self.brief(t))
        t.columns[col] = ColumnShape(col, typ, not_null, default)
        return goal + (" NOT NULL" if not_null else "") + (f", filled with {fill}" if fill else "")
