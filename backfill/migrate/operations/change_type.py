"""``change_type``: a column of the new type beside the old, converted both ways."""

from __future__ import annotations

import psycopg
from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import _DOLLAR, object_name, widening
from backfill.migrate.operations.copied import _Copied
from backfill.migrate.shape import ColumnShape, TableShape, quote


class ChangeType(_Copied):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        col, typ = self.ident("column"), self.type_field("type")
        src = t.column(col)
        if col in t.primary_key:
            raise InvalidInput(f"{self.where()}: {col} is part of the primary key; changing "
                               "a key column's type is not supported")
        cast_up = f"{quote(col)}::{typ}"
        using = self.expression("using")
        up = using or cast_up
        narrowing = t.exists and not widening(src.type, typ)
        if narrowing:
            if using is None:
                self.expr(t, cast_up, "type", cast_to=typ)
            self.lossy(t, col, src.type, typ, cast_up, using)
            if using is None:
                up = self.checked_cast(t, col, src.type, typ)
        tmp = object_name("new", col)
        if tmp in t.columns:
            raise InvalidInput(f"{self.where()}: {t.qualified} already has a column {tmp}")
        down_v = self.get("down", None)
        if down_v is False:
            down = None
        elif down_v is None:
            down = f"{quote(tmp)}::{src.type}"
        elif isinstance(down_v, str) and down_v.strip() and _DOLLAR not in down_v:
            down = sqltext.expression(down_v, slot="`down`")
        else:
            raise InvalidInput(f"{self.where()}: `down` must be an expression or false")
        self.sync(t, col, tmp, typ, up, down)
        self.warnings.append(self.moves_to_end(t, col))
        if narrowing and using is None:
            # The gate compares the round trip, not the cast with itself: a value the cast
            # changed reads back different.
            self.check("start", f"every value of {tmp} reads back as {col} ({typ} to "
                       f"{src.type})", sql.SQL(
                           "SELECT NOT EXISTS (SELECT 1 FROM {t} WHERE {n}::{o} IS DISTINCT "
                           "FROM {c})").format(t=t.ident, n=sql.Identifier(tmp),
                                               o=sql.SQL(src.type), c=sql.Identifier(col)),
                       duration="scan", table=t.qualified)
        if src.default is not None:
            self.warnings.append(f"{col} has a default ({src.default}); set it again on the "
                                 "new type after complete")
        self.swap(t, col, tmp, rename_to=col)
        # After complete the column is the renamed copy: last in the table, as in the view.
        t.columns.pop(tmp)
        t.columns.pop(col)
        t.columns[col] = ColumnShape(col, typ, src.not_null, None, physical=tmp)
        self.shape.version(t)
        return f"change {t.qualified}.{col} from {src.type} to {typ} (using {up})"

    def irreversible(self) -> str | None:
        return f"the {self.old} column's old-type values"

    def lossy(self, t: TableShape, col: str, old: str, typ: str, cast_up: str,
              using: str | None) -> None:
        """Count the values a plain cast to ``typ`` would change (the round trip reads back
        different) or cannot convert. ``plan`` shows them; without ``using`` saying what they
        become, ``start`` refuses (a plain ALTER TABLE would have raised)."""
        c = sql.Identifier(col)
        lost = sql.SQL("({up})::{o} IS DISTINCT FROM {c}").format(
            up=sqltext.expression_sql(cast_up, percent=False), o=sql.SQL(old), c=c)
        key = sql.SQL(", ").join(map(sql.Identifier, t.primary_key or (col,)))
        q = sql.SQL("SELECT count(*) FILTER (WHERE {lost}), "
                    "(array_agg(ROW({key})::text) FILTER (WHERE {lost}))[1:3] FROM {t}").format(
            lost=lost, key=key, t=t.ident)
        try:
            with self.conn.transaction(force_rollback=True):
                row = sqltext.execute_one(self.conn, q).fetchone()
        except psycopg.Error as exc:
            if using is not None and isinstance(exc, (
                    psycopg.errors.CannotCoerce, psycopg.errors.UndefinedFunction)):
                return   # no plain cast to compare with: `using` is the conversion
            found = ("some values cannot be converted to " + typ + " at all: "
                     + (exc.diag.message_primary or str(exc)).strip())
        else:
            n = int(row[0]) if row else 0
            if not n:
                self.warnings.append(
                    f"{col} {old} to {typ} can lose data: checked against the {t.qualified} of "
                    f"now, every value survives unchanged; from start on, a write of a value "
                    f"that does not fit {typ} fails (as it would after complete)")
                return
            keys = ", ".join(str(k) for k in (row[1] if row and row[1] else ()))
            found = (f"{n} value(s) of {t.qualified}.{col} would not survive the change to "
                     f"{typ} unchanged (cast and read back as {old}, they differ; rows "
                     f"{keys}{', …' if n > 3 else ''})")
        if using is None:
            self.blockers.append(
                f"{found}. A plain ALTER TABLE would raise; start refuses until `using` says "
                f"what they become (for instance a left(), round() or CASE over {col}), or "
                "the data is fixed")
        else:
            self.warnings.append(f"{found}; `using` ({using}) decides what they become, and "
                                 "complete drops the originals")

    def checked_cast(self, t: TableShape, col: str, old: str, typ: str) -> str:
        """``col::typ`` that raises instead of changing a value: the cast, read back as
        ``old``, must equal the original (an explicit cast to varchar(200) truncates;
        this fails the batch, or the write, with the column and the value)."""
        c = quote(col)
        message = sql.Literal(f"change_type of {t.qualified}.{col} to {typ} would change "
                              "the value: ").as_string(self.conn)
        # The failing branch casts the message to integer: a row-dependent expression (the
        # value is in it), so it is evaluated only for a value that does not survive.
        return (f"CASE WHEN ({c})::{typ}::{old} IS NOT DISTINCT FROM {c} THEN ({c})::{typ} "
                f"WHEN ({message} || left(({c})::text, 40))::integer IS NULL THEN NULL END")
