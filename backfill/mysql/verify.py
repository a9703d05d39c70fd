"""Verify a moved table across the two engines: per key range, the row count and a checksum
of every row in one normalised text form, computed from what each engine returns.

Ranges are keyset batches of the source. The source rows go through the same casts as the
copy; the destination rows of the same keys are read by key (not by range: the engines order
text differently, so a range in one is not a range in the other), and both sides become, per
row, a JSON list of normalised values (decimals without trailing zeros, single-precision
floats to 9 significant digits, times in UTC, bytes in hex, json re-serialised with sorted
keys). A range matches when both counts and both MD5s agree; the first differing keys are kept.
Rows only in the destination show up in the total (``extra_in_dest``).

Run it when the catch-up has drained with the source's writes stopped (the cutover gate
does): while the source changes, ranges read a moment apart can differ.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg import sql

from backfill.core.db import connect as pg_connect
from backfill.mysql.copy import BatchReader
from backfill.mysql.model import ColumnCast, TablePlan
from backfill.mysql.source import MySQLSource, connect

MAX_PARAMS = 65_535
MAX_SHOWN = 10


def _decimal_text(d: Decimal) -> str:
    if d == 0:
        return "0"
    return format(d.normalize(), "f")


def _json_text(s: str) -> str:
    return json.dumps(json.loads(s, parse_float=lambda x: _decimal_text(Decimal(x))),
                      sort_keys=True, ensure_ascii=False)


def normal_text(kind: str, v: Any) -> Any:
    """One value in the normalised form (a JSON-serialisable scalar or list)."""
    if v is None:
        return None
    if kind in ("json", "jsonb"):
        return _json_text(v if isinstance(v, str) else json.dumps(v))
    if isinstance(v, bool):
        return "t" if v else "f"
    if kind == "float4":
        return format(struct.unpack("f", struct.pack("f", float(v)))[0], ".9g")
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, Decimal):
        return _decimal_text(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.UTC).replace(tzinfo=None)
        return v.isoformat(sep=" ")
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return str(v // dt.timedelta(microseconds=1))
    if isinstance(v, list):
        return [normal_text("text", m) for m in v]
    return str(v)


def row_text(casts: Sequence[ColumnCast], row: Sequence[Any]) -> str:
    return json.dumps([normal_text(c.kind, v) for c, v in zip(casts, row, strict=True)],
                      ensure_ascii=False)


@dataclass(frozen=True)
class RangeCheck:
    """One range: ``(after, last]`` in source key order."""

    after: tuple[Any, ...] | None
    last: tuple[Any, ...]
    source_rows: int
    dest_rows: int
    source_md5: str
    dest_md5: str
    differences: tuple[tuple[Any, ...], ...] = ()   # the first keys that differ (up to 10)

    @property
    def ok(self) -> bool:
        return self.source_rows == self.dest_rows and self.source_md5 == self.dest_md5


@dataclass(frozen=True)
class VerifyReport:
    table: str
    ranges: int
    source_rows: int
    dest_rows: int
    mismatched: list[RangeCheck] = field(default_factory=list)

    @property
    def extra_in_dest(self) -> int:
        matched = self.source_rows - sum(r.source_rows - r.dest_rows for r in self.mismatched)
        return max(0, self.dest_rows - matched)

    @property
    def ok(self) -> bool:
        return not self.mismatched and self.dest_rows == self.source_rows


def _select_by_keys(plan: TablePlan, n: int) -> sql.Composed:
    cols = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.kind in ("json", "jsonb")
        else sql.Identifier(c.name) for c in plan.columns)
    keys = sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.key_casts)
    one = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(plan.key)))
    return sql.SQL("SELECT {} FROM {} WHERE ({}) IN ({})").format(
        cols, sql.Identifier(plan.schema, plan.name), keys, sql.SQL(", ").join([one] * n))


def _chunks(items: Sequence[Any], width: int) -> Iterator[Sequence[Any]]:
    step = max(1, MAX_PARAMS // max(1, width))
    for i in range(0, len(items), step):
        yield items[i:i + step]


def verify_table(source: MySQLSource, dest_dsn: str, plan: TablePlan, *,
                 range_size: int = 10_000,
                 on_range: Callable[[RangeCheck], None] | None = None) -> VerifyReport:
    """Compare the whole table, range by range; see the module's docstring."""
    casts = plan.columns
    key_pos = plan.key_positions
    mismatched: list[RangeCheck] = []
    ranges = source_total = 0
    with pg_connect(dest_dsn, application_name="backfill-mysql-verify") as pg:
        mconn = connect(source)
        try:
            reader = BatchReader(mconn, plan)
            after: tuple[Any, ...] | None = None
            while True:
                raw = reader.read(after, range_size)
                if not raw:
                    break
                last = reader.key_of(raw[-1])
                src = reader.convert(raw)
                src_lines = [(tuple(r[i] for i in key_pos), row_text(casts, r)) for r in src]
                found: dict[str, str] = {}
                for chunk in _chunks([k for k, _ in src_lines], len(key_pos)):
                    for r in pg.execute(_select_by_keys(plan, len(chunk)),
                                        [v for k in chunk for v in k]).fetchall():
                        k = tuple(r[i] for i in key_pos)
                        found[key_repr(casts, key_pos, k)] = row_text(casts, r)
                src_md5, dst_md5 = hashlib.md5(usedforsecurity=False), hashlib.md5(
                    usedforsecurity=False)
                diffs: list[tuple[Any, ...]] = []
                for k, line in src_lines:
                    src_md5.update(line.encode() + b"\n")
                    other = found.get(key_repr(casts, key_pos, k))
                    if other is not None:
                        dst_md5.update(other.encode() + b"\n")
                    if other != line and len(diffs) < MAX_SHOWN:
                        diffs.append(k)
                check = RangeCheck(after, last, len(src_lines), len(found),
                                   src_md5.hexdigest(), dst_md5.hexdigest(), tuple(diffs))
                if not check.ok:
                    mismatched.append(check)
                if on_range is not None:
                    on_range(check)
                ranges += 1
                source_total += len(src_lines)
                after = last
                if len(raw) < range_size:
                    break
        finally:
            mconn.close()
        counted = pg.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(plan.schema, plan.name))).fetchone()
    dest_total = int(counted[0]) if counted else 0
    return VerifyReport(plan.name, ranges, source_total, dest_total, mismatched)


def key_repr(casts: Sequence[ColumnCast], key_pos: Sequence[int], key: Sequence[Any]) -> str:
    return json.dumps([normal_text(casts[i].kind, v) for i, v in zip(key_pos, key, strict=True)])
