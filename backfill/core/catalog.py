"""Reading the system catalog: does the table exist, which columns, which key is usable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from backfill.core import sqltext
from backfill.core.errors import ColumnNotFound, InvalidKey, TableNotFound

Conn = psycopg.Connection[Any]

#: Key column types the cursor codec understands (``format_type`` spelling).
KEY_TYPES = {
    "smallint": "int",
    "integer": "int",
    "bigint": "int",
    "uuid": "uuid",
    "text": "text",
    "character varying": "text",
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "numeric": "numeric",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool
    generated: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    oid: int
    columns: tuple[Column, ...]
    rows_estimate: int | None

    @property
    def qualified(self) -> str:
        """``schema.name`` as SQL writes it (quoted where needed): it reads back as this table."""
        return sqltext.render_qualified(self.schema, self.name)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise ColumnNotFound(
            f"column {name!r} does not exist in {self.qualified} "
            f"(columns: {', '.join(c.name for c in self.columns)})"
        )


def split_name(name: str) -> tuple[str | None, str]:
    """``"public.users"`` -> ("public", "users"); ``"users"`` -> (None, "users"); names read as
    SQL reads them (:func:`backfill.core.sqltext.qualified_name`): ``T1`` is ``t1``, ``"A.b"`` is
    one name."""
    return sqltext.qualified_name(name, slot="table")


def table_oid(conn: Conn, name: str) -> int | None:
    """The oid of the relation ``name`` (a table name as the user wrote it), found as the
    planner would; looked up by its quoted form, so case, spaces and dots are kept."""
    schema, table = split_name(name)
    row = conn.execute("SELECT to_regclass(%s)::oid",
                       (sqltext.render_qualified(schema, table),)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def resolve_table(conn: Conn, name: str) -> Table:
    """Look ``name`` up like the planner would (search_path for unqualified names)."""
    schema, table = split_name(name)
    if schema is None:
        row = conn.execute(
            """SELECT c.oid, n.nspname, c.relname, c.reltuples::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relname = %s AND c.relkind IN ('r', 'p')
                 AND n.nspname = ANY (current_schemas(false))
               ORDER BY array_position(current_schemas(false), n.nspname::text) LIMIT 1""",
            (table,),
        ).fetchone()
    else:
        row = conn.execute(
            """SELECT c.oid, n.nspname, c.relname, c.reltuples::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relname = %s AND n.nspname = %s AND c.relkind IN ('r', 'p')""",
            (table, schema),
        ).fetchone()
    if row is None:
        read = sqltext.render_qualified(schema, table)
        raise TableNotFound(f"table {name!r} does not exist (or is not a plain table)"
                            + (f"; read as {read} (names fold to lower case unless quoted)"
                               if read != name.strip() else ""))
    oid, nsp, rel, reltuples = row
    cols = conn.execute(
        """SELECT attname, format_type(atttypid, atttypmod), attnotnull, attgenerated <> ''
           FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
           ORDER BY attnum""",
        (oid,),
    ).fetchall()
    columns = tuple(Column(str(n), _base_type(str(t)), bool(nn), bool(g)) for n, t, nn, g in cols)
    estimate = int(reltuples) if reltuples is not None and reltuples >= 0 else None
    return Table(str(nsp), str(rel), int(oid), columns, estimate)


def _base_type(t: str) -> str:
    # "character varying(20)" -> "character varying", "numeric(10,2)" -> "numeric"
    return t.split("(", 1)[0].strip() if "(" in t else t


def primary_key(conn: Conn, table: Table) -> tuple[str, ...] | None:
    return primary_key_of(conn, table.oid)


def primary_key_of(conn: Conn, oid: int) -> tuple[str, ...] | None:
    """The primary key's columns, in index order, of the relation ``oid``."""
    row = conn.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.ord)
           FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE i.indrelid = %s AND i.indisprimary""",
        (oid,),
    ).fetchone()
    return tuple(row[0]) if row and row[0] else None


def resolve_key(conn: Conn, table: Table, key: tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate ``key`` (default: the primary key) as unique, not null and of a known type.

    Returns the key in the column order of the unique index that backs it, so keyset probes
    walk that index.
    """
    if not key:
        pk = primary_key(conn, table)
        if pk is None:
            raise InvalidKey(
                f"{table.qualified} has no primary key: pass --key with columns that have a "
                "unique index and are NOT NULL"
            )
        key = pk
    if len(set(key)) != len(key):
        raise InvalidKey(f"key {', '.join(key)} names a column twice")
    for name in key:
        col = table.column(name)
        if not col.not_null:
            raise InvalidKey(
                f"key column {table.qualified}.{name} is nullable: keyset batches need NOT NULL "
                "key columns (add NOT NULL or choose another key)"
            )
        if col.type not in KEY_TYPES:
            raise InvalidKey(
                f"key column {table.qualified}.{name} has type {col.type}, which is not "
                f"supported as a key (supported: {', '.join(sorted(KEY_TYPES))})"
            )
    rows = conn.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.ord)
           FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid
             AND i.indpred IS NULL AND i.indexprs IS NULL
             AND (SELECT amname FROM pg_am WHERE oid =
                    (SELECT relam FROM pg_class WHERE oid = i.indexrelid)) = 'btree'
           GROUP BY i.indexrelid""",
        (table.oid,),
    ).fetchall()
    for (cols,) in rows:
        if cols and set(cols) == set(key) and len(cols) == len(key):
            return tuple(cols)
    raise InvalidKey(
        f"key ({', '.join(key)}) of {table.qualified} is not unique: no primary key or "
        "unique btree index (without predicate or expressions) on exactly these columns"
    )
