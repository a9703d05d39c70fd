"""Values: one canonical Python value per MySQL value, whichever way it was read (a SELECT
through PyMySQL, raw, or a binlog row image through mysql-replication), then the cast to
what PostgreSQL stores, exact or refused.

Canonical source values: int, Decimal, float (FLOAT rounded to single precision), str (text,
enum), list[str] (set, in definition order), bytes (binary, blob), int (bit), date,
datetime (naive for DATETIME, UTC for TIMESTAMP), timedelta (TIME), None (NULL and the zero
dates). A value that cannot be written exactly raises :class:`Refusal`, which the caller turns
into a ``ValueRefused`` naming the table, the row's key and the column.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from backfill.mysql.model import ColumnCast, MySQLColumn

UTC = dt.UTC


class Refusal(Exception):
    """One value cannot be written exactly: ``reason``, and ``fix`` the cast that would."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def _ascii_decimal(b: bytes) -> Decimal:
    return Decimal(b.decode("ascii"))


def _raw_conversions() -> dict[Any, Any]:
    """PyMySQL's encoders (for parameters) and decoders that keep every value but numbers as
    the server's bytes: text is decoded here, strictly, per column."""
    from pymysql.constants import FIELD_TYPE  # type: ignore[import-untyped]
    from pymysql.converters import encoders  # type: ignore[import-untyped]

    conv: dict[Any, Any] = dict(encoders)
    for t in (FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.LONG, FIELD_TYPE.INT24,
              FIELD_TYPE.LONGLONG, FIELD_TYPE.YEAR):
        conv[t] = int
    conv[FIELD_TYPE.DECIMAL] = conv[FIELD_TYPE.NEWDECIMAL] = _ascii_decimal
    conv[FIELD_TYPE.FLOAT] = conv[FIELD_TYPE.DOUBLE] = float
    return conv


RAW_CONVERSIONS = _raw_conversions()

# -- canonical source values -------------------------------------------------------------


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal(f"invalid UTF-8 at byte {exc.start}", "bytea") from None


def _is_zero_date(s: str) -> bool:
    date = s[:10]
    return date.startswith("0000") or date[5:7] == "00" or date[8:10] == "00"


def _date(v: Any) -> dt.date | None:
    if isinstance(v, dt.date) or v is None:
        return v
    s = _text(v)
    return None if _is_zero_date(s) else dt.date.fromisoformat(s)


def _datetime(v: Any) -> dt.datetime | None:
    if isinstance(v, dt.datetime) or v is None:
        return v
    s = _text(v)
    return None if _is_zero_date(s) else dt.datetime.fromisoformat(s)


def _timestamp(v: Any) -> dt.datetime | None:
    # The session's time_zone is +00:00 (SELECT), and the binlog reader decodes with
    # utcfromtimestamp: both are UTC wall times.
    d = _datetime(v)
    return d.replace(tzinfo=UTC) if d is not None and d.tzinfo is None else d


def _time(v: Any) -> dt.timedelta | None:
    if isinstance(v, dt.timedelta) or v is None:
        return v
    s = _text(v)
    neg = s.startswith("-")
    hours, minutes, seconds = s.lstrip("-").split(":")
    sec, _, frac = seconds.partition(".")
    td = dt.timedelta(hours=int(hours), minutes=int(minutes), seconds=int(sec),
                      microseconds=int((frac + "000000")[:6]))
    return -td if neg else td


def _float4(v: Any) -> float:
    return float(struct.unpack("f", struct.pack("f", float(v)))[0])


def _bit(v: Any) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):          # the binlog reader spells bits as '0101'
        return int(v, 2) if v else 0
    return int.from_bytes(bytes(v), "big")


def _set(col: MySQLColumn) -> Callable[[Any], list[str]]:
    order = {m: i for i, m in enumerate(col.values)}

    def convert(v: Any) -> list[str]:
        members = v if isinstance(v, set | frozenset | list | tuple) else (
            [m for m in _text(v).split(",") if m])
        return sorted(members, key=lambda m: order.get(m, len(order)))
    return convert


def _json(v: Any) -> str:
    if isinstance(v, bytes | bytearray | memoryview | str):
        return _text(v)
    return json.dumps(v)            # MySQL's binary JSON, decoded by the binlog reader


