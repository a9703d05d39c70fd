"""What a job does, as data: the kind, the source table, the key and kind-specific fields.

A :class:`JobSpec` is plain, serialisable and checked for shape only; :mod:`backfill.engine.kinds`
binds it to the catalog (``prepare``) and builds the SQL of a batch.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import psycopg

from backfill.core import sqltext
from backfill.core.errors import InvalidInput, InvalidOption
from backfill.job.options import JobOptions, build_options

#: Set while a stored spec is read back: it loads (list, show and cancel work on it) and its
#: text is checked where it is used, so a job stored before a stricter gate cannot run.
_STORED: ContextVar[bool] = ContextVar("backfill_spec_stored", default=False)

KINDS = ("update", "sql", "copy", "move", "transform", "delete", "revert")
#: Kinds that change rows in place and can keep an undo log (on by default for them).
UNDOABLE = ("update", "transform", "delete")
CONFLICT_MODES = ("error", "nothing", "update")

#: A transform gets one row (column -> value) and returns the columns to change, or None.
TransformFn = Callable[[dict[str, Any]], Mapping[str, Any] | None]

#: Source DSN schemes of other engines than PostgreSQL (their reading lives in their own
#: package, e.g. :mod:`backfill.mysql.job`); everything else is a PostgreSQL DSN.
FOREIGN_SCHEMES = {"mysql": "mysql", "mariadb": "mysql"}


def source_engine(dsn: str | None) -> str | None:
    """``None`` (no other database), ``"postgresql"`` or ``"mysql"``: by the DSN's scheme."""
    if dsn is None:
        return None
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    return FOREIGN_SCHEMES.get(scheme, "postgresql")


