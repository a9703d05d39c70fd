"""A MySQL/MariaDB table as the source of a job (``backfill enqueue --kind copy --source
mysql://…``): what :mod:`backfill.engine.sources` calls, built from this package's pieces
(the schema's key choice and cast plan, the copy's :class:`BatchReader`, the verify's
normalised rows). It knows nothing of the engine: the engine asks it for keys, counts and
ranges, and commits each range's rows with its own checkpoint.

The plan a job is enqueued with (every column's cast, the key) is stored in its spec
(``source_plan``): each run and each verify plans again from the live table and refuses to go
on when the result differs (a column added, retyped, a key changed), so every batch of a job
converts the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from psycopg import sql

from backfill.core import sqltext
from backfill.core.errors import ColumnNotFound, DatabaseUnavailable, InvalidInput, TableChanged
from backfill.job.spec import JobSpec
from backfill.mysql.copy import BatchReader, copy_rows, read_key, record_job_start
from backfill.mysql.errors import SourceError
from backfill.mysql.model import TablePlan
from backfill.mysql.schema import CastOptions, plan_table, read_tables
from backfill.mysql.source import (
    MySQLSource,
    connect,
    error_code,
    error_text,
    is_connection_error,
    is_server_error,
    quote_name,
)
from backfill.mysql.verify import key_repr, row_text

Key = tuple[Any, ...]

#: The key-codec type of each orderable MySQL key type (how a cursor is stored as JSON by the
#: engine's ``KeyCodec``): the canonical source values are int, Decimal, str, bytes, date,
#: naive datetime (DATETIME) and UTC datetime (TIMESTAMP).
CODEC_TYPES = {
    "tinyint": "bigint", "smallint": "bigint", "mediumint": "bigint", "int": "bigint",
    "bigint": "bigint", "year": "bigint", "decimal": "numeric", "numeric": "numeric",
    "char": "text", "varchar": "text", "binary": "bytea", "varbinary": "bytea",
    "date": "date", "datetime": "timestamp without time zone",
    "timestamp": "timestamp with time zone",
}

KEYS_PER_LOOKUP = 50_000
#: Errors that stop a statement for its time limit: MariaDB's ``max_statement_time`` (1969),
#: MySQL's ``MAX_EXECUTION_TIME`` (3024).
TOO_SLOW = frozenset({1969, 3024})

#: What the job's batches check the table against: its columns (name, type, nullability, in
#: order) and its indexes' columns, of which the signature keeps the ones over exactly the key
#: (the unique index that makes the key a key: dropped, or made non-unique, the batches'
#: ranges no longer hold each row once).
_SIGNATURE = """
SELECT 'c', ordinal_position, column_name, column_type, is_nullable
FROM information_schema.columns WHERE table_schema = %s AND table_name = %s
UNION ALL
SELECT 'i', 0, index_name, min(non_unique),
       group_concat(column_name ORDER BY seq_in_index SEPARATOR '\x1f')
