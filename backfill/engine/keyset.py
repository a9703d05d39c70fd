"""Keyset pagination over one or more key columns, and the cursor's JSON codec.

A range is ``(lower, upper]`` in key order; ``lower`` ``None`` means "from the first key". Keys are
tuples of Python values; composite keys are compared as rows (``(a, b) > (%s, %s)``) so the
probe walks the unique index that backs the key.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from backfill.core.catalog import KEY_TYPES, Conn

Key = tuple[Any, ...]
JsonKey = list[Any]

#: Key types a cursor can hold beyond the PostgreSQL key types (``catalog.KEY_TYPES``): a
#: MySQL source's binary keys (:mod:`backfill.mysql.job`), stored as hex.
CODEC_ONLY_TYPES = {"bytea": "bytes"}


@dataclass(frozen=True)
class KeyCodec:
    """Turns key tuples into JSON (for the state store) and back, by the key columns' types."""

    types: tuple[str, ...]

    def encode(self, key: Key | None) -> JsonKey | None:
        if key is None:
            return None
        out: JsonKey = []
        for kind, value in zip(self._kinds(), key, strict=True):
            if kind == "int":
                out.append(int(value))
            elif kind in ("timestamptz", "timestamp", "date"):
                out.append(value.isoformat())
            elif kind == "bytes":
                out.append(bytes(value).hex())
            else:  # uuid, text, numeric
                out.append(str(value))
        return out

    def decode(self, data: JsonKey | None) -> Key | None:
        if data is None:
            return None
        out: list[Any] = []
        for kind, value in zip(self._kinds(), data, strict=True):
            if kind == "int":
                out.append(int(value))
            elif kind == "uuid":
                out.append(uuid.UUID(value))
            elif kind in ("timestamptz", "timestamp"):
                out.append(dt.datetime.fromisoformat(value))
            elif kind == "date":
                out.append(dt.date.fromisoformat(value))
            elif kind == "numeric":
                out.append(decimal.Decimal(value))
            elif kind == "bytes":
                out.append(bytes.fromhex(value))
            else:
                out.append(value)
        return tuple(out)

    def _kinds(self) -> list[str]:
        return [KEY_TYPES.get(t) or CODEC_ONLY_TYPES[t] for t in self.types]


def render_key(key: Key | JsonKey | None) -> str:
    """A short human form of a key for logs and messages."""
    if key is None:
        return "-inf"
    parts = [str(v) for v in key]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Keyset:
    """SQL pieces to page through ``table`` by ``columns``."""

    table: sql.Composable  # schema-qualified identifier
    columns: tuple[str, ...]

    @property
    def key_list(self) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def key_expr(self, alias: str | None = None) -> sql.Composable:
        idents: Sequence[sql.Composable]
        if alias:
            idents = [sql.Identifier(alias, c) for c in self.columns]
        else:
            idents = [sql.Identifier(c) for c in self.columns]
        if len(idents) == 1:
            return idents[0]
        return sql.SQL("({})").format(sql.SQL(", ").join(idents))

    def _params(self, prefix: str) -> sql.Composable:
        ph = [sql.Placeholder(f"{prefix}{i}") for i in range(len(self.columns))]
        if len(ph) == 1:
            return ph[0]
        return sql.SQL("({})").format(sql.SQL(", ").join(ph))

    def predicate(self, *, lower: bool, upper: bool = True, alias: str | None = None) -> sql.Composed:
        """``key > lower AND key <= upper`` with named placeholders ``lo<i>`` and ``hi<i>``."""
        parts: list[sql.Composable] = []
        if lower:
            parts.append(sql.SQL("{} > {}").format(self.key_expr(alias), self._params("lo")))
        if upper:
            parts.append(sql.SQL("{} <= {}").format(self.key_expr(alias), self._params("hi")))
        if not parts:
            return sql.Composed([sql.SQL("true")])
        return sql.Composed([sql.SQL(" AND ").join(parts)])

    @staticmethod
    def params(lower: Key | None, upper: Key | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if lower is not None:
            out.update({f"lo{i}": v for i, v in enumerate(lower)})
        if upper is not None:
            out.update({f"hi{i}": v for i, v in enumerate(upper)})
        return out

    def order_by(self, desc: bool = False) -> sql.Composed:
        direction = sql.SQL(" DESC") if desc else sql.SQL("")
        return sql.SQL(", ").join(sql.Composed([sql.Identifier(c), direction]) for c in self.columns)

    def probe_query(self, *, lower: bool) -> sql.Composed:
        """The key ``offset`` rows past ``lower`` (at most ``upper``); walks the index only."""
        return sql.SQL(
            "SELECT {keys} FROM {table} WHERE {pred} ORDER BY {order} LIMIT 1 OFFSET %(offset)s"
        ).format(
            keys=self.key_list,
            table=self.table,
            pred=self.predicate(lower=lower),
            order=self.order_by(),
        )

    def last_query(self, *, lower: bool, upper: bool) -> sql.Composed:
        """The greatest key in the range."""
        return sql.SQL("SELECT {keys} FROM {table} WHERE {pred} ORDER BY {order} LIMIT 1").format(
            keys=self.key_list,
            table=self.table,
            pred=self.predicate(lower=lower, upper=upper),
            order=self.order_by(desc=True),
        )

    def count_query(self, *, lower: bool) -> sql.Composed:
        return sql.SQL("SELECT count(*) FROM {table} WHERE {pred}").format(
            table=self.table, pred=self.predicate(lower=lower)
        )

    def probe(self, conn: Conn, lower: Key | None, upper: Key, offset: int) -> Key | None:
        row = conn.execute(
            self.probe_query(lower=lower is not None),
            {**self.params(lower, upper), "offset": offset},
        ).fetchone()
        return tuple(row) if row else None

    def max_key(self, conn: Conn) -> Key | None:
        row = conn.execute(self.last_query(lower=False, upper=False)).fetchone()
        return tuple(row) if row else None

    def first_key(self, conn: Conn, lower: Key | None, upper: Key) -> Key | None:
        row = conn.execute(
            self.probe_query(lower=lower is not None), {**self.params(lower, upper), "offset": 0}
        ).fetchone()
        return tuple(row) if row else None