def _binary(v: Any) -> bytes:
    return bytes(v) if not isinstance(v, str) else v.encode("utf-8")


INT_TYPES = {"tinyint", "smallint", "mediumint", "int", "integer", "bigint", "year"}
TEXT_TYPES = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum"}
BINARY_TYPES = {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"}


def source_reader(col: MySQLColumn) -> Callable[[Any], Any]:
    """The function from a value as read (SELECT or binlog) to the canonical source value."""
    t = col.data_type
    if t in INT_TYPES:
        return int
    if t in ("decimal", "numeric"):
        return lambda v: v if isinstance(v, Decimal) else Decimal(str(v))
    if t == "float":
        return _float4
    if t in ("double", "real"):
        return float
    if t == "bit":
        return _bit
    if t == "date":
        return _date
    if t == "datetime":
        return _datetime
    if t == "timestamp":
        return _timestamp
    if t == "time":
        return _time
    if t == "set":
        return _set(col)
    if col.is_json or t == "json":
        return _json
    if t in TEXT_TYPES or col.is_text:
        return _text
    return _binary


# -- casts to PostgreSQL -------------------------------------------------------------------

INT_RANGES = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1),
              "int8": (-(2**63), 2**63 - 1)}
WIDER = {"int2": "integer", "int4": "bigint", "int8": "numeric"}

#: The conversions a cast can name (the base PostgreSQL type decides which).
KINDS = ("bool", "int2", "int4", "int8", "numeric", "float4", "float8", "text", "bytea",
         "date", "timestamp", "timestamptz", "time", "interval", "json", "jsonb", "textarray",
         "bit", "uuid")