FROM information_schema.statistics WHERE table_schema = %s AND table_name = %s
GROUP BY index_name"""


def plan_json(plan: TablePlan, options: CastOptions) -> dict[str, Any]:
    """What a job stores of its plan: enough to see that a re-plan is the same one."""
    return {
        "database": plan.source.database, "table": plan.source.name, "key": list(plan.key),
        "tinyint1_boolean": options.tinyint1_boolean,
        "identifier_case": options.identifier_case,
        "columns": [{"source": c.source.name, "source_type": c.source.column_type,
                     "name": c.name, "type": c.pg_type, "kind": c.kind, "rule": c.rule}
                    for c in plan.columns],
    }


@dataclass
class MySQLJobSource:
    """One job's source table; the data connection opens on first use and again after a
    drop (each call that loses it raises :class:`DatabaseUnavailable`: the engine retries)."""

    source: MySQLSource
    plan: TablePlan
    signature: tuple[tuple[str, ...], ...]
    rows_estimate: int | None
    _conn: Any = None
    _reader: BatchReader | None = None

    # -- what the engine reads off it ----------------------------------------------------

    @property
    def key(self) -> tuple[str, ...]:
        return self.plan.key

    @property
    def key_types(self) -> tuple[str, ...]:
        return tuple(CODEC_TYPES[c.source.data_type] for c in self.plan.key_casts)

    @property
    def columns(self) -> tuple[tuple[str, str], ...]:
        """(source name, destination type) per column."""
        return tuple((c.source.name, c.pg_type) for c in self.plan.columns)

    def describe(self) -> str:
        return f"MySQL {self.source.describe()}.{self.plan.source.name}"

    # -- connection ------------------------------------------------------------------------

    def _call(self, fn: Callable[[BatchReader], Any], *, check: bool = True) -> Any:
        """``fn`` on the open reader. A lost connection is :class:`DatabaseUnavailable` (the
        engine reconnects and retries); the server's own error (1054 unknown column, 1146 no
        such table, 1205 lock wait timeout ...) is :class:`TableChanged` when the table is no
        longer the planned one (``check``), else :class:`SourceError` naming its number:
        retrying would only repeat it."""
        if self._conn is None or not self._conn.open:
            self.close()
            self._conn = connect(self.source)
            self._reader = BatchReader(self._conn, self.plan)
        assert self._reader is not None
        try:
            return fn(self._reader)
        except Exception as exc:
            if is_connection_error(exc):
                self.close()
                raise DatabaseUnavailable(f"lost the connection to {self.describe()}: "
                                          f"{error_text(exc)}") from exc
            if not is_server_error(exc):
                raise
            if check:
                self.prove()   # a column or the table dropped: say so, not the symptom
            raise SourceError(f"{self.describe()}: {error_text(exc)}",
                              error_code(exc)) from None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):   # already gone
                self._conn.close()
        self._conn = None
        self._reader = None

    def _rows(self, statement: str, params: Sequence[Any] = (), *,
              check: bool = True) -> list[tuple[Any, ...]]:
        def run(reader: BatchReader) -> list[tuple[Any, ...]]:
            with reader.mconn.cursor() as cur:
                cur.execute(statement, params)
                return list(cur.fetchall())
        result: list[tuple[Any, ...]] = self._call(run, check=check)
        return result

    # -- the Source interface ----------------------------------------------------------------

    def _table(self) -> str:
        return f"{quote_name(self.plan.source.database)}.{quote_name(self.plan.source.name)}"

    def max_key(self) -> Key | None:
        keys = ", ".join(quote_name(k) for k in self.plan.key)
        desc = ", ".join(f"{quote_name(k)} DESC" for k in self.plan.key)
        rows = self._rows(f"SELECT {keys} FROM {self._table()} "   # noqa: S608 - quoted names
                          f"ORDER BY {desc} LIMIT 1")
        if not rows:
            return None
        return read_key(self.plan, rows[0])   # a zero date: ValueRefused

    def count(self) -> int | None:
        """Exact rows, or None when the server stops the count as too slow (10 s: MariaDB's
        ``max_statement_time``, error 1969; MySQL's ``MAX_EXECUTION_TIME`` hint, 3024)."""
        table = self._table()
        try:
            rows = self._rows(f"SET STATEMENT max_statement_time = 10 FOR "  # noqa: S608
                              f"SELECT count(*) FROM {table}")
        except SourceError as exc:
            if exc.code in TOO_SLOW:
                return None
            try:   # MySQL: no SET STATEMENT (1064); MariaDB ignores the optimizer hint
                rows = self._rows(f"SELECT /*+ MAX_EXECUTION_TIME(10000) */ "  # noqa: S608
                                  f"count(*) FROM {table}")
            except SourceError as again:
                if again.code in TOO_SLOW:
                    return None
                raise
        return int(rows[0][0]) if rows else 0

    def begin(self, conn: Any, job_id: int) -> str | None:
        """Before the first batch, in ``conn``'s transaction that snapshots the job's range:
        record the binlog position the catch-up starts from (:func:`record_job_start`);
        or why the job has none (a warning: the copy goes on, offline)."""
        result: str | None = self._call(
            lambda r: record_job_start(conn, r.mconn, self.plan, job_id))
        return result

    def batch(self, conn: Any, lo: Key | None, upper: Key,
              size: int) -> tuple[Key, bool, int, int]:
        """Copy the next ``size`` rows after ``lo`` (at most ``upper``) into the destination
        with COPY, in ``conn``'s open transaction: (the key reached, whether that is
        ``upper``, rows read, rows written). A refused value raises :class:`ValueRefused` (the row's key
        and the ``--cast`` that would move it); nothing of the batch is written then."""
        raw = self._call(lambda r: r.read(lo, size, upper))
        reader = self._reader
        assert reader is not None
        if len(raw) == size:
            hi: Key = reader.key_of(raw[-1])
        else:
            hi = upper
        rows = reader.convert(raw)
        self.prove()   # the rows read are the planned table's (no column changed meanwhile)
        with conn.cursor() as cur:
            copy_rows(cur, self.plan, rows)
        return hi, hi == upper, len(rows), len(rows)

    def boundaries(self, upper: Key, parts: int, rows_estimate: int | None) -> list[Key]:
        return []   # one slice: parallel slices of a MySQL table are not done yet

    def prove(self) -> None:
        """:class:`TableChanged` when the table's columns, or the unique index behind its
        key, are no longer the planned ones."""
        found = _signature(self._rows(_SIGNATURE, _signature_params(self.plan), check=False),
                           self.plan.key)
        if found != self.signature:
            what = ("its columns differ" if _part(found, "c") != _part(self.signature, "c")
                    else f"the unique index on its key ({', '.join(self.plan.key)}) was "
                         "dropped or changed")
            raise TableChanged(f"{self.describe()} changed since the job was planned ({what}): "
                               "the planned casts and key no longer apply; cancel the job, "
                               "re-plan (convert-schema) and enqueue a new one")

    def verify_range(self, conn: Any, lo: Key | None, hi: Key,
                     chunk: int) -> tuple[int, list[str]]:
        """Compare ``(lo, hi]`` of the source with the destination rows of the same keys, as
        ``backfill mysql verify`` does (normalised text per row, an MD5 per chunk): what
        differs, one line per chunk; and the source rows compared."""
        plan = self.plan
        casts, key_pos = plan.columns, plan.key_positions
        details: list[str] = []
        after = lo
        compared = 0
        lookup = _select_by_key_arrays(plan)
        while True:
            raw: list[tuple[Any, ...]] = self._call(
                functools.partial(_read, after=after, limit=chunk, upper=hi))
            if not raw:
                break
            reader = self._reader
            assert reader is not None
            last = reader.key_of(raw[-1])
            src = [(tuple(r[i] for i in key_pos), row_text(casts, r))
                   for r in reader.convert(raw)]
            compared += len(src)
            found: dict[str, str] = {}
            # The keys as one array per key column, joined to the destination: a hash join,
            # however many keys (an IN list of rows is planned as a deep OR tree).
            keys = [k for k, _ in src]
            for part in (keys[i:i + KEYS_PER_LOOKUP]
                         for i in range(0, len(keys), KEYS_PER_LOOKUP)):
                arrays = [[k[j] for k in part] for j in range(len(key_pos))]
                for r in conn.execute(lookup, arrays).fetchall():
                    found[key_repr(casts, key_pos, tuple(r[i] for i in key_pos))] = \
                        row_text(casts, r)
            missing = [k for k, _ in src if key_repr(casts, key_pos, k) not in found]
            differ = [k for k, line in src
                      if found.get(key_repr(casts, key_pos, k), line) != line]
            if missing or differ:
                src_md5 = hashlib.md5("\n".join(t for _, t in src).encode(),
                                      usedforsecurity=False).hexdigest()
                parts = [f"source has {len(src)} rows (md5 {src_md5[:12]}), the destination "
                         f"{len(found)} of those keys"]
                if missing:
                    parts.append(f"missing: {_show(missing)}")
                if differ:
                    parts.append(f"different: {_show(differ)}")
                details.append("; ".join(parts))
            if len(raw) < chunk or last == hi:
                break
            after = last
        return compared, details


def _select_by_key_arrays(plan: TablePlan) -> sql.Composed:
    """The destination rows whose keys are in the arrays given (one per key column, cast to
    the column's type), every column as :func:`row_text` reads it (JSON as text)."""
    cols = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier("d", c.name)) if c.kind in ("json", "jsonb")
        else sql.Identifier("d", c.name) for c in plan.columns)
    keys = plan.key_casts
    arrays = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sqltext.type_sql(c.pg_type))
                                for c in keys)
    names = [sql.Identifier(f"k{i}") for i in range(len(keys))]
    on = sql.SQL(" AND ").join(sql.SQL("{} = k.{}").format(sql.Identifier("d", c.name), n)
                               for c, n in zip(keys, names, strict=True))
    return sql.SQL("SELECT {} FROM {} AS d JOIN unnest({}) AS k({}) ON {}").format(
        cols, sql.Identifier(plan.schema, plan.name), arrays, sql.SQL(", ").join(names), on)