_SET_RE = re.compile(r"^\s*(\"(?:[^\"]|\"\")+\"|[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)"
                     r"\s*=(?!=)\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class JobSpec:
    """One job's definition. Build it with :func:`update`, :func:`sql_job`, :func:`copy`, …"""

    kind: str
    table: str
    key: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    where: str | None = None
    statement: str | None = None
    dest: str | None = None
    columns: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    on_conflict: str = "error"
    function: str | None = None
    name: str | None = None
    description: str | None = None
    options: JobOptions = field(default_factory=JobOptions)
    #: Keep the old values of every row changed (deleted rows whole) in an undo table, in the
    #: batch's transaction, so ``backfill revert`` can restore them. None: on for UNDOABLE.
    undo_log: bool | None = None
    #: revert jobs: the job whose undo log they apply (table: its undo table, dest: its table).
    reverts: int | None = None
    #: Run this many rows first ("5000", or "2%" of the table), verify them, then wait in
    #: awaiting_approval for `backfill approve` (or ``auto_approve_after_ms`` of quiet).
    canary: str | None = None
    auto_approve_after_ms: float | None = None
    #: copy from another database: ``table`` lives there, ``dest`` here (where the job's
    #: state lives, committing with the written rows). No password in it: ~/.pgpass.
    source_dsn: str | None = None
    #: (destination column, source column) pairs for columns renamed between the two.
    column_map: tuple[tuple[str, str], ...] = ()
    #: copy from MySQL/MariaDB: the cast overrides given at enqueue (``table.column=type``,
    #: as ``convert-schema --cast``), and, once prepared, the whole plan the job was enqueued
    #: with (:mod:`backfill.mysql.job`): every run and verify re-plans and must get it again.
    casts: tuple[str, ...] = ()
    source_plan: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"unknown job kind {self.kind!r} (kinds: {', '.join(KINDS)})")
        if not self.table or not self.table.strip():
            raise InvalidInput("a job needs a table")
        if self.kind == "update" and not self.set:
            raise InvalidInput("an update job needs at least one SET expression (col = expr)")
        if self.kind == "sql" and not (self.statement and self.statement.strip()):
            raise InvalidInput("a sql job needs a statement")
        if self.kind in ("copy", "move") and not self.dest:
            raise InvalidInput(f"a {self.kind} job needs a destination table (--dest)")
        if self.kind == "delete" and not (self.where and self.where.strip()):
            raise InvalidInput(
                "a delete job needs a predicate (--where); use --where true to delete every row"
            )
        if self.kind == "transform":
            if not self.function:
                raise InvalidInput("a transform job needs a function (module:function)")
            if not self.columns:
                raise InvalidInput("a transform job needs the columns it reads (--columns)")
        if self.kind == "move" and self.on_conflict == "nothing":
            raise InvalidInput(
                "a move job cannot use on_conflict=nothing: a source row whose insert is skipped "
                "would still be deleted (use error, or update to overwrite the destination row)"
            )
        if not _STORED.get():
            self._check_sql_text()
        if self.kind == "sql" and self.statement and not _uses_bounds(self.statement):
            raise InvalidInput(
                "a sql job's statement must use the batch bounds, %(lower)s and %(upper)s (or "
                "%(lower_<col>)s / %(upper_<col>)s per key column): without them every batch "
                "would touch the whole table"
            )
        if self.undo_log and self.kind not in UNDOABLE:
            raise InvalidInput(f"a {self.kind} job cannot keep an undo log (only "
                               f"{', '.join(UNDOABLE)} jobs change rows in place)")
        if self.kind == "revert" and (self.reverts is None or not self.dest):
            raise InvalidInput("a revert job needs the job it reverts (`backfill revert JOB`)")
        if self.source_dsn is not None:
            if self.kind not in ("copy", "move", "delete"):
                raise InvalidInput("only copy and move jobs read from another database "
                                   "(--source)")
            if self.kind == "delete" and (self.undo_log or not self.dest):
                raise InvalidInput("a cross-database delete is a move's second phase: it needs "
                                   "the destination that holds the rows, and keeps no undo log")
            if self.on_conflict != "error":
                raise InvalidInput("a cross-database copy writes with COPY: on_conflict must "
                                   "be error")
            if source_engine(self.source_dsn) == "mysql":
                self._check_mysql_source()
            else:
                self._check_pg_source()
        if self.casts and source_engine(self.source_dsn) != "mysql":
            raise InvalidInput("--cast is for copies from MySQL/MariaDB (--source mysql://…)")
        if self.column_map and self.source_dsn is None:
            raise InvalidInput("a column map (--map) is for copies from another database "
                               "(--source)")
        if self.canary is not None:
            canary_size(self.canary, None)   # shape only; the table's size is checked later
        if self.auto_approve_after_ms is not None and self.canary is None:
            raise InvalidOption("auto_approve_after needs a canary")
        if self.on_conflict not in CONFLICT_MODES:
            raise InvalidOption(
                f"on_conflict must be one of {', '.join(CONFLICT_MODES)}, got {self.on_conflict!r}"
            )

    def _check_pg_source(self) -> None:
        assert self.source_dsn is not None
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(self.source_dsn)
        except psycopg.ProgrammingError as exc:
            raise InvalidInput(f"malformed source DSN: {exc}") from None
        if parts.get("password") or parts.get("sslpassword"):
            raise InvalidInput("the source DSN must not carry a password: the job's spec "
                               "is stored in the database; use ~/.pgpass (or PGPASSFILE)")

    def _check_mysql_source(self) -> None:
        """Shape only (the driver is not needed to enqueue-check a DSN): a copy, no password
        in the DSN (specs are stored, logged and shown), nothing PostgreSQL-specific."""
        from urllib.parse import parse_qsl, urlsplit

        assert self.source_dsn is not None
        if self.kind != "copy":
            raise InvalidInput("only copy jobs read from MySQL/MariaDB (--kind copy)")
        try:
            parts = urlsplit(self.source_dsn)
            password = parts.password
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
        except ValueError as exc:
            raise InvalidInput(f"malformed source DSN: {exc}") from None
        if password is not None or "password" in query:
            raise InvalidInput("the source DSN must not carry a password: put it in an option "
                               "file (~/.my.cnf, or the file named by ?read_default_file=PATH, "
                               "with [client] password=...)")
        if self.column_map or self.columns or self.where:
            raise InvalidInput("a copy from MySQL/MariaDB copies every column of the table "
                               "as convert-schema planned it: no --map, --columns or --where")

    def _check_sql_text(self) -> None:
        """Every piece of user text this spec turns into SQL, through the one gate: names as
        SQL reads them, one expression per SET value and WHERE, one statement for ``sql``."""
        sqltext.qualified_name(self.table, slot="table")
        if self.dest is not None:
            sqltext.qualified_name(self.dest, slot="destination table")
        for col, expr in self.set:
            sqltext.expression(expr, slot=f"SET {col} =")
        if self.where is not None and self.where.strip():
            sqltext.expression(self.where, slot="WHERE")
        if self.kind == "sql" and self.statement:
            sqltext.statement(self.statement, allowed=sqltext.SQL_JOB_STATEMENTS,
                              slot="sql statement", placeholders=True)

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.kind == "update":
            return f"update {self.table}: " + ", ".join(c for c, _ in self.set)
        if self.kind in ("copy", "move"):
            return f"{self.kind} {self.table} -> {self.dest}"
        if self.kind == "revert":
            return f"revert job {self.reverts}"
        return f"{self.kind} {self.table}"

    @property
    def undo_enabled(self) -> bool:
        return (self.kind in UNDOABLE and self.undo_log is not False
                and self.source_dsn is None)

    def write_columns(self) -> tuple[str, ...]:
        if self.kind == "update":
            return tuple(c for c, _ in self.set)
        if self.kind == "transform":
            return self.writes or self.columns
        return ()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["options"] = self.options.to_json()
        data["set"] = [list(p) for p in self.set]
        data["column_map"] = [list(p) for p in self.column_map]
        data["casts"] = list(self.casts)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        d = dict(data)
        d["options"] = JobOptions.from_json(d.get("options") or {})
        d["set"] = tuple(tuple(p) for p in d.get("set") or ())
        d["column_map"] = tuple(tuple(p) for p in d.get("column_map") or ())
        for name in ("key", "columns", "writes", "casts"):
            d[name] = tuple(d.get(name) or ())
        known = {f.name for f in dataclasses.fields(cls)}
        token = _STORED.set(True)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        finally:
            _STORED.reset(token)

    def with_options(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, options=self.options.merged(changes))


