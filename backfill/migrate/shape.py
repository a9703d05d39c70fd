"""The catalog as the migration will find it: tables and columns, with what earlier
operations of the same file changed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Conn, primary_key_of, split_name
from backfill.core.errors import ColumnNotFound, InvalidInput, TableNotFound
from backfill.core.sqltext import function_names

# -- the catalog as the migration will find it ------------------------------------------------


@dataclass
class TableShape:
    schema: str
    name: str
    columns: dict[str, ColumnShape]
    rows: int | None = None
    bytes: int | None = None
    exists: bool = True          # False: created by an earlier operation of this migration
    primary_key: tuple[str, ...] = ()

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified(self) -> str:
        """``schema.name`` as SQL writes it: a job spec reads it back as this table."""
        return sqltext.render_qualified(self.schema, self.name)

    @property
    def expected(self) -> tuple[int, int] | None:
        """The size a table this migration creates will have once filled, for estimates."""
        return None if self.exists else (self.rows or 0, self.bytes or 0)

    @property
    def regclass(self) -> str:
        """The name as ``::regclass`` and ``to_regclass`` read it: quoted."""
        return f"{quote(self.schema)}.{quote(self.name)}"

    def column(self, name: str, what: str = "column") -> ColumnShape:
        if name not in self.columns:
            raise ColumnNotFound(f"{what} {name!r} does not exist in {self.qualified} "
                                 f"(columns: {', '.join(self.columns) or 'none'})")
        return self.columns[name]


@dataclass
class ColumnShape:
    name: str
    type: str                    # with its modifiers: character varying(20)
    not_null: bool
    default: str | None
    #: Until complete, the column that holds this one's values (``bf_new_<col>`` for a type
    #: change): the version schema's view shows it under ``name``.
    physical: str | None = None


class Shape:
    """The database's tables, read lazily, and changed by each planned operation in turn, so
    an operation can use what an earlier one creates (a table, then its index)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._tables: dict[tuple[str, str], TableShape | None] = {}
        self._claimed: dict[tuple[str, str, str], str] = {}
        #: Tables whose new shape the version schema shows as a view, in the order first seen.
        self.versioned: dict[tuple[str, str], TableShape] = {}
        #: The migration's version schema (set by :func:`build_plan`).
        self.version_schema = ""

    def version(self, t: TableShape) -> None:
        """Show ``t`` in the version schema, as it will be after complete."""
        self.versioned.setdefault((t.schema, t.name), t)

    def to_version(self) -> list[TableShape]:
        """The tables the version schema shows: those a later operation did not drop."""
        return [t for k, t in self.versioned.items() if self._tables.get(k) is t]

    _TAKEN = {
        "constraint": "SELECT 1 FROM pg_constraint WHERE conname = %(n)s "
                      "AND conrelid = to_regclass(%(t)s)",
        "trigger": "SELECT 1 FROM pg_trigger WHERE tgname = %(n)s AND tgrelid = to_regclass(%(t)s)",
        "relation": "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %(s)s AND c.relname = %(n)s",
        "function": "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = %(s)s AND p.proname = %(n)s",
        "schema": "SELECT 1 FROM pg_namespace WHERE nspname = %(n)s",
    }

    def claim(self, kind: str, t: TableShape, name: str, where: str,
              schema: str | None = None) -> None:
        """Refuse a name this migration would create if it exists, or another operation of
        the file creates it too: rollback drops what it names, so it must be ours alone."""
        schema = schema or t.schema
        key = (kind, schema, name)
        if key in self._claimed:
            raise InvalidInput(f"{where}: {self._claimed[key]} creates {kind} {name} too")
        self._claimed[key] = where
        if self.conn.execute(self._TAKEN[kind],
                             {"n": name, "t": t.regclass, "s": schema}).fetchone():
            place = (f"on {t.qualified}" if kind in ("constraint", "trigger")
                     else "on this database" if kind == "schema" else f"in {schema}")
            raise InvalidInput(f"{where}: a {'relation' if kind == 'relation' else kind} named "
                               f"{name} already exists {place}; give another name (rollback "
                               "drops what the migration created, so it must not be taken)")

    def _key(self, name: str) -> tuple[str, str]:
        schema, table = split_name(name)
        if schema is None:
            row = self.conn.execute(
                """SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relname = %s AND c.relkind IN ('r', 'p')
                     AND n.nspname = ANY (current_schemas(false))
                   ORDER BY array_position(current_schemas(false), n.nspname::text) LIMIT 1""",
                (table,)).fetchone()
            if row is None:
                cur = self.conn.execute("SELECT current_schema()").fetchone()
                schema = str(cur[0]) if cur and cur[0] else "public"
                for (s, t), shape in self._tables.items():   # created by this migration
                    if t == table and shape is not None and not shape.exists:
                        schema = s
            else:
                schema = str(row[0])
        return schema, table

    def find(self, name: str) -> TableShape | None:
        key = self._key(name)
        if key not in self._tables:
            self._tables[key] = self._read(*key)
        return self._tables[key]

    def table(self, name: str) -> TableShape:
        t = self.find(name)
        if t is None:
            raise TableNotFound(f"table {name!r} does not exist (or is not a plain table)")
        return t

    def create(self, name: str, columns: Iterable[ColumnShape], pk: tuple[str, ...]) -> TableShape:
        if self.find(name) is not None:
            raise InvalidInput(f"table {name!r} already exists")
        schema, table = self._key(name)
        t = TableShape(schema, table, {c.name: c for c in columns}, rows=0, bytes=0,
                       exists=False, primary_key=pk)
        self._tables[(schema, table)] = t
        return t

    def drop(self, t: TableShape) -> None:
        self._tables[(t.schema, t.name)] = None

    def _read(self, schema: str, table: str) -> TableShape | None:
        row = self.conn.execute(
            """SELECT c.oid, c.reltuples::bigint, pg_total_relation_size(c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relname = %s AND n.nspname = %s AND c.relkind IN ('r', 'p')""",
            (table, schema)).fetchone()
        if row is None:
            return None
        oid, reltuples, size = row
        cols = self.conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid)
               FROM pg_attribute a
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY a.attnum""", (oid,)).fetchall()
        pk = primary_key_of(self.conn, int(oid))
        return TableShape(
            schema, table,
            {str(n): ColumnShape(str(n), str(t), bool(nn), d) for n, t, nn, d in cols},
            rows=int(reltuples) if reltuples is not None and reltuples >= 0 else None,
            bytes=int(size), primary_key=pk or ())

    def volatile(self, expression: str) -> bool:
        """Whether ``expression`` calls a volatile function (its value differs per row)."""
        names = function_names(expression)
        if not names:
            return False
        row = self.conn.execute(
            "SELECT bool_or(provolatile = 'v') FROM pg_proc WHERE proname = ANY (%s)",
            (sorted(names),)).fetchone()
        return bool(row and row[0])


def quote(name: str) -> str:
    """An identifier quoted for an expression we hand to the job engine as text."""
    return '"' + name.replace('"', '""') + '"'