def _read(reader: BatchReader, *, after: Key | None, limit: int,
          upper: Key) -> list[tuple[Any, ...]]:
    return reader.read(after, limit, upper)


def _show(keys: Sequence[Key]) -> str:
    shown = ", ".join(str(k[0]) if len(k) == 1 else "(" + ", ".join(map(str, k)) + ")"
                      for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)


def _signature(rows: Sequence[Sequence[Any]],
               key: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The rows of :data:`_SIGNATURE` as text, in a fixed order: every column, and the
    indexes over exactly ``key`` (name, non-unique flag, columns)."""
    key_text = "\x1f".join(key)
    ordered = sorted(rows, key=lambda r: (_text(r[0]), int(r[1]), _text(r[2])))
    text = [(_text(r[0]), *(_text(v) for v in r[2:])) for r in ordered]
    return tuple(r for r in text if r[0] == "c" or r[-1] == key_text)


def _signature_params(plan: TablePlan) -> tuple[str, str, str, str]:
    database, name = plan.source.database, plan.source.name
    return database, name, database, name


def _part(signature: tuple[tuple[str, ...], ...], kind: str) -> tuple[tuple[str, ...], ...]:
    return tuple(r for r in signature if r[0] == kind)


def open_job_source(spec: JobSpec, *, dest_schema: str, dest_name: str,
                    dest_columns: Sequence[str], source: MySQLSource | None = None,
                    ) -> tuple[MySQLJobSource, dict[str, Any]]:
    """Plan ``spec``'s table (its key, ``spec.casts``) for the destination table
    ``dest_schema.dest_name`` and check it against the plan stored with the job, if any:
    (the source, the plan to store). Input errors are :class:`InvalidInput`; an unreachable
    server :class:`DatabaseUnavailable`. ``source``: the parsed DSN, with other timeouts."""
    assert spec.source_dsn is not None
    source = source or MySQLSource.parse(spec.source_dsn)
    schema, name = sqltext.qualified_name(spec.table, slot="table")
    if schema is not None and schema != source.database:
        raise InvalidInput(f"the table {spec.table} is not in the source's database "
                           f"{source.database} (name it without the database, or as "
                           f"{source.database}.{name})")
    stored = spec.source_plan or {}
    options = CastOptions.from_specs(
        spec.casts, tinyint1_boolean=bool(stored.get("tinyint1_boolean", True)),
        identifier_case=stored.get("identifier_case", "lower"), schema=dest_schema)
    conn = connect(source, raw=False)
    try:
        table, = read_tables(conn, source.database, [name])
        shape = _query(conn, _SIGNATURE, (source.database, table.name) * 2)
        estimate = _query(conn, "SELECT table_rows FROM information_schema.tables WHERE "
                          "table_schema = %s AND table_name = %s", (source.database, table.name))
    finally:
        conn.close()
    plan = plan_table(table, options, spec.key or None)
    plan = replace(plan, schema=dest_schema, name=dest_name)
    planned = plan_json(plan, options)
    if stored and stored != planned:
        raise InvalidInput(
            f"{source.describe()}.{table.name} no longer plans as it did when the job was "
            "enqueued (a column or the key changed, or other casts): the rows copied so far "
            "were converted by the old plan; cancel the job and enqueue a new one")
    have = set(dest_columns)
    lacking = [c.name for c in plan.columns if c.name not in have]
    if lacking:
        raise ColumnNotFound(
            f"the destination {dest_schema}.{dest_name} has no column {', '.join(lacking)} of "
            f"the plan for {table.name}: create it with `backfill convert-schema --source … "
            f"--tables {table.name} --apply` (with the same --cast options as the job)")
    rows = int(estimate[0][0]) if estimate and estimate[0][0] is not None else None
    return MySQLJobSource(source, plan, _signature(shape, plan.key), rows), planned


def _query(conn: Any, statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall())