def _uses_bounds(statement: str) -> bool:
    """Whether a sql job's statement really uses a lower and an upper bound of the batch (as
    parameters the parser sees: one in a comment or a string literal does not count)."""
    try:
        used = sqltext.parameters_used(statement, slot="sql statement")
    except InvalidInput:
        return True   # not parseable: the gate says why, with a better message
    return (any(n == "lower" or n.startswith("lower_") for n in used)
            and any(n == "upper" or n.startswith("upper_") for n in used))


def canary_size(text: str, rows_estimate: int | None) -> int:
    """Rows of a canary: ``"5000"`` or ``"2%"`` (of ``rows_estimate``); checked for shape when
    ``rows_estimate`` is None."""
    t = str(text).strip()
    pct = t.endswith("%")
    num = t[:-1].strip() if pct else t
    try:
        value = float(num) if pct else int(num)
    except ValueError:
        raise InvalidOption(f"canary: expected rows (5000) or a percent (2%), got {text!r}") from None
    if not value > 0 or (pct and value >= 100):
        raise InvalidOption(f"canary must be more than 0 rows and less than 100%, got {text!r}")
    if rows_estimate is None:
        if pct and rows_estimate is None:
            return 0
        return int(value)
    rows = max(1, round(rows_estimate * value / 100)) if pct else int(value)
    if rows >= rows_estimate:
        raise InvalidInput(f"canary of {rows:,} rows is not smaller than the table "
                           f"(~{rows_estimate:,} rows): it would be the whole job")
    return rows


