"""The shadow-column pattern shared by ``rename_column`` and ``change_type``: a new column
kept in sync both ways by triggers, backfilled, swapped in at ``complete``."""

from __future__ import annotations

from psycopg import sql

from backfill.core import sqltext
from backfill.core.sqltext import column_names
from backfill.migrate.operations.base import Operation, no_column, object_name
from backfill.migrate.shape import ColumnShape, TableShape


class _Copied(Operation):
    """A column replaced by a new one kept in sync by a trigger until ``complete`` swaps them
    (rename, change of type): old and new application versions both keep working."""

    def sync(self, t: TableShape, old: str, new: str, new_type: str, up: str,
             down: str | None) -> None:
        o, n = sql.Identifier(old), sql.Identifier(new)
        src = t.column(old)
        self.expr(t, up, "using", cast_to=new_type)
        if down:
            self.expr(t, down, "down", cast_to=src.type, extra={new: new_type})
        self.add("start", f"add {new} {new_type} beside {old}", "tx",
                 sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                     t.ident, n, sqltext.type_sql(new_type)),
                 lock=self.brief(t))
        self.add("rollback", f"drop column {new}", "tx",
                 sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(t.ident, n),
                 lock=self.brief(t))
        t.columns[new] = ColumnShape(new, new_type, False, None)
        up_sql = sqltext.expression_sql(up, slot="`using`", percent=False)
        down_sql = sqltext.expression_sql(down, slot="`down`", percent=False) if down else None
        # Which application version wrote a row: a session whose search_path names the
        # version schema is the new one (it reads and writes the new shape through its views),
        # so it owns the new column and `down` carries its writes back. Otherwise it is told,
        # as before, by what the write changed (an application not using the version schema):
        # - INSERT: a side left NULL is computed from the other. The old column keeps its
        #   default until complete, so an old column equal to its default beside a new column
        #   that does not match it means the new application wrote only the new column.
        # - UPDATE of the old column only: the old application; the new one is recomputed.
        # - UPDATE of the new column only, to a value not already consistent with the old one
        #   (the backfill's writes are): the new application; the old one follows (`down`).
        # - any other UPDATE of a row the backfill has not reached fills the new column.
        ins_default: sql.Composable = sql.SQL("")
        if down_sql is not None and src.default is not None:
            ins_default = sql.SQL(
                "\n        ELSIF NEW.{o} IS NOT DISTINCT FROM ({d}) "
                "AND NEW.{n} IS DISTINCT FROM ({up}) THEN NEW.{o} := ({down});").format(
                    o=o, n=n, d=sql.SQL(src.default), up=up_sql, down=down_sql)
        # The new version's writes: the view shows only the new column, so every value of
        # the old one follows from it (an INSERT), or only when the write changed it.
        # An INSERT that leaves the new column out (the view has no default for it before
        # complete) takes the old column's default through `using`.
        new_version = sql.SQL(
            "    IF {new_app} THEN\n"
            "        IF TG_OP = 'INSERT' AND NEW.{n} IS NULL THEN\n"
            "            NEW.{n} := ({up});\n"
            "        ELSIF TG_OP = 'INSERT' OR NEW.{n} IS DISTINCT FROM OLD.{n} THEN\n"
            "{down_new}"
            "        ELSIF NEW.{n} IS NULL THEN\n"   # a row the backfill has not reached
            "            NEW.{n} := ({up});\n"
            "        END IF;\n"
            "        RETURN NEW;\n"
            "    END IF;\n").format(
            new_app=self.from_new(), n=n, up=up_sql,
            down_new=(sql.SQL("            NEW.{o} := ({d});\n").format(o=o, d=down_sql)
                      if down_sql else sql.SQL("            NULL;\n")))
        body = sql.SQL(
            "{new_version}"
            "    IF TG_OP = 'INSERT' THEN\n"
            "        IF NEW.{n} IS NULL THEN NEW.{n} := ({up});{ins_down}{ins_default} END IF;\n"
            "    ELSIF NEW.{o} IS DISTINCT FROM OLD.{o} AND NEW.{n} IS NOT DISTINCT FROM OLD.{n} THEN\n"
            "        NEW.{n} := ({up});\n"
            "{upd_down}"
            "    ELSIF NEW.{n} IS NULL THEN\n"
            "        NEW.{n} := ({up});\n"
            "    END IF;\n    RETURN NEW;").format(
            new_version=new_version,
            n=n, o=o, up=up_sql, ins_default=ins_default,
            ins_down=(sql.SQL(" ELSIF NEW.{o} IS NULL THEN NEW.{o} := ({d});").format(
                o=o, d=down_sql) if down_sql else sql.SQL("")),
            upd_down=(sql.SQL(
                "    ELSIF NEW.{n} IS DISTINCT FROM OLD.{n} AND NEW.{o} IS NOT DISTINCT FROM OLD.{o}\n"
                "          AND NEW.{n} IS DISTINCT FROM ({up}) THEN\n"
                "        NEW.{o} := ({d});\n").format(n=n, o=o, up=up_sql, d=down_sql)
                if down_sql else sql.SQL("")))
        self.trg = object_name("sync", t.name, old)
        self.trigger(t, self.trg, "BEFORE", "INSERT OR UPDATE", body,
                     variables=column_names(up) | column_names(down or ""))
        self.chk = self.not_null_check(t, new) if src.not_null else None
        self.job(t, f"copy {old} into {new}", {"kind": "update", "set": [[new, up]]})
        rows = f"~{t.rows:,} rows" if t.rows is not None else "every row"
        self.warnings.append(
            f"the copy rewrites every row of {t.qualified} ({rows}, "
            f"{(t.bytes or 0) / 2**20:,.1f} MB now): a new version of each row, as much WAL "
            "(replicas, backups), and dead versions vacuum must clear; the table does not "
            "shrink by itself")
        if not down:
            self.warnings.append(f"no `down`: rows written through {new} alone do not update "
                                 f"{old}; until complete, write {old} (or give `down`)")
        refs = self.column_refs(t, old)
        if refs:
            self.warnings.append(f"{old} is used by {', '.join(refs)}: these do not follow to "
                                 f"{new}; recreate them on {new} (e.g. a create_index "
                                 "operation in this migration) before complete drops "
                                 f"{old}; complete fails while a view depends on {old}")

    def moves_to_end(self, t: TableShape, col: str) -> str:
        return (f"after complete, {col} is the last column of {t.qualified} (the copy is a new "
                "column): SELECT * and COPY or INSERT without a column list see the columns "
                "in a new order")

    def swap(self, t: TableShape, old: str, new: str, *, rename_to: str | None,
             default: str | None = None) -> None:
        """Contract in one brief transaction, the trigger kept until then (writes go on while
        VALIDATE scans): SET NOT NULL, drop the trigger, drop the old column, rename."""
        if self.chk:
            self.validate_constraint(t, self.chk, "complete")
        stmts = self.not_null_statements(t, new, self.chk) if self.chk else []
        stmts += self.drop_trigger_statements(t, self.trg)
        if default is not None:
            stmts.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                t.ident, sql.Identifier(new), sql.SQL(default)))
        stmts.append(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
            t.ident, sql.Identifier(old)))
        if rename_to:
            stmts.append(sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                t.ident, sql.Identifier(new), sql.Identifier(rename_to)))
        self.add("complete", (f"{'SET NOT NULL on ' + new + ', ' if self.chk else ''}"
                              f"drop trigger {self.trg}, drop {old}"
                              + (f", rename {new} to {rename_to}" if rename_to else "")
                              + " (one transaction)"), "tx", *stmts, lock=self.brief(t),
                 risk="high")
        final = rename_to or new
        typed: sql.Composable = sql.SQL("")
        if rename_to:
            typed = sql.SQL(" AND atttypid = {}::regtype").format(
                sql.Literal(t.columns[new].type))
        self.check("complete", f"{old} is gone and {final} is in place" if not rename_to
                   else f"{final} has type {t.columns[new].type}", sql.SQL(
            "SELECT ({gone}) AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {t}::regclass"
            " AND attname = {f} AND NOT attisdropped{nn}{typed})").format(
                gone=no_column(t, old) if old != final else sql.SQL("true"),
                t=sql.Literal(t.regclass), f=sql.Literal(final), typed=typed,
                nn=sql.SQL(" AND attnotnull") if self.chk else sql.SQL("")))
        self.t, self.old = t, old
