"""``add_foreign_key``: NOT VALID first, validated after the backfills."""

from __future__ import annotations

from psycopg import sql

from backfill.core.errors import InvalidInput
from backfill.migrate.operations.base import Operation, object_name
from backfill.migrate.shape import TableShape


class AddForeignKey(Operation):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        cols = self.names("columns")
        ref = self.shape.table(self.text("references"))
        ref_cols = self.names("referenced_columns", required=False) or ref.primary_key
        if not ref_cols:
            raise InvalidInput(f"{self.where()}: {ref.qualified} has no primary key; give "
                               "referenced_columns")
        for c in cols:
            t.column(c)
        for c in ref_cols:
            ref.column(c)
        if len(cols) != len(ref_cols):
            raise InvalidInput(f"{self.where()}: {len(cols)} columns reference "
                               f"{len(ref_cols)} columns")
        name = self.claim("constraint", t, self.ident("name", object_name("fk", t.name, *cols)))
        on_delete = self.on_delete(t, ref, cols)
        join = sql.SQL(", ").join
        # ALTER TABLE locks the child, then the parent; an application INSERT into the parent
        # whose trigger writes the child (a split) locks them the other way round. Taking
        # the parent first, then the child, before the statement makes the step wait for the
        # application instead of deadlocking with it.
        def order(mode: str) -> tuple[tuple[str, str, str], ...]:
            tables = [ref] + ([t] if (t.schema, t.name) != (ref.schema, ref.name) else [])
            return tuple((x.schema, x.name, mode) for x in tables)

        both = (f"{ref.qualified}, then {t.qualified} (parent first, as the application's "
                "writes through triggers take them; brief, under lock_timeout)"
                if (t.schema, t.name) != (ref.schema, ref.name)
                else f"{t.qualified} (brief, under lock_timeout)")
        self.add("start", f"add {name} NOT VALID (new rows are checked; no scan)", "tx",
                 sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) "
                         "ON DELETE {} NOT VALID").format(
                     t.ident, sql.Identifier(name), join(map(sql.Identifier, cols)), ref.ident,
                     join(map(sql.Identifier, ref_cols)),
                     sql.SQL(on_delete)),
                 lock=f"SHARE ROW EXCLUSIVE on {both}",
                 lock_order=order("SHARE ROW EXCLUSIVE"))
        self.validate_constraint(t, name)
        self.add("rollback", f"drop {name}", "tx",
                 sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                     t.ident, sql.Identifier(name)), lock=f"ACCESS EXCLUSIVE on {both}",
                 lock_order=order("ACCESS EXCLUSIVE"))
        if t.exists and not self._indexed(t, cols):
            self.warnings.append(f"no index on {t.qualified} ({', '.join(cols)}): each delete "
                                 f"or key update on {ref.qualified} scans {t.qualified}; "
                                 "add a create_index operation")
        return f"foreign key {t.qualified} ({', '.join(cols)}) -> {ref.qualified}"

    #: What a DELETE of a referenced row does, and what the old application version, which
    #: knows nothing of the foreign key, sees when it deletes one.
    _ON_DELETE = {
        "restrict": "fails",
        "no action": "fails",
        "cascade": "also deletes the rows of {t} that reference it",
        "set null": "sets {cols} of the rows of {t} that reference it to NULL",
        "set default": "sets {cols} of the rows of {t} that reference it to their default",
    }

    def on_delete(self, t: TableShape, ref: TableShape, cols: tuple[str, ...]) -> str:
        """``on_delete``, required: from start on, the old application version's ``DELETE``
        of a referenced row meets the key, and only the author can say what it should do."""
        raw = self.get("on_delete")
        choices = ", ".join(f'"{k}"' for k in self._ON_DELETE)
        if raw is None:
            raise InvalidInput(
                f"{self.where()}: `on_delete` is required ({choices}): from start on, a "
                f"DELETE on {ref.qualified} by the running application meets this key. "
                '"restrict" or "no action": the delete fails while a row of '
                f"{t.qualified} references it; \"cascade\": those rows are deleted too; "
                '"set null": their columns are set to NULL')
        key = " ".join(str(raw).lower().replace("_", " ").split()) if isinstance(raw, str) \
            else ""
        if key not in self._ON_DELETE:
            raise InvalidInput(f"{self.where()}: on_delete must be one of {choices}, got "
                               f"{raw!r}")
        what = self._ON_DELETE[key].format(t=t.qualified, cols=", ".join(cols))
        if key in ("restrict", "no action"):
            self.warnings.append(
                f"on_delete = {key}: from start on, a DELETE on {ref.qualified} (or a "
                f"change of its key) of a row that {t.qualified} references fails with a "
                "foreign key violation (SQLSTATE 23503), for the old application version "
                f"too: before start, the old version must delete (or re-point) the rows of "
                f"{t.qualified} that reference a row before deleting it, in the same "
                "transaction; otherwise choose cascade or set null"
                + ("" if t.exists else f"; {t.qualified} is created by this migration, "
                   "whose sync trigger deletes the matching rows there first (before the "
                   "key's check), so the old version's deletes of rows mirrored into it go "
                   "through"))
        else:
            self.warnings.append(f"on_delete = {key}: from start on, a DELETE on "
                                 f"{ref.qualified}, by either application version, {what}")
        return key.upper()

    def _indexed(self, t: TableShape, cols: tuple[str, ...]) -> bool:
        row = self.conn.execute(
            """SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND
               (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(i.indkey)
                WITH ORDINALITY AS k(attnum, ord) JOIN pg_attribute a
                ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                WHERE k.ord <= %s) = %s""", (t.regclass, len(cols), list(cols))).fetchone()
        return row is not None