def parse_set(expressions: Iterable[str] | Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``["total = qty * price"]`` or ``{"total": "qty * price"}`` -> ``(("total", "qty * price"),)``.

    The column is a name as SQL writes it (``Total`` is ``total``, ``"Total"`` keeps its case);
    the value must be exactly one expression (:mod:`backfill.core.sqltext`)."""
    if isinstance(expressions, Mapping):
        raw = [(str(k), str(v)) for k, v in expressions.items()]
    else:
        raw = []
        for text in expressions:
            m = _SET_RE.match(text)
            if not m:
                raise InvalidInput(f"cannot parse SET expression {text!r}: expected `column = expression`")
            raw.append((m.group(1), m.group(2)))
    pairs = []
    for col, expr in raw:
        if not col.strip() or not expr.strip():
            raise InvalidInput(f"empty column or expression in SET {col!r} = {expr!r}")
        name = sqltext.identifier(col, slot="SET column")
        pairs.append((name, sqltext.expression(expr, slot=f"SET {name} =")))
    if len({c for c, _ in pairs}) != len(pairs):
        raise InvalidInput("a column is assigned twice in SET")
    return tuple(pairs)


def _key(key: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]``: names as SQL writes them (see :mod:`backfill.core.sqltext`)."""
    if key is None:
        return ()
    return sqltext.identifier_list(key, slot="key")


def _names(names: str | Iterable[str] | None, slot: str) -> tuple[str, ...]:
    return sqltext.identifier_list(names, slot=slot) if names else ()


def function_name(fn: TransformFn | str) -> str:
    """``module:qualname`` of an importable function (checked), so another process can load it."""
    if isinstance(fn, str):
        load_function(fn)
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise InvalidInput(
            f"transform function {fn!r} must be defined at module level in an importable "
            "module (not a lambda, a nested function or __main__)"
        )
    name = f"{module}:{qualname}"
    load_function(name)
    return name


def load_function(name: str) -> TransformFn:
    module_name, sep, qualname = name.partition(":")
    if not sep or not module_name or not qualname:
        raise InvalidInput(f"transform function {name!r}: expected module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"transform function {name!r}: cannot import {module_name}: {exc}") from exc
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise InvalidInput(f"transform function {name!r}: {module_name} has no {qualname}")
    if not callable(obj):
        raise InvalidInput(f"transform function {name!r} is not callable")
    fn: TransformFn = obj
    return fn


def update(
    table: str,
    set: Mapping[str, str] | Iterable[str],
    *,
    where: str | None = None,
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    undo_log: bool | None = None,
    **options: Any,
) -> JobSpec:
    """``UPDATE table SET col = expr ... WHERE <batch range> [AND where]``, batch by batch.
    ``undo_log`` (default on) keeps the old values for ``revert``."""
    return JobSpec(
        "update", table, key=_key(key), set=parse_set(set), where=where, name=name,
        description=description, options=build_options(**options), undo_log=undo_log,
    )


def sql_job(
    table: str,
    statement: str,
    *,
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    **options: Any,
) -> JobSpec:
    """Run ``statement`` once per batch with the batch's inclusive key bounds as parameters.

    Single-column keys get ``%(lower)s`` and ``%(upper)s``; every key also gets
    ``%(lower_<column>)s`` and ``%(upper_<column>)s``. Example:
    ``UPDATE t SET c = f(x) WHERE id BETWEEN %(lower)s AND %(upper)s``.
    """
    return JobSpec(
        "sql", table, key=_key(key), statement=statement, name=name, description=description,
        options=build_options(**options),
    )


def copy(
    table: str,
    dest: str,
    *,
    columns: Iterable[str] | None = None,
    where: str | None = None,
    on_conflict: str = "error",
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    source_dsn: str | None = None,
    casts: Iterable[str] = (),
    **options: Any,
) -> JobSpec:
    """``INSERT INTO dest SELECT ... FROM table`` batch by batch (``on_conflict``: error, nothing, update).

    ``source_dsn``: ``table`` lives in another database (PostgreSQL, or ``mysql://…`` for
    MySQL/MariaDB, where ``casts`` are ``convert-schema``'s ``table.column=type`` overrides)."""
    return JobSpec(
        "copy", table, key=_key(key), dest=dest, columns=_names(columns, "columns"), where=where,
        on_conflict=on_conflict, name=name, description=description,
        options=build_options(**options), source_dsn=source_dsn, casts=tuple(casts),
    )


def move(
    table: str,
    dest: str,
    *,
    columns: Iterable[str] | None = None,
    where: str | None = None,
    on_conflict: str = "error",
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    **options: Any,
) -> JobSpec:
    """Like :func:`copy`, and deletes the copied source rows in the same transaction."""
    spec = copy(table, dest, columns=columns, where=where, key=key, name=name,
                description=description, **options)
    return dataclasses.replace(spec, kind="move", on_conflict=on_conflict)


def transform(
    table: str,
    fn: TransformFn | str,
    *,
    columns: Iterable[str],
    writes: Iterable[str] | None = None,
    where: str | None = None,
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    undo_log: bool | None = None,
    **options: Any,
) -> JobSpec:
    """Apply ``fn`` to each row (``columns`` read, ``writes`` written) and write changes back."""
    return JobSpec(
        "transform", table, key=_key(key), function=function_name(fn), columns=_names(columns, "columns"),
        writes=_names(writes, "writes"), where=where, name=name, description=description,
        options=build_options(**options), undo_log=undo_log,
    )


def delete(
    table: str,
    where: str,
    *,
    key: str | Iterable[str] | None = None,
    name: str | None = None,
    description: str | None = None,
    undo_log: bool | None = None,
    **options: Any,
) -> JobSpec:
    """``DELETE FROM table WHERE <batch range> AND where``, batch by batch; the deleted rows
    are kept whole in the undo log (``undo_log=False``: not)."""
    return JobSpec(
        "delete", table, key=_key(key), where=where, name=name, description=description,
        options=build_options(**options), undo_log=undo_log,
    )