def render_text(v: Any) -> str:
    """A canonical value as text (a cast to ``text`` of a non-text column)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes | bytearray | memoryview):
        return _text(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        sign = "-" if v < dt.timedelta(0) else ""
        total = abs(v)
        secs = total.days * 86400 + total.seconds
        text = f"{sign}{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
        return text + (f".{total.microseconds:06d}" if total.microseconds else "")
    if isinstance(v, list):
        return ",".join(v)
    return str(v)


def _check_text(s: str, cast: ColumnCast) -> str:
    if "\x00" in s:
        raise Refusal("a NUL character, which PostgreSQL text cannot hold", "bytea")
    if cast.length is not None and len(s) > cast.length:
        raise Refusal(f"{len(s)} characters, more than {cast.pg_type} holds", "text")
    return s


def pg_writer(cast: ColumnCast) -> Callable[[Any], Any]:
    """The function from a canonical source value (never None) to the value PostgreSQL
    stores, raising :class:`Refusal` when it would not be exact."""
    k = cast.kind
    if k == "bool":
        def to_bool(v: Any) -> bool:
            if v in (0, 1):
                return bool(v)
            raise Refusal(f"{v} is neither 0 nor 1", "smallint")
        return to_bool
    if k in INT_RANGES:
        lo, hi = INT_RANGES[k]

        def to_int(v: Any) -> int:
            if isinstance(v, Decimal | float) and v != int(v):
                raise Refusal(f"{v} is not an integer", "numeric")
            i = int(v)
            if not lo <= i <= hi:
                raise Refusal(f"{i} is out of range for {cast.pg_type}", WIDER[k])
            return i
        return to_int
    if k == "numeric":
        return _numeric_writer(cast)
    if k == "float4":
        return _float4
    if k == "float8":
        return float
    if k in ("text", "uuid"):
        return lambda v: _check_text(render_text(v), cast)
    if k == "bytea":
        return _binary
    if k == "date":
        def to_date(v: Any) -> dt.date:
            if isinstance(v, dt.datetime):
                raise Refusal("a date and time into a date", "timestamp")
            return v  # type: ignore[no-any-return]
        return to_date
    if k == "timestamp":
        return lambda v: v.astimezone(UTC).replace(tzinfo=None) if v.tzinfo else v
    if k == "timestamptz":
        return lambda v: v if v.tzinfo else v.replace(tzinfo=UTC)
    if k == "time":
        def to_time(v: dt.timedelta) -> dt.time:
            if not dt.timedelta(0) <= v < dt.timedelta(days=1):
                raise Refusal(f"{render_text(v)} is not a time of day", "interval")
            return (dt.datetime.min + v).time()
        return to_time
    if k == "interval":
        return lambda v: v
    if k in ("json", "jsonb"):
        def to_json(v: Any) -> str:
            s = render_text(v)
            if k == "jsonb" and "\\u0000" in s:
                raise Refusal("a \\u0000 escape, which jsonb cannot hold", "json")
            return _check_text(s, cast)
        return to_json
    if k == "textarray":
        def to_array(v: Any) -> list[str]:
            return [_check_text(m, cast) for m in (v if isinstance(v, list) else [render_text(v)])]
        return to_array
    if k == "bit":
        width = cast.precision or 1
        return lambda v: format(int(v), f"0{width}b")
    raise AssertionError(k)


def _numeric_writer(cast: ColumnCast) -> Callable[[Any], Decimal]:
    p, s = cast.precision, cast.scale

    def to_numeric(v: Any) -> Decimal:
        d = v if isinstance(v, Decimal) else Decimal(repr(v) if isinstance(v, float) else v)
        if p is not None:
            _sign, digits, exp = d.as_tuple()
            scale = -int(exp) if isinstance(exp, int) and exp < 0 else 0
            if s is not None and scale > s and d != round(d, s):
                raise Refusal(f"{d} has more than {s} decimal places", "numeric")
            int_digits = len(digits) - scale if isinstance(exp, int) else 0
            if int_digits > p - (s or 0) and d != 0:
                raise Refusal(f"{d} does not fit {cast.pg_type}", "numeric")
        return d
    return to_numeric


class RowConverter:
    """Rows as read (in the plan's column order) to rows PostgreSQL stores. ``convert``
    raises :class:`Refusal` with ``column`` set to the column's PostgreSQL name."""

    def __init__(self, casts: Sequence[ColumnCast]) -> None:
        self.casts = tuple(casts)
        self._fns = [(source_reader(c.source), pg_writer(c)) for c in self.casts]

    def source_values(self, row: Sequence[Any]) -> list[Any]:
        """Canonical source values (the keyset cursor is made of these)."""
        out: list[Any] = []
        for (read, _), v, cast in zip(self._fns, row, self.casts, strict=True):
            try:
                out.append(None if v is None else read(v))
            except Refusal as r:
                r.column = cast.source.name  # type: ignore[attr-defined]
                raise
        return out

    def convert(self, row: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for (read, write), v, cast in zip(self._fns, row, self.casts, strict=True):
            try:
                if v is None:
                    out.append(None)
                    continue
                src = read(v)
                if src is None:
                    if cast.not_null:
                        raise Refusal("a zero date in a NOT NULL column", "text")
                    out.append(None)
                else:
                    out.append(write(src))
            except Refusal as r:
                r.column = cast.source.name  # type: ignore[attr-defined]
                raise
        return out


# -- the copy's fast path ----------------------------------------------------------------------

#: Source integer types and the values they hold (the binlog and a raw SELECT give int).
_INT_SOURCE_BITS = {"tinyint": 8, "smallint": 16, "mediumint": 24, "int": 32, "integer": 32,
                    "bigint": 64}
#: Charsets whose characters are each one code point once read as UTF-8: a MySQL length
#: limit in characters is then the same limit for PostgreSQL.
_ONE_CODE_POINT_CHARSETS = {"utf8mb4", "utf8mb3", "utf8", "latin1", "ascii"}


def _int_source_range(col: MySQLColumn) -> tuple[int, int] | None:
    if col.data_type == "year":
        return 0, 2155
    bits = _INT_SOURCE_BITS.get(col.data_type)
    if bits is None:
        return None
    if col.unsigned:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _raw_step(cast: ColumnCast) -> Callable[[Any], Any] | None:
    """The conversion of one non-NULL value of a raw SELECT (:data:`RAW_CONVERSIONS`: ints as
    int, decimals as Decimal, floats as float, everything else the server's bytes) straight to
    what PostgreSQL stores; None when the value is already that (no step at all). Every step
    gives what ``pg_writer(cast)(source_reader(col)(v))`` gives, or the same Refusal; only the
    pairs listed are fused, anything else is exactly that composition."""
    col, k = cast.source, cast.kind
    src_range = _int_source_range(col)
    if k in INT_RANGES and src_range is not None:
        lo, hi = INT_RANGES[k]
        if lo <= src_range[0] and src_range[1] <= hi:
            return None                         # an int that always fits
    if (k == "bool" and src_range is not None and col.data_type != "year"):
        def to_bool(v: Any) -> bool:
            if v == 1:
                return True
            if v == 0:
                return False
            raise Refusal(f"{v} is neither 0 nor 1", "smallint")
        return to_bool
    if (k == "numeric" and col.data_type in ("decimal", "numeric")
            and col.precision is not None and cast.precision is not None):
        src_s, dst_s = col.scale or 0, cast.scale or 0
        if (cast.scale is not None and src_s <= dst_s
                and col.precision - src_s <= cast.precision - dst_s):
            return None                         # a Decimal that always fits numeric(p, s)
    if k == "text" and col.data_type in TEXT_TYPES and col.data_type != "enum":
        limit = cast.length
        if (limit is not None and col.length is not None and col.length <= limit
                and (col.charset or "").lower() in _ONE_CODE_POINT_CHARSETS):
            limit = None                        # MySQL already holds it to the limit

        def to_text(v: Any) -> str:
            try:
                s: str = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Refusal(f"invalid UTF-8 at byte {exc.start}", "bytea") from None
            if "\x00" in s:
                raise Refusal("a NUL character, which PostgreSQL text cannot hold", "bytea")
            if limit is not None and len(s) > limit:
                raise Refusal(f"{len(s)} characters, more than {cast.pg_type} holds", "text")
            return s
        return to_text
    if k == "timestamp" and col.data_type == "datetime":
        not_null = cast.not_null
        parse = dt.datetime.fromisoformat

        def to_timestamp(v: Any) -> dt.datetime | None:
            s = v.decode("ascii")
            if s[0:4] == "0000" or s[5:7] == "00" or s[8:10] == "00":
                if not_null:
                    raise Refusal("a zero date in a NOT NULL column", "text")
                return None
            return parse(s)
        return to_timestamp
    read, write, not_null = source_reader(col), pg_writer(cast), cast.not_null

    def composed(v: Any) -> Any:
        src = read(v)
        if src is None:
            if not_null:
                raise Refusal("a zero date in a NOT NULL column", "text")
            return None
        return write(src)
    return composed


class RawRowConverter:
    """:class:`RowConverter` for rows of a raw SELECT (``source.connect(raw=True)``: what the
    copy and verify read), faster: each column's read and write fused into one step, and no
    step where the value is already what PostgreSQL stores (an int that fits, a decimal that
    fits). Same values, same refusals (``column`` set to the source column's name)."""

    def __init__(self, casts: Sequence[ColumnCast]) -> None:
        self.casts = tuple(casts)
        self._steps = [(i, f) for i, c in enumerate(self.casts)
                       if (f := _raw_step(c)) is not None]

    def convert(self, row: Sequence[Any]) -> list[Any]:
        if len(row) != len(self.casts):
            raise ValueError(f"a row of {len(row)} values for {len(self.casts)} columns")
        out = list(row)
        i = -1
        try:
            for i, step in self._steps:
                v = out[i]
                if v is not None:
                    out[i] = step(v)
        except Refusal as r:
            r.column = self.casts[i].source.name  # type: ignore[attr-defined]
            raise
        return out

    def convert_rows(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Many rows; a Refusal carries ``row_index`` (the row's position in ``rows``)."""
        steps = self._steps
        width = len(self.casts)
        result = []
        i = -1
        try:
            for row in rows:
                if len(row) != width:
                    raise ValueError(f"a row of {len(row)} values for {width} columns")
                out = list(row)
                for i, step in steps:
                    v = out[i]
                    if v is not None:
                        out[i] = step(v)
                result.append(out)
        except Refusal as r:
            r.column = self.casts[i].source.name  # type: ignore[attr-defined]
            r.row_index = len(result)  # type: ignore[attr-defined]
            raise
        return result
