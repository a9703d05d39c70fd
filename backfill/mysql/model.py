"""What a MySQL table looks like (read from information_schema) and what it becomes in
PostgreSQL (the cast of each column): plain data, shared by the schema, copy, catch-up and
verify modules."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MySQLColumn:
    """One column as information_schema.COLUMNS describes it."""

    name: str
    position: int
    data_type: str                 # lower case: int, varchar, enum, longtext...
    column_type: str               # lower case, full: int(10) unsigned, enum('a','b')
    nullable: bool
    default: str | None = None
    auto_increment: bool = False
    charset: str | None = None     # None for binary and non-text columns
    collation: str | None = None
    precision: int | None = None   # numeric precision, or bit length for bit(n)
    scale: int | None = None
    fsp: int | None = None         # fractional seconds of time types
    length: int | None = None      # characters (or bytes for binary types)
    values: tuple[str, ...] = ()   # enum and set members, in definition order
    is_json: bool = False          # MariaDB: longtext with CHECK (json_valid(col))

    @property
    def unsigned(self) -> bool:
        return "unsigned" in self.column_type

    @property
    def is_text(self) -> bool:
        return self.charset is not None


@dataclass(frozen=True)
class MySQLIndex:
    name: str
    unique: bool
    columns: tuple[str, ...]
    prefix: bool = False           # a prefix index (col(10)): not a full-value key
    kind: str = "BTREE"            # BTREE, HASH, FULLTEXT, SPATIAL

    @property
    def primary(self) -> bool:
        return self.name == "PRIMARY"


@dataclass(frozen=True)
class MySQLForeignKey:
    name: str
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    on_update: str = "RESTRICT"
    on_delete: str = "RESTRICT"


@dataclass(frozen=True)
class MySQLTable:
    database: str
    name: str
    columns: tuple[MySQLColumn, ...]
    indexes: tuple[MySQLIndex, ...] = ()
    foreign_keys: tuple[MySQLForeignKey, ...] = ()

    def column(self, name: str) -> MySQLColumn:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


@dataclass(frozen=True)
class ColumnCast:
    """How one column moves: its PostgreSQL name and type, the value conversion (``kind``)
    and the rule that chose them (a default rule's name, or ``cast`` for an override)."""

    source: MySQLColumn
    name: str                      # PostgreSQL column name
    pg_type: str                   # as written in the DDL: numeric(20), timestamptz(3)
    kind: str                      # the conversion: see backfill.mysql.values.KINDS
    rule: str
    identity: bool = False
    not_null: bool = False
    length: int | None = None      # character limit to check (varchar(n), char(n))
    precision: int | None = None   # numeric(p, s) to check, or bit(n)
    scale: int | None = None
    check_values: tuple[str, ...] = ()   # enum/set members the CHECK allows


@dataclass(frozen=True)
class TablePlan:
    """A table's move: source, destination name, column casts, the keyset key, and the DDL
    that comes after the copy (indexes, foreign keys)."""

    source: MySQLTable
    schema: str                    # PostgreSQL schema
    name: str                      # PostgreSQL table name
    columns: tuple[ColumnCast, ...]
    key: tuple[str, ...]           # source (MySQL) names of the keyset key columns
    notes: tuple[str, ...] = field(default=())

    @property
    def key_casts(self) -> tuple[ColumnCast, ...]:
        by_name = {c.source.name: c for c in self.columns}
        return tuple(by_name[k] for k in self.key)

    @property
    def key_positions(self) -> tuple[int, ...]:
        names = [c.source.name for c in self.columns]
        return tuple(names.index(k) for k in self.key)
