"""Zero-downtime migrations as data: a file of operations, each expanded into steps.

A migration file (TOML) names an id, a description and its operations. Each operation turns
into *steps* in three phases, in the expand/contract pattern (pgroll's start/complete/rollback):

- ``start`` (expand): additive changes the running application tolerates (a nullable column, a
  sync trigger, a ``NOT VALID`` constraint, a concurrent index), then the backfill jobs that
  fill the new shape, then validations;
- ``complete`` (contract): the changes that need the backfill done (``SET NOT NULL``, the column
  swap) and the destructive ones (drop a column, table or index), behind the gate;
- ``rollback``: undoes ``start``, in reverse order; every step is idempotent (``IF EXISTS``).

A step is plain data: its statements, the lock it takes, how long it holds it (a duration
class), its risk and how it runs (in a transaction, outside one for ``CONCURRENTLY``, as a
backfill job, or as a read-only check). :mod:`backfill.migrate.executor` runs them; this module only
plans, against the catalog of the database it will run on, so a missing table or column is an
error before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, overload

import psycopg
from pglast import parse_sql
from pglast.parser import ParseError
from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Conn, primary_key_of, split_name
from backfill.core.durations import parse_duration_ms
from backfill.core.errors import (
    ColumnNotFound,
    InvalidFragment,
    InvalidInput,
    InvalidOption,
    TableNotFound,
)
from backfill.job.spec import JobSpec
from backfill.migrate.lint import column_names, function_names

PHASES = ("start", "complete", "rollback")
#: How a step runs. ``tx``: its statements and its "done" mark commit in one transaction.
#: ``concurrent``: outside any transaction (CONCURRENTLY). ``backfill``: a backfill job.
#: ``check``: a read-only query that must return true.
MODES = ("tx", "concurrent", "backfill", "check")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_DOLLAR = "$bf$"
#: The transaction-local setting a sync trigger raises around its own write to the other side.
SYNC_GUARD = "backfill.syncing"
#: Column names a trigger cannot declare as variables (they would shadow the row records).
_PLPGSQL_RESERVED = {"new", "old", "found"}


# -- the plan's vocabulary ------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One unit the executor runs and records; everything the plan prints about it."""

    phase: str
    op: int                                  # index of its operation in the file (0-based)
    description: str
    mode: str
    statements: tuple[str, ...] = ()
    lock: str = "none"                       # the strongest lock taken, and on what
    duration: str = "instant"                # instant | scan | build | backfill
    risk: str = "low"                        # low | medium | high
    table: str | None = None                 # qualified table whose size drives the estimate
    index: str | None = None                 # concurrent builds: the index a failure leaves
    job: dict[str, Any] | None = None        # backfill steps: the JobSpec as JSON
    note: str | None = None
    #: Tables a ``tx`` step locks before its statements, in this order: (schema, table,
    #: mode). A statement that locks two tables takes them in its own order (a foreign key:
    #: the child, then the parent); the application's writes through triggers take them
    #: parent first, so the step does too, or the two deadlock.
    lock_order: tuple[tuple[str, str, str], ...] = ()
    #: (rows, bytes) ``table`` is expected to have when the step runs, for a table this
    #: migration creates and fills (the plan's size of it is 0).
    expected: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "op": self.op, "description": self.description,
                "mode": self.mode, "statements": list(self.statements), "lock": self.lock,
                "duration": self.duration, "risk": self.risk, "table": self.table,
                "index": self.index, "job": self.job, "note": self.note,
                "lock_order": [list(x) for x in self.lock_order],
                "expected": list(self.expected) if self.expected else None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Step:
        return cls(phase=d["phase"], op=int(d["op"]), description=d["description"],
                   mode=d["mode"], statements=tuple(d.get("statements") or ()),
                   lock=d.get("lock", "none"), duration=d.get("duration", "instant"),
                   risk=d.get("risk", "low"), table=d.get("table"), index=d.get("index"),
                   job=d.get("job"), note=d.get("note"),
                   lock_order=tuple((str(a), str(b), str(c))
                                    for a, b, c in d.get("lock_order") or ()),
                   expected=(int(d["expected"][0]), int(d["expected"][1]))
                   if d.get("expected") else None)


@dataclass(frozen=True)
class OpPlan:
    """What one operation does: its goal, its steps per phase, and what to know about it."""

    op: int
    kind: str
    goal: str
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()
    irreversible: str | None = None          # what `complete` destroys, when it does
    #: What the data says against it: ``plan`` shows these, ``start`` refuses while any holds.
    blockers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """How the executor treats locks and time (``[settings]`` in the file)."""

    lock_timeout_ms: float = 2_000.0
    statement_timeout_ms: float = 60_000.0
    #: CONCURRENTLY builds and VALIDATE scan the table under a weak lock: no timeout by default.
    long_statement_timeout_ms: float = 0.0
    lock_retries: int = 30
    retry_backoff_ms: float = 500.0
    retry_backoff_max_ms: float = 30_000.0

    @classmethod
    def from_toml(cls, data: Mapping[str, Any]) -> Settings:
        known = {"lock_timeout", "statement_timeout", "long_statement_timeout", "lock_retries",
                 "retry_backoff", "retry_backoff_max"}
        unknown = set(data) - known
        if unknown:
            raise InvalidOption(f"unknown setting(s) {', '.join(sorted(unknown))} "
                                f"(settings: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name in ("lock_timeout", "statement_timeout", "long_statement_timeout",
                     "retry_backoff", "retry_backoff_max"):
            if name in data:
                values[name + "_ms"] = parse_duration_ms(data[name], option=name)
        if "lock_retries" in data:
            n = data["lock_retries"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise InvalidOption(f"lock_retries must be a whole number >= 0, got {n!r}")
            values["lock_retries"] = n
        s = cls(**values)
        if s.lock_timeout_ms <= 0:
            raise InvalidOption("lock_timeout must be > 0: a DDL step must never wait in the "
                                "lock queue without limit (it blocks every query behind it)")
        return s

    def to_json(self) -> dict[str, Any]:
        return {"lock_timeout_ms": self.lock_timeout_ms,
                "statement_timeout_ms": self.statement_timeout_ms,
                "long_statement_timeout_ms": self.long_statement_timeout_ms,
                "lock_retries": self.lock_retries, "retry_backoff_ms": self.retry_backoff_ms,
                "retry_backoff_max_ms": self.retry_backoff_max_ms}


@dataclass(frozen=True)
class MigrationFile:
    """A parsed migration file: checked for shape, not yet against a database."""

    id: str
    description: str
    operations: tuple[dict[str, Any], ...]
    settings: Settings
    depends_on: tuple[str, ...] = ()
    backfill: dict[str, Any] = field(default_factory=dict)   # job options for its backfills
    checksum: str = ""
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "description": self.description,
                "operations": list(self.operations), "settings": self.settings.to_json(),
                "depends_on": list(self.depends_on), "backfill": self.backfill}


def load_file(path: str | Path) -> MigrationFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read migration file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"migration file {p} is not UTF-8 text (byte {exc.start}: "
                           f"{exc.reason})") from None
    return parse(text, str(p))


def parse(text: str, name: str = "<migration>") -> MigrationFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{name}: not valid TOML: {exc}") from None
    known = {"id", "description", "operations", "settings", "depends_on", "backfill"}
    unknown = set(data) - known
    if unknown:
        raise InvalidInput(f"{name}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(a migration has: {', '.join(sorted(known))})")
    mid = data.get("id")
    if not isinstance(mid, str) or not _ID_RE.match(mid):
        raise InvalidInput(f"{name}: `id` must be a string of letters, digits, '_', '-' or '.' "
                           f"(at most 100), got {mid!r}")
    ops = data.get("operations")
    if not isinstance(ops, list) or not ops or not all(isinstance(o, dict) for o in ops):
        raise InvalidInput(f"{name}: a migration needs at least one [[operations]] table")
    for i, o in enumerate(ops):
        if o.get("op") not in OPERATIONS:
            raise InvalidInput(f"{name}: operation {i + 1}: unknown op {o.get('op')!r} "
                               f"(ops: {', '.join(OPERATIONS)})")
    deps = data.get("depends_on", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise InvalidInput(f"{name}: depends_on must be a list of migration ids")
    backfill = data.get("backfill", {})
    if not isinstance(backfill, dict):
        raise InvalidInput(f"{name}: [backfill] must be a table of job options")
    if not isinstance(data.get("settings", {}), dict):
        raise InvalidInput(f"{name}: [settings] must be a table")
    settings = Settings.from_toml(data.get("settings", {}))
    canonical = json.dumps({"id": mid, "description": data.get("description", ""),
                            "operations": ops, "settings": settings.to_json(),
                            "depends_on": deps, "backfill": backfill},
                           sort_keys=True, default=str)
    return MigrationFile(
        id=mid, description=str(data.get("description", "")), operations=tuple(ops),
        settings=settings, depends_on=tuple(deps), backfill=dict(backfill),
        checksum=hashlib.sha256(canonical.encode()).hexdigest()[:16], path=name)


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


# -- operations -------------------------------------------------------------------------------


class _Op:
    """Reads one ``[[operations]]`` table; unknown or missing fields are errors."""

    def __init__(self, index: int, data: Mapping[str, Any], shape: Shape, conn: Conn,
                 mig: MigrationFile) -> None:
        self.i = index
        self.data = dict(data)
        self.shape = shape
        self.conn = conn
        self.mig = mig
        self.used = {"op"}
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.blockers: list[str] = []

    def where(self) -> str:
        return f"operation {self.i + 1} ({self.data.get('op')})"

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise InvalidInput(f"{self.where()}: `{name}` is required")
            return default
        return self.data[name]

    def text(self, name: str) -> str:
        v = self.opt(name)
        if v is None:
            raise InvalidInput(f"{self.where()}: `{name}` is required")
        return v

    @overload
    def opt(self, name: str) -> str | None: ...
    @overload
    def opt(self, name: str, default: str) -> str: ...

    def opt(self, name: str, default: str | None = None) -> str | None:
        v = self.get(name, None)
        if v is None:
            return default
        if not isinstance(v, str) or not v.strip():
            raise InvalidInput(f"{self.where()}: `{name}` must be a non-empty string, got {v!r}")
        if _DOLLAR in v:
            raise InvalidInput(f"{self.where()}: `{name}` must not contain {_DOLLAR}")
        return v

    def ident(self, name: str, default: str | None = None) -> str:
        """A name field (a column, a constraint, an index), read as SQL reads a name."""
        v = self.opt(name)
        if v is None:
            if default is None:
                raise InvalidInput(f"{self.where()}: `{name}` is required")
            return default
        return sqltext.identifier(v, slot=f"`{name}`")

    def type_field(self, name: str) -> str:
        """A type field: exactly one type name."""
        return sqltext.type_name(self.text(name), slot=f"`{name}`")

    @overload
    def expression(self, name: str) -> str | None: ...
    @overload
    def expression(self, name: str, default: str) -> str: ...

    def expression(self, name: str, default: str | None = None) -> str | None:
        """An expression field (a default, a value, a check, a predicate): exactly one."""
        v = self.opt(name)
        if v is None:
            return default
        return sqltext.expression(v, slot=f"`{name}`")

    def names(self, name: str, *, required: bool = True,
              idents: bool = True) -> tuple[str, ...]:
        v = self.get(name, None, required=required)
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if (not isinstance(v, list) or not v
                or not all(isinstance(x, str) and x.strip() for x in v)):
            raise InvalidInput(f"{self.where()}: `{name}` must be a column name or a list of "
                               f"them, got {v!r}")
        if idents:
            v = [sqltext.identifier(x, slot=f"`{name}`") for x in v]
        if len(set(v)) != len(v):
            raise InvalidInput(f"{self.where()}: `{name}` names a column twice")
        return tuple(v)

    def flag(self, name: str, default: bool = False) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise InvalidInput(f"{self.where()}: `{name}` must be true or false, got {v!r}")
        return v

    def check_unused(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise InvalidInput(f"{self.where()}: unknown field(s) {', '.join(sorted(unknown))}")

    # -- building SQL --

    def render(self, q: sql.Composable) -> str:
        return q.as_string(self.conn)

    def add(self, phase: str, description: str, mode: str, *statements: sql.Composable,
            **kw: Any) -> None:
        self.steps.append(Step(phase=phase, op=self.i, description=description, mode=mode,
                               statements=tuple(self.render(s) for s in statements), **kw))

    def check(self, phase: str, description: str, query: sql.Composable, **kw: Any) -> None:
        """A validation: ``query`` returns one boolean, true when the phase did its work."""
        self.add(phase, description, "check", query, **kw)

    def job(self, table: TableShape, description: str, spec: dict[str, Any], *,
            undo_log: bool = False) -> None:
        """A backfill job. ``undo_log``: whether it keeps one by default. A fill of a column
        the migration adds keeps none (the old values are all NULL, and rollback drops the
        column); ``undo_log`` in the options (``[backfill]`` or the operation's) decides."""
        options = dict(self.mig.backfill)
        extra = self.get("backfill", {}) or {}
        if not isinstance(extra, dict):
            raise InvalidInput(f"{self.where()}: `backfill` must be a table of job options")
        options.update(extra)
        if "undo_log" in options:
            undo_log = options.pop("undo_log")
            if not isinstance(undo_log, bool):
                raise InvalidInput(f"{self.where()}: undo_log must be true or false, got "
                                   f"{undo_log!r}")
        if not table.primary_key:
            raise InvalidInput(f"{self.where()}: {table.qualified} has no primary key; a "
                               "backfill walks the table by its key")
        spec = {"table": table.qualified, **spec,
                "name": f"migration {self.mig.id} op {self.i + 1}: {description}"}
        if spec.get("kind") in ("update", "transform", "delete"):
            spec["undo_log"] = undo_log
        try:   # the options and the spec's shape, checked now rather than after the DDL
            JobSpec.from_json(spec).with_options(**options)
        except InvalidInput as exc:
            raise InvalidInput(f"{self.where()}: {exc}") from None
        spec["options"] = options
        self.steps.append(Step(phase="start", op=self.i, description=description,
                               mode="backfill", duration="backfill", lock="ROW EXCLUSIVE "
                               f"on {table.qualified} (rows of one batch at a time)",
                               risk="low", table=table.qualified, job=spec))

    def expr(self, t: TableShape, text: str, what: str, *, cast_to: str | None = None,
             boolean: bool = False, extra: Mapping[str, str] | None = None) -> None:
        """Check an expression now, over a row shaped like ``t`` as planned (plus ``extra``
        columns), with EXPLAIN: nothing runs. A typo must not reach a trigger, where it would
        fail every write to the table."""
        cols = {c.name: c.type for c in t.columns.values()}
        cols.update(extra or {})
        row = sql.SQL(", ").join(sql.SQL("NULL::{} AS {}").format(sql.SQL(typ), sql.Identifier(n))
                                 for n, typ in cols.items())
        e: sql.Composable = sqltext.expression_sql(text, slot=f"`{what}`", percent=False)
        if cast_to:
            e = sql.SQL("{}::{}").format(e, sqltext.type_sql(cast_to, slot=f"`{what}`"))
        q = (sql.SQL("EXPLAIN SELECT 1 FROM (SELECT {r}) AS {a} WHERE {e}") if boolean
             else sql.SQL("EXPLAIN SELECT {e} FROM (SELECT {r}) AS {a}")).format(
            e=e, r=row, a=sql.Identifier(t.name))
        try:
            with self.conn.transaction(force_rollback=True):
                sqltext.execute_one(self.conn, q)   # one statement, extended protocol
        except psycopg.Error as exc:
            msg = (exc.diag.message_primary or str(exc)).strip()
            raise InvalidInput(f"{self.where()}: `{what}` ({text}) does not work on "
                               f"{t.qualified}: {msg}") from None

    def claim(self, kind: str, t: TableShape, name: str) -> str:
        """Refuse a name that is taken: rollback drops what it names, so it must be ours."""
        if len(name.encode()) > 63:
            raise InvalidInput(f"{self.where()}: {kind} name {name!r} is longer than 63 bytes")
        self.shape.claim(kind, t, name, self.where())
        return name

    def brief(self, t: TableShape) -> str:
        return f"ACCESS EXCLUSIVE on {t.qualified} (brief, under lock_timeout)"

    def from_new(self) -> sql.Composable:
        """True in a trigger when the session writing is the new application version: its
        search_path names the migration's version schema (pgroll's test). Read per row; cheap."""
        return sql.SQL("({} = ANY (current_schemas(false)))").format(
            sql.Literal(self.shape.version_schema))

    @staticmethod
    def guarded(write: sql.Composable) -> sql.Composable:
        """A sync trigger's own write to the other side, flagged for the length of that write
        so the other side's trigger leaves it alone: sync never loops."""
        return sql.SQL("        PERFORM set_config({g}, 'on', true);\n{w}\n"
                       "        PERFORM set_config({g}, 'off', true);").format(
            g=sql.Literal(SYNC_GUARD), w=write)

    @staticmethod
    def syncing() -> sql.Composable:
        """True inside another sync trigger's write (see :meth:`guarded`)."""
        return sql.SQL("coalesce(current_setting({}, true), '') = 'on'").format(
            sql.Literal(SYNC_GUARD))

    def validate_constraint(self, t: TableShape, name: str, phase: str = "start") -> None:
        self.add(phase, f"validate {name} (scans {t.qualified}; reads and writes go on)", "tx",
                 sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                     t.ident, sql.Identifier(name)),
                 lock=f"SHARE UPDATE EXCLUSIVE on {t.qualified}", duration="scan",
                 table=t.qualified, expected=t.expected)
        self.check(phase, f"{name} is valid", sql.SQL(
            "SELECT coalesce(bool_and(convalidated), false) FROM pg_constraint "
            "WHERE conrelid = {}::regclass AND conname = {}").format(
                sql.Literal(t.regclass), sql.Literal(name)), duration="scan")

    def not_null_statements(self, t: TableShape, column: str, chk: str) -> list[sql.Composable]:
        """``SET NOT NULL`` without a scan under ACCESS EXCLUSIVE: the validated CHECK proves
        it (PostgreSQL 12+), then goes."""
        return [sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                    t.ident, sql.Identifier(column)),
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                    t.ident, sql.Identifier(chk))]

    def check_not_null(self, t: TableShape, column: str) -> None:
        self.check("complete", f"{column} is NOT NULL", sql.SQL(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = {}::regclass AND attname = {}"
        ).format(sql.Literal(t.regclass), sql.Literal(column)))

    def not_null_check(self, t: TableShape, column: str) -> str:
        """``CHECK (col IS NOT NULL) NOT VALID`` in start: new rows are checked at once."""
        chk = self.claim("constraint", t, object_name("nn", t.name, column))
        self.add("start", f"CHECK ({column} IS NOT NULL) NOT VALID: new and updated rows "
                 "must have it", "tx",
                 sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID"
                         ).format(t.ident, sql.Identifier(chk), sql.Identifier(column)),
                 lock=self.brief(t))
        return chk

    def trigger(self, t: TableShape, name: str, timing: str, events: str,
                body: sql.Composable, variables: Iterable[str] = ()) -> None:
        """A PL/pgSQL row trigger. ``variables``: the columns the user's expressions name,
        each declared as a variable holding NEW's value, so expressions read as they would in
        an UPDATE (pgroll's technique); only those, so other columns are not copied per row."""
        self.claim("trigger", t, name)
        self.claim("function", t, name)
        fn = sql.Identifier(t.schema, name)
        declare = sql.SQL("").join(
            sql.SQL("    {v} {t}.{c}%TYPE := NEW.{c};\n").format(
                v=sql.Identifier(c), t=t.ident, c=sql.Identifier(c))
            for c in t.columns if c in set(variables)
            and c.lower() not in _PLPGSQL_RESERVED and not c.lower().startswith("tg_"))
        create = sql.SQL(
            "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS {d}\n"
            "DECLARE\n{decl}BEGIN\n{body}\nEND\n{d}").format(
                fn=fn, d=sql.SQL(_DOLLAR), decl=declare, body=body)
        trg = sql.SQL("CREATE TRIGGER {n} {timing} {events} ON {t} FOR EACH ROW "
                      "EXECUTE FUNCTION {fn}()").format(
            n=sql.Identifier(name), timing=sql.SQL(timing),
            events=sql.SQL(events), t=t.ident, fn=fn)
        self.add("start", f"trigger {name} on {t.qualified} ({timing.lower()} "
                 f"{events.lower()})", "tx", create, trg,
                 lock=f"SHARE ROW EXCLUSIVE on {t.qualified} (brief, under lock_timeout)")
        self.add("rollback", f"drop trigger {name}", "tx",
                 *self.drop_trigger_statements(t, name),
                 lock=f"ACCESS EXCLUSIVE on {t.qualified} (brief, under lock_timeout)")

    def drop_trigger_statements(self, t: TableShape, name: str) -> list[sql.Composable]:
        return [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), t.ident),
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(t.schema, name))]

    def drop_trigger(self, t: TableShape, name: str, phase: str) -> None:
        self.add(phase, f"drop trigger {name}", "tx", *self.drop_trigger_statements(t, name),
                 lock=f"ACCESS EXCLUSIVE on {t.qualified} (brief, under lock_timeout)")

    def create_index_steps(self, t: TableShape, name: str, definition: sql.Composable,
                           *, unique: bool, phase: str = "start") -> None:
        qualified = f"{quote(t.schema)}.{quote(name)}"
        self.add(phase, f"build index {name} CONCURRENTLY (reads and writes go on)",
                 "concurrent",
                 sql.SQL("CREATE {u}INDEX CONCURRENTLY {n} ON {t} {d}").format(
                     u=sql.SQL("UNIQUE " if unique else ""), n=sql.Identifier(name),
                     t=t.ident, d=definition),
                 lock=f"SHARE UPDATE EXCLUSIVE on {t.qualified}", duration="build",
                 table=t.qualified, index=qualified, expected=t.expected,
                 note="a failed build leaves an INVALID index; the executor drops it and "
                      "builds again")
        self.check(phase, f"index {name} is valid", sql.SQL(
            "SELECT coalesce(bool_and(indisvalid AND indisready), false) FROM pg_index "
            "WHERE indexrelid = to_regclass({})").format(sql.Literal(qualified)))
        self.add("rollback", f"drop index {name} CONCURRENTLY", "concurrent",
                 sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                     sql.Identifier(t.schema, name)),
                 lock=f"SHARE UPDATE EXCLUSIVE on {t.qualified}")

    def plan(self) -> OpPlan:
        try:
            goal = self.build()
        except InvalidFragment as exc:
            raise InvalidFragment(f"{self.where()}: {exc}") from None
        self.check_unused()
        irreversible = self.irreversible()
        return OpPlan(self.i, str(self.data["op"]), goal, tuple(self.steps),
                      tuple(self.warnings), irreversible, tuple(self.blockers))

    def build(self) -> str:
        raise NotImplementedError

    def irreversible(self) -> str | None:
        return None

    def column_refs(self, t: TableShape, column: str) -> list[str]:
        """Indexes, constraints and views that use ``column`` (they do not follow a copy)."""
        if not t.exists:
            return []
        rows = self.conn.execute(
            """SELECT 'index ' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
               WHERE i.indrelid = %(t)s::regclass AND a.attname = %(c)s AND NOT i.indisprimary
               UNION ALL
               SELECT 'constraint ' || conname FROM pg_constraint k
               JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
               WHERE k.conrelid = %(t)s::regclass AND a.attname = %(c)s AND k.contype <> 'p'
               UNION ALL
               SELECT 'foreign key ' || conname || ' of ' || conrelid::regclass::text
               FROM pg_constraint k
               JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = ANY (k.confkey)
               WHERE k.confrelid = %(t)s::regclass AND a.attname = %(c)s
               UNION ALL
               SELECT 'view ' || v.oid::regclass::text FROM pg_depend d
               JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
               WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = %(t)s::regclass
                 AND a.attname = %(c)s AND v.oid <> d.refobjid""",
            {"t": t.regclass, "c": column}).fetchall()
        return sorted({str(r[0]) for r in rows})


class CreateTable(_Op):
    def build(self) -> str:
        name = self.text("table")
        cols = self.get("columns", required=True)
        if not isinstance(cols, list) or not cols or not all(isinstance(c, dict) for c in cols):
            raise InvalidInput(f"{self.where()}: `columns` must be a list of "
                               "{{ name, type, not_null, default, primary_key }} tables")
        shapes, defs, pk = [], [], []
        for c in cols:
            unknown = set(c) - {"name", "type", "not_null", "default", "primary_key"}
            if unknown or not isinstance(c.get("name"), str) or not isinstance(c.get("type"), str):
                raise InvalidInput(f"{self.where()}: each column needs `name` and `type` "
                                   f"(and optionally not_null, default, primary_key): {c!r}")
            cname = sqltext.identifier(c["name"], slot="column `name`")
            ctype = sqltext.type_name(c["type"], slot=f"`type` of {cname}")
            cdefault = (None if c.get("default") is None else
                        sqltext.expression(str(c["default"]), slot=f"`default` of {cname}"))
            d = sql.SQL("{} {}").format(sql.Identifier(cname), sqltext.type_sql(ctype))
            if c.get("not_null") or c.get("primary_key"):
                d = sql.SQL("{} NOT NULL").format(d)
            if cdefault is not None:
                d = sql.SQL("{} DEFAULT {}").format(
                    d, sqltext.expression_sql(cdefault, percent=False))
            if c.get("primary_key"):
                pk.append(cname)
            defs.append(d)
            shapes.append(ColumnShape(cname, ctype, bool(c.get("not_null")), cdefault))
        if len({c.name for c in shapes}) != len(shapes):
            raise InvalidInput(f"{self.where()}: a column is named twice")
        if not pk:
            self.warnings.append(f"{name} has no primary key: backfill jobs on it need a key "
                                 "with a unique index (give one column primary_key = true)")
        if pk:
            defs.append(sql.SQL("PRIMARY KEY ({})").format(
                sql.SQL(", ").join(sql.Identifier(p) for p in pk)))
        for c in shapes:
            if c.name in pk and c.type.lower() in ("integer", "int", "int4", "serial", "smallint"):
                self.warnings.append(f"{c.name} is a {c.type} primary key: it runs out at "
                                     "2^31; use bigint (bigserial or identity)")
        t = self.shape.create(name, shapes, tuple(pk))
        for c in shapes:   # the types and defaults, checked before anything is written
            self.expr(t, c.default or "NULL", f"{c.name} {c.type}", cast_to=c.type)
        self.shape.claim("relation", t, t.name, self.where())
        self.add("start", f"create table {t.qualified}", "tx",
                 sql.SQL("CREATE TABLE {} ({})").format(t.ident, sql.SQL(", ").join(defs)),
                 lock="none (a new table)")
        self.add("rollback", f"drop table {t.qualified} (and any rows written to it since)",
                 "tx", sql.SQL("DROP TABLE IF EXISTS {}").format(t.ident),
                 lock=self.brief(t), risk="medium")
        return f"create table {t.qualified}"


class DropTable(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        self.add("complete", f"drop table {t.qualified}", "tx",
                 sql.SQL("DROP TABLE IF EXISTS {}").format(t.ident), lock=self.brief(t),
                 risk="high")
        self.check("complete", f"{t.qualified} is gone", sql.SQL(
            "SELECT to_regclass({}) IS NULL").format(sql.Literal(t.regclass)))
        self.t = t
        self.shape.drop(t)
        return f"drop table {t.qualified} (on complete, once nothing reads it)"

    def irreversible(self) -> str | None:
        return f"table {self.t.qualified} and its rows"


class AddColumn(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        col = self.ident("column")
        typ = self.type_field("type")
        default = self.expression("default")
        value = self.expression("value")
        not_null = self.flag("not_null")
        if col in t.columns:
            raise InvalidInput(f"{self.where()}: column {col!r} already exists in {t.qualified}")
        if not_null and default is None and value is None and t.exists:
            raise InvalidInput(f"{self.where()}: a NOT NULL column on an existing table needs "
                               "a `default` or a `value` to fill the rows already there")
        self.expr(t, default or "NULL", "type" if default is None else "default", cast_to=typ)
        if value is not None:
            self.expr(t, value, "value", cast_to=typ)
        ident, cident = t.ident, sql.Identifier(col)
        volatile = default is not None and self.shape.volatile(default)
        fill = value if value is not None else (default if volatile else None)
        col_def = sql.SQL("{} {}").format(cident, sqltext.type_sql(typ))
        goal = f"add column {t.qualified}.{col} {typ}"
        if default is not None and not volatile:
            col_def = sql.SQL("{} DEFAULT {}").format(
                col_def, sqltext.expression_sql(default, percent=False))
        drop = sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(ident, cident)
        if not_null and fill is None:
            # A non-volatile default: PostgreSQL 11+ stores it once; no rewrite, no backfill.
            self.add("start", f"add {col} NOT NULL with a stored default (no rewrite)", "tx",
                     sql.SQL("ALTER TABLE {} ADD COLUMN {} NOT NULL").format(ident, col_def),
                     lock=self.brief(t))
            self.add("rollback", f"drop column {col}", "tx", drop, lock=self.brief(t))
            t.columns[col] = ColumnShape(col, typ, True, default)
            return goal + " NOT NULL DEFAULT " + str(default)
        self.add("start", f"add {col} as a nullable column (no rewrite)", "tx",
                 sql.SQL("ALTER TABLE {} ADD COLUMN {}").format(ident, col_def),
                 lock=self.brief(t))
        # Registered now so that rollback, which runs in reverse, drops the trigger first.
        self.add("rollback", f"drop column {col}", "tx", drop, lock=self.brief(t))
        t.columns[col] = ColumnShape(col, typ, False, default)
        if volatile:
            self.add("start", f"default {default} for new rows only (no rewrite)", "tx",
                     sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                         ident, cident, sqltext.expression_sql(cast(str, default), percent=False)),
                     lock=self.brief(t))
        trig = None
        if fill is not None and t.exists:
            # Rows the application writes before the backfill reaches them get the value too,
            # so the NOT VALID check below never fails an application's INSERT or UPDATE.
            # The old version does not know the column: when one of its writes changes what
            # the value is computed from, the value follows. The new version writes it itself.
            trig = object_name("fill", t.name, col)
            inputs = [c for c in t.columns if c in column_names(fill) and c != col]
            follow: sql.Composable = sql.SQL("")
            if inputs:
                follow = sql.SQL(
                    "\n    ELSIF TG_OP = 'UPDATE' AND NOT {new_app} AND NEW.{c} IS NOT DISTINCT "
                    "FROM OLD.{c}\n          AND ({changed}) THEN NEW.{c} := ({v});").format(
                    new_app=self.from_new(), c=cident,
                    v=sqltext.expression_sql(fill, percent=False),
                    changed=_changed(inputs))
            self.trigger(t, trig, "BEFORE", "INSERT OR UPDATE", sql.SQL(
                "    IF NEW.{c} IS NULL THEN NEW.{c} := ({v});{follow}\n    END IF;\n"
                "    RETURN NEW;").format(
                    c=cident, v=sqltext.expression_sql(fill, percent=False), follow=follow),
                variables=column_names(fill))
            self.shape.version(t)
            self.job(t, f"fill {col}", {"kind": "update", "set": [[col, fill]],
                                        "where": f"{quote(col)} IS NULL"})
        if not_null and t.exists:
            chk = self.not_null_check(t, col)
            # The trigger stays until NOT NULL holds: while VALIDATE scans, writes go on.
            self.validate_constraint(t, chk, "complete")
            stmts = self.not_null_statements(t, col, chk)
            if trig is not None:
                stmts += self.drop_trigger_statements(t, trig)
            self.add("complete", f"SET NOT NULL on {col} (instant: proven by {chk})"
                     + (", drop the fill trigger" if trig else ""), "tx", *stmts,
                     lock=self.brief(t))
            self.check_not_null(t, col)
        else:
            if trig is not None:
                self.drop_trigger(t, trig, "complete")
            if not_null:
                self.add("start", f"SET NOT NULL on {col} (a new table: nothing to scan)",
                         "tx", sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
                             ident, cident), lock=self.brief(t))
        t.columns[col] = ColumnShape(col, typ, not_null, default)
        return goal + (" NOT NULL" if not_null else "") + (f", filled with {fill}" if fill else "")


class DropColumn(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        col = self.ident("column")
        t.column(col)
        if col in t.primary_key:
            raise InvalidInput(f"{self.where()}: {col} is part of the primary key of "
                               f"{t.qualified}")
        refs = self.column_refs(t, col)
        if refs:
            self.warnings.append(f"dropping {col} also drops: {', '.join(refs)}")
        self.add("complete", f"drop column {col}", "tx",
                 sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
                     t.ident, sql.Identifier(col)), lock=self.brief(t), risk="high")
        self.check("complete", f"{col} is gone", _no_column(t, col))
        del t.columns[col]
        self.t, self.col = t, col
        return f"drop column {t.qualified}.{col} (on complete, once nothing reads it)"

    def irreversible(self) -> str | None:
        return f"column {self.t.qualified}.{self.col} and its values"


class _Copied(_Op):
    """A column replaced by a new one kept in sync by a trigger until ``complete`` swaps them
    (rename, change of type): old and new application versions both keep working."""

    def sync(self, t: TableShape, old: str, new: str, new_type: str, up: str,
             down: str | None) -> None:
        o, n = sql.Identifier(old), sql.Identifier(new)
        src = t.column(old)
        self.expr(t, up, "using", cast_to=new_type)
        if down:
            self.expr(t, down, "down", cast_to=src.type, extra={new: new_type})
        self.add("start", f"add {new} {new_type} beside {old}", "tx",
                 sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                     t.ident, n, sqltext.type_sql(new_type)),
                 lock=self.brief(t))
        self.add("rollback", f"drop column {new}", "tx",
                 sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(t.ident, n),
                 lock=self.brief(t))
        t.columns[new] = ColumnShape(new, new_type, False, None)
        up_sql = sqltext.expression_sql(up, slot="`using`", percent=False)
        down_sql = sqltext.expression_sql(down, slot="`down`", percent=False) if down else None
        # Which application version wrote a row: a session whose search_path names the
        # version schema is the new one (it reads and writes the new shape through its views),
        # so it owns the new column and `down` carries its writes back. Otherwise it is told,
        # as before, by what the write changed (an application not using the version schema):
        # - INSERT: a side left NULL is computed from the other. The old column keeps its
        #   default until complete, so an old column equal to its default beside a new column
        #   that does not match it means the new application wrote only the new column.
        # - UPDATE of the old column only: the old application; the new one is recomputed.
        # - UPDATE of the new column only, to a value not already consistent with the old one
        #   (the backfill's writes are): the new application; the old one follows (`down`).
        # - any other UPDATE of a row the backfill has not reached fills the new column.
        ins_default: sql.Composable = sql.SQL("")
        if down_sql is not None and src.default is not None:
            ins_default = sql.SQL(
                "\n        ELSIF NEW.{o} IS NOT DISTINCT FROM ({d}) "
                "AND NEW.{n} IS DISTINCT FROM ({up}) THEN NEW.{o} := ({down});").format(
                    o=o, n=n, d=sql.SQL(src.default), up=up_sql, down=down_sql)
        # The new version's writes: the view shows only the new column, so every value of
        # the old one follows from it (an INSERT), or only when the write changed it.
        # An INSERT that leaves the new column out (the view has no default for it before
        # complete) takes the old column's default through `using`.
        new_version = sql.SQL(
            "    IF {new_app} THEN\n"
            "        IF TG_OP = 'INSERT' AND NEW.{n} IS NULL THEN\n"
            "            NEW.{n} := ({up});\n"
            "        ELSIF TG_OP = 'INSERT' OR NEW.{n} IS DISTINCT FROM OLD.{n} THEN\n"
            "{down_new}"
            "        ELSIF NEW.{n} IS NULL THEN\n"   # a row the backfill has not reached
            "            NEW.{n} := ({up});\n"
            "        END IF;\n"
            "        RETURN NEW;\n"
            "    END IF;\n").format(
            new_app=self.from_new(), n=n, up=up_sql,
            down_new=(sql.SQL("            NEW.{o} := ({d});\n").format(o=o, d=down_sql)
                      if down_sql else sql.SQL("            NULL;\n")))
        body = sql.SQL(
            "{new_version}"
            "    IF TG_OP = 'INSERT' THEN\n"
            "        IF NEW.{n} IS NULL THEN NEW.{n} := ({up});{ins_down}{ins_default} END IF;\n"
            "    ELSIF NEW.{o} IS DISTINCT FROM OLD.{o} AND NEW.{n} IS NOT DISTINCT FROM OLD.{n} THEN\n"
            "        NEW.{n} := ({up});\n"
            "{upd_down}"
            "    ELSIF NEW.{n} IS NULL THEN\n"
            "        NEW.{n} := ({up});\n"
            "    END IF;\n    RETURN NEW;").format(
            new_version=new_version,
            n=n, o=o, up=up_sql, ins_default=ins_default,
            ins_down=(sql.SQL(" ELSIF NEW.{o} IS NULL THEN NEW.{o} := ({d});").format(
                o=o, d=down_sql) if down_sql else sql.SQL("")),
            upd_down=(sql.SQL(
                "    ELSIF NEW.{n} IS DISTINCT FROM OLD.{n} AND NEW.{o} IS NOT DISTINCT FROM OLD.{o}\n"
                "          AND NEW.{n} IS DISTINCT FROM ({up}) THEN\n"
                "        NEW.{o} := ({d});\n").format(n=n, o=o, up=up_sql, d=down_sql)
                if down_sql else sql.SQL("")))
        self.trg = object_name("sync", t.name, old)
        self.trigger(t, self.trg, "BEFORE", "INSERT OR UPDATE", body,
                     variables=column_names(up) | column_names(down or ""))
        self.chk = self.not_null_check(t, new) if src.not_null else None
        self.job(t, f"copy {old} into {new}", {"kind": "update", "set": [[new, up]]})
        rows = f"~{t.rows:,} rows" if t.rows is not None else "every row"
        self.warnings.append(
            f"the copy rewrites every row of {t.qualified} ({rows}, "
            f"{(t.bytes or 0) / 2**20:,.1f} MB now): a new version of each row, as much WAL "
            "(replicas, backups), and dead versions vacuum must clear; the table does not "
            "shrink by itself")
        if not down:
            self.warnings.append(f"no `down`: rows written through {new} alone do not update "
                                 f"{old}; until complete, write {old} (or give `down`)")
        refs = self.column_refs(t, old)
        if refs:
            self.warnings.append(f"{old} is used by {', '.join(refs)}: these do not follow to "
                                 f"{new}; recreate them on {new} (e.g. a create_index "
                                 "operation in this migration) before complete drops "
                                 f"{old}; complete fails while a view depends on {old}")

    def moves_to_end(self, t: TableShape, col: str) -> str:
        return (f"after complete, {col} is the last column of {t.qualified} (the copy is a new "
                "column): SELECT * and COPY or INSERT without a column list see the columns "
                "in a new order")

    def swap(self, t: TableShape, old: str, new: str, *, rename_to: str | None,
             default: str | None = None) -> None:
        """Contract in one brief transaction, the trigger kept until then (writes go on while
        VALIDATE scans): SET NOT NULL, drop the trigger, drop the old column, rename."""
        if self.chk:
            self.validate_constraint(t, self.chk, "complete")
        stmts = self.not_null_statements(t, new, self.chk) if self.chk else []
        stmts += self.drop_trigger_statements(t, self.trg)
        if default is not None:
            stmts.append(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                t.ident, sql.Identifier(new), sql.SQL(default)))
        stmts.append(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
            t.ident, sql.Identifier(old)))
        if rename_to:
            stmts.append(sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                t.ident, sql.Identifier(new), sql.Identifier(rename_to)))
        self.add("complete", (f"{'SET NOT NULL on ' + new + ', ' if self.chk else ''}"
                              f"drop trigger {self.trg}, drop {old}"
                              + (f", rename {new} to {rename_to}" if rename_to else "")
                              + " (one transaction)"), "tx", *stmts, lock=self.brief(t),
                 risk="high")
        final = rename_to or new
        typed: sql.Composable = sql.SQL("")
        if rename_to:
            typed = sql.SQL(" AND atttypid = {}::regtype").format(
                sql.Literal(t.columns[new].type))
        self.check("complete", f"{old} is gone and {final} is in place" if not rename_to
                   else f"{final} has type {t.columns[new].type}", sql.SQL(
            "SELECT ({gone}) AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {t}::regclass"
            " AND attname = {f} AND NOT attisdropped{nn}{typed})").format(
                gone=_no_column(t, old) if old != final else sql.SQL("true"),
                t=sql.Literal(t.regclass), f=sql.Literal(final), typed=typed,
                nn=sql.SQL(" AND attnotnull") if self.chk else sql.SQL("")))
        self.t, self.old = t, old


class RenameColumn(_Copied):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        old, new = self.ident("column"), self.ident("to")
        src = t.column(old)
        if new in t.columns:
            raise InvalidInput(f"{self.where()}: column {new!r} already exists in {t.qualified}")
        if old in t.primary_key:
            raise InvalidInput(f"{self.where()}: {old} is part of the primary key; "
                               "renaming a key column is not supported")
        view_schema = self.opt("view_schema")
        if view_schema is not None:
            view_schema = sqltext.identifier(view_schema, slot="`view_schema`")
            return self.by_view(t, old, new, view_schema)
        self.sync(t, old, new, src.type, quote(old), quote(new))
        self.warnings.append(self.moves_to_end(t, new))
        # The default moves with the swap: on the new column before then, it would hide
        # which side an INSERT wrote.
        self.swap(t, old, new, rename_to=None, default=src.default)
        t.columns.pop(old)
        t.columns[new] = ColumnShape(new, src.type, src.not_null, src.default)
        self.shape.version(t)
        return f"rename {t.qualified}.{old} to {new}"

    def by_view(self, t: TableShape, old: str, new: str, view_schema: str) -> str:
        """pgroll's way, where it fits: an instant rename, and in the same transaction a view
        in ``view_schema`` that shows the table under the old column name. The old application
        reads and writes through it (a simple view is updatable) with ``search_path =
        view_schema, public``, set before start: until the view exists, that path falls
        through to the table itself."""
        self.view = True
        self.shape.claim("relation", t, t.name, self.where(), schema=view_schema)
        view = sql.Identifier(view_schema, t.name)
        cols = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.Identifier(new), sql.Identifier(old)) if c == old
            else sql.Identifier(c) for c in t.columns)
        self.add("start", f"rename {old} to {new}, and view {view_schema}.{t.name} showing it "
                 f"as {old} (one transaction)", "tx",
                 sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                     t.ident, sql.Identifier(old), sql.Identifier(new)),
                 sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(view_schema)),
                 sql.SQL("CREATE VIEW {} AS SELECT {} FROM {}").format(view, cols, t.ident),
                 lock=self.brief(t))
        self.check("start", f"view {view_schema}.{t.name} exists", sql.SQL(
            "SELECT to_regclass({}) IS NOT NULL").format(
                sql.Literal(f"{quote(view_schema)}.{quote(t.name)}")))
        rename_back = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            t.ident, sql.Identifier(new), sql.Identifier(old)).as_string(self.conn)
        self.add("rollback", f"drop view {view_schema}.{t.name}, rename {new} back to {old}",
                 "tx", sql.SQL("DROP VIEW IF EXISTS {}").format(view),
                 sql.SQL("DO {d} BEGIN IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                         "{t}::regclass AND attname = {n} AND NOT attisdropped) THEN {r}; "
                         "END IF; END {d}").format(
                     d=sql.SQL(_DOLLAR), t=sql.Literal(t.regclass), n=sql.Literal(new),
                     r=sql.SQL(rename_back)), lock=self.brief(t))
        self.add("complete", f"drop view {view_schema}.{t.name} (the old application is gone)",
                 "tx", sql.SQL("DROP VIEW IF EXISTS {}").format(view),
                 lock=f"ACCESS EXCLUSIVE on the view {view_schema}.{t.name}")
        src = t.columns.pop(old)
        t.columns[new] = ColumnShape(new, src.type, src.not_null, src.default)
        self.warnings.append(f"before start, point the old application at the view: "
                             f"search_path = {view_schema}, {t.schema}")
        return f"rename {t.qualified}.{old} to {new}, old name kept in view {view_schema}.{t.name}"

    def irreversible(self) -> str | None:
        if getattr(self, "view", False):
            return None
        return f"column {self.t.qualified}.{self.old} (its values live on in the new column)"


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


class AddForeignKey(_Op):
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


class AddCheck(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        name = self.claim("constraint", t, self.ident("name"))
        expr = self.text("check")
        expr = sqltext.expression(expr, slot="`check`")
        self.expr(t, expr, "check", boolean=True)
        self.add("start", f"add {name} NOT VALID (new rows are checked; no scan)", "tx",
                 sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}) NOT VALID").format(
                     t.ident, sql.Identifier(name), sqltext.expression_sql(expr, percent=False)),
                 lock=self.brief(t))
        self.validate_constraint(t, name)
        self.add("rollback", f"drop {name}", "tx",
                 sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                     t.ident, sql.Identifier(name)), lock=self.brief(t))
        return f"check {name} on {t.qualified}: {expr}"


class CreateIndex(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        cols = self.names("columns", required=False)
        expr = self.expression("expression")
        if bool(cols) == bool(expr):
            raise InvalidInput(f"{self.where()}: give `columns` or `expression` (one of them)")
        for c in cols:
            t.column(c)
        method = self.opt("method", "btree").lower()
        if not re.match(r"^[a-z_]+$", method):
            raise InvalidInput(f"{self.where()}: malformed index method {method!r}")
        where = self.expression("where")
        unique = self.flag("unique")
        name = self.ident("name", object_name("idx", t.name, *(cols or ("expr",))))
        self.shape.claim("relation", t, name, self.where())
        if expr:
            self.expr(t, expr, "expression")
        if where:
            self.expr(t, where, "where", boolean=True)
        body = (sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, cols))) if cols
                else sql.SQL("({})").format(
                    sqltext.expression_sql(cast(str, expr), percent=False)))
        definition = sql.SQL("USING {} {}{}").format(
            sql.SQL(method), body,
            sql.SQL(" WHERE {}").format(sqltext.expression_sql(where, percent=False))
            if where else sql.SQL(""))
        self.create_index_steps(t, name, definition, unique=unique)
        return (f"{'unique ' if unique else ''}index {name} on {t.qualified} "
                f"({', '.join(cols) or expr})")


class DropIndex(_Op):
    def build(self) -> str:
        name = self.text("name")
        schema, idx = split_name(name)
        row = self.conn.execute(
            """SELECT n.nspname, t.relname, tn.nspname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
               JOIN pg_namespace tn ON tn.oid = t.relnamespace
               WHERE c.relname = %s AND c.relkind = 'i'
                 AND (n.nspname = %s OR (%s::text IS NULL AND n.nspname = ANY (current_schemas(false))))
               LIMIT 1""", (idx, schema, schema)).fetchone()
        if row is None:
            raise InvalidInput(f"{self.where()}: index {name!r} does not exist")
        used = self.conn.execute(
            "SELECT conname FROM pg_constraint WHERE conindid = %s::regclass AND contype IN "
            "('p', 'u', 'x')", (f"{quote(str(row[0]))}.{quote(idx)}",)).fetchone()
        if used:
            raise InvalidInput(f"{self.where()}: index {name} backs constraint {used[0]}; "
                               "drop the constraint instead")
        self.q = f"{row[0]}.{idx}"
        regclass = f"{quote(str(row[0]))}.{quote(idx)}"
        self.add("complete", f"drop index {idx} CONCURRENTLY", "concurrent",
                 sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                     sql.Identifier(str(row[0]), idx)),
                 lock=f"SHARE UPDATE EXCLUSIVE on {row[2]}.{row[1]}", risk="medium")
        self.check("complete", f"index {idx} is gone", sql.SQL(
            "SELECT to_regclass({}) IS NULL").format(sql.Literal(regclass)))
        return f"drop index {self.q} (on complete)"

    def irreversible(self) -> str | None:
        return f"index {self.q} (a create_index can build it again)"


class AddUnique(_Op):
    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        cols = self.names("columns")
        for c in cols:
            t.column(c)
        name = self.claim("constraint", t, self.ident("name", object_name("uq", t.name, *cols)))
        self.shape.claim("relation", t, name, self.where())
        self.create_index_steps(t, name, sql.SQL("({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols))), unique=True)
        self.add("start", f"attach {name} as a UNIQUE constraint (no scan: the index proves it)",
                 "tx", sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                     t.ident, sql.Identifier(name), sql.Identifier(name)), lock=self.brief(t))
        # Rollback runs in reverse: the constraint goes first, then its index.
        self.add("rollback", f"drop constraint {name}", "tx",
                 sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                     t.ident, sql.Identifier(name)), lock=self.brief(t))
        return f"unique ({', '.join(cols)}) on {t.qualified}"


class SplitTable(_Op):
    """Move columns to a new table sharing the key: a trigger mirrors every write, a copy job
    fills the rest, the application switches to the new table, complete drops the old columns."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        into = self.text("into")
        cols = self.names("columns")
        key = t.primary_key
        if not key:
            raise InvalidInput(f"{self.where()}: {t.qualified} has no primary key to share")
        for c in cols:
            if c in key:
                raise InvalidInput(f"{self.where()}: {c} is part of the key; it is copied "
                                   "to the new table anyway")
            t.column(c)
        keep = self.flag("keep_columns")
        defs = [sql.SQL("{} {} NOT NULL").format(sql.Identifier(k), sql.SQL(t.column(k).type))
                for k in key]
        defs += [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t.column(c).type))
                 for c in cols]
        new = self.shape.create(into, [t.column(k) for k in key] + [t.column(c) for c in cols],
                                key)
        # Filled by the copy: the source's rows, and its size in proportion to the columns.
        new.rows = t.rows
        new.bytes = (t.bytes or 0) * (len(key) + len(cols)) // max(1, len(t.columns))
        ids = sql.SQL(", ").join
        defs.append(sql.SQL("PRIMARY KEY ({})").format(ids(map(sql.Identifier, key))))
        self.add("start", f"create table {new.qualified}", "tx",
                 sql.SQL("CREATE TABLE {} ({})").format(new.ident, ids(defs)),
                 lock="none (a new table)")
        self.add("rollback", f"drop table {new.qualified}", "tx",
                 sql.SQL("DROP TABLE IF EXISTS {}").format(new.ident), lock=self.brief(new))
        every = (*key, *cols)
        # Both versions write between start and complete, each its own shape: the old one
        # the moved columns on the source, the new one the new table (and the source's other
        # columns, through the version schema's view that lacks the moved ones). Each write
        # is carried to the other side for the columns it changed only (the last write of
        # each column wins), guarded so the other side's trigger does not send it back.
        def key_is(rec: str, alias: str | None = None) -> sql.Composable:
            return sql.SQL(" AND ").join(
                sql.SQL("{a}{k} = {r}.{k}").format(
                    a=sql.SQL(f"{alias}.") if alias else sql.SQL(""), k=sql.Identifier(k),
                    r=sql.SQL(rec)) for k in key)

        key_changed = _changed(key)
        upsert = sql.SQL(
            "        INSERT INTO {new} AS bf_t ({cols}) VALUES ({vals})\n"
            "            ON CONFLICT ({key}) DO UPDATE SET {set};").format(
                new=new.ident, cols=ids(map(sql.Identifier, every)),
                vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every),
                key=ids(map(sql.Identifier, key)),
                set=ids(sql.SQL("{c} = CASE WHEN {t} THEN EXCLUDED.{c} ELSE bf_t.{c} END").format(
                    c=sql.Identifier(c), t=_touched(c)) for c in cols))
        # The old version's inserts and updates (AFTER: with a foreign key from the new table
        # the source row must exist). An INSERT by the new version is left alone: it inserts
        # the new table's row itself, which must not collide with one made here.
        body = sql.SQL(
            "    IF {syncing} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'INSERT' THEN\n"
            "        IF {new_app} THEN RETURN NULL; END IF;\n"
            "    ELSIF {key_changed} THEN\n"
            "{move}\n"
            "        RETURN NULL;\n"
            "    ELSIF NOT ({any}) THEN\n"
            "        RETURN NULL;\n"
            "    END IF;\n"
            "{upsert}\n"
            "    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(), key_changed=key_changed,
                any=_changed(cols),
                move=self.guarded(sql.SQL(
                    "        DELETE FROM {new} WHERE {m};\n"
                    "        INSERT INTO {new} ({cols}) VALUES ({vals});").format(
                    new=new.ident, m=key_is("OLD"), cols=ids(map(sql.Identifier, every)),
                    vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every))),
                upsert=self.guarded(upsert))
        self.trg = object_name("split", t.name, new.name)
        self.trigger(t, self.trg, "AFTER", "INSERT OR UPDATE", body)
        # Deletes, by either version (BEFORE: a foreign key from the new table would refuse
        # the source row's delete before an AFTER trigger ran).
        self.trg_del = object_name("splitdel", t.name, new.name)
        self.trigger(t, self.trg_del, "BEFORE", "DELETE", sql.SQL(
            "    IF NOT {syncing} THEN\n{delete}\n    END IF;\n    RETURN OLD;").format(
                syncing=self.syncing(), delete=self.guarded(sql.SQL(
                    "        DELETE FROM {new} WHERE {m};").format(
                        new=new.ident, m=key_is("OLD")))))
        # The new version's writes to the new table flow back to the source's columns.
        # (The copy job and the trigger above run in old-version sessions, or guarded.)
        self.trg_back = object_name("unsplit", new.name, t.name)
        self.trigger(new, self.trg_back, "AFTER", "INSERT OR UPDATE OR DELETE", sql.SQL(
            "    IF {syncing} OR NOT {new_app} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'DELETE' THEN\n{clear}\n        RETURN NULL;\n    END IF;\n"
            "{back}\n"
            "    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                clear=self.guarded(sql.SQL("        UPDATE {t} SET {nulls} WHERE {m};").format(
                    t=t.ident, m=key_is("OLD"),
                    nulls=ids(sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in cols))),
                back=self.guarded(sql.SQL(
                    "        UPDATE {t} AS bf_s SET {set} WHERE {m};").format(
                    t=t.ident, m=key_is("NEW", "bf_s"),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN NEW.{c} ELSE bf_s.{c} END").format(
                        c=sql.Identifier(c), t=_touched(c)) for c in cols)))))
        self.shape.version(t)
        # on_conflict=update copies lock the source rows they read (FOR SHARE), so a batch
        # never overwrites a newer value the trigger mirrored with the one it read earlier.
        self.job(t, f"copy {', '.join(cols)} into {new.qualified}",
                 {"kind": "copy", "dest": new.qualified, "columns": list(every),
                  "on_conflict": "update"})
        self.dropped = not keep
        stmts = [*self.drop_trigger_statements(t, self.trg),
                 *self.drop_trigger_statements(t, self.trg_del),
                 *self.drop_trigger_statements(new, self.trg_back)]
        if not keep:
            stmts.append(sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(c)) for c in cols)))
            for c in cols:
                del t.columns[c]
        self.add("complete", f"drop triggers {self.trg}, {self.trg_del}, {self.trg_back}"
                 + (f", drop {', '.join(cols)} from {t.qualified}" if not keep else "")
                 + " (one transaction)", "tx", *stmts, lock=self.brief(t),
                 risk="high" if not keep else "low")
        self.t, self.cols = t, cols
        return f"split {', '.join(cols)} of {t.qualified} into {new.qualified}"

    def irreversible(self) -> str | None:
        return (f"columns {', '.join(self.cols)} of {self.t.qualified} (kept in the new table)"
                if self.dropped else None)


class MergeTables(_Op):
    """Bring a table's columns into another that shares its key: new nullable columns, a
    trigger mirroring writes to the source, a backfill, then complete drops the source."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        src = self.shape.table(self.text("from"))
        cols = self.names("columns", required=False) or tuple(
            c for c in src.columns if c not in src.primary_key)
        key = src.primary_key
        if not key or t.primary_key != key:
            raise InvalidInput(f"{self.where()}: {t.qualified} and {src.qualified} must have "
                               f"the same primary key columns (they have "
                               f"({', '.join(t.primary_key)}) and ({', '.join(key)}))")
        for c in cols:
            src.column(c)
            if c in t.columns:
                raise InvalidInput(f"{self.where()}: {t.qualified} already has a column {c!r}")
        ids = sql.SQL(", ").join
        self.add("start", f"add {', '.join(cols)} to {t.qualified} (nullable, no rewrite)",
                 "tx", sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                     sql.SQL("ADD COLUMN {} {}").format(sql.Identifier(c),
                                                        sql.SQL(src.column(c).type))
                     for c in cols)), lock=self.brief(t))
        self.add("rollback", f"drop {', '.join(cols)} from {t.qualified}", "tx",
                 sql.SQL("ALTER TABLE {} {}").format(t.ident, ids(
                     sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(c))
                     for c in cols)), lock=self.brief(t))
        for c in cols:
            t.columns[c] = ColumnShape(c, src.column(c).type, False, None)

        def match(rec: str) -> sql.Composable:
            return sql.SQL(" AND ").join([sql.SQL("{} = {}.{}").format(
                sql.Identifier(k), sql.SQL(rec), sql.Identifier(k)) for k in key])

        # The old version writes the source table, the new one the merged columns of the
        # target (through the version schema's view). Each write is carried to the other side
        # for the columns it changed only (the last write of each column wins), guarded so the
        # other side's trigger does not send it back.
        body = sql.SQL(
            "    IF {syncing} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'DELETE' THEN\n{clear}\n        RETURN NULL;\n    END IF;\n"
            "{set}\n    RETURN NULL;").format(
                syncing=self.syncing(),
                clear=self.guarded(sql.SQL("        UPDATE {t} SET {nulls} WHERE {old};").format(
                    t=t.ident, old=match("OLD"),
                    nulls=ids(sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in cols))),
                set=self.guarded(sql.SQL("        UPDATE {t} AS bf_t SET {set} WHERE {new};").format(
                    t=t.ident, new=sql.SQL(" AND ").join([sql.SQL("bf_t.{k} = NEW.{k}").format(
                        k=sql.Identifier(k)) for k in key]),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN NEW.{c} ELSE bf_t.{c} END").format(
                        c=sql.Identifier(c), t=_touched(c)) for c in cols))))
        self.trg = object_name("merge", src.name, t.name)
        self.trigger(src, self.trg, "AFTER", "INSERT OR UPDATE OR DELETE", body)
        every = (*key, *cols)
        self.back = object_name("unmerge", t.name, src.name)
        self.trigger(t, self.back, "AFTER", "INSERT OR UPDATE", sql.SQL(
            "    IF {syncing} OR NOT {new_app} THEN RETURN NULL; END IF;\n"
            "    IF TG_OP = 'UPDATE' AND NOT ({any}) THEN RETURN NULL; END IF;\n"
            "{upsert}\n    RETURN NULL;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                any=_changed(cols),
                upsert=self.guarded(sql.SQL(
                    "        INSERT INTO {src} AS bf_s ({cols}) VALUES ({vals})\n"
                    "            ON CONFLICT ({key}) DO UPDATE SET {set};").format(
                    src=src.ident, cols=ids(map(sql.Identifier, every)),
                    vals=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in every),
                    key=ids(map(sql.Identifier, key)),
                    set=ids(sql.SQL("{c} = CASE WHEN {t} THEN EXCLUDED.{c} ELSE bf_s.{c} END")
                            .format(c=sql.Identifier(c), t=_touched(c)) for c in cols)))))
        # The new version deletes the merged row; the source row goes first (BEFORE: a foreign
        # key from the source would refuse the target's delete).
        self.back_del = object_name("unmergedel", t.name, src.name)
        self.trigger(t, self.back_del, "BEFORE", "DELETE", sql.SQL(
            "    IF NOT {syncing} AND {new_app} THEN\n{delete}\n    END IF;\n"
            "    RETURN OLD;").format(
                syncing=self.syncing(), new_app=self.from_new(),
                delete=self.guarded(sql.SQL("        DELETE FROM {src} WHERE {m};").format(
                    src=src.ident, m=sql.SQL(" AND ").join(
                        [sql.SQL("{k} = OLD.{k}").format(k=sql.Identifier(k)) for k in key])))))
        self.shape.version(t)
        # A target row inserted after its source row takes the source's values.
        self.pull = object_name("pull", t.name, src.name)
        self.trigger(t, self.pull, "BEFORE", "INSERT", sql.SQL(
            "    IF {none} THEN\n"
            "        SELECT {scols} INTO {ncols} FROM {src} AS s WHERE {match};\n"
            "    END IF;\n    RETURN NEW;").format(
                none=sql.SQL(" AND ").join([sql.SQL("NEW.{} IS NULL").format(sql.Identifier(c))
                                            for c in cols]),
                scols=ids(sql.SQL("s.{}").format(sql.Identifier(c)) for c in cols),
                ncols=ids(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in cols),
                src=src.ident, match=sql.SQL(" AND ").join([sql.SQL("s.{k} = NEW.{k}").format(
                    k=sql.Identifier(k)) for k in key])))
        src_q = src.ident.as_string(self.conn)
        tgt_q = t.ident.as_string(self.conn)
        where = " AND ".join(f"s.{quote(k)} = {tgt_q}.{quote(k)}" for k in key)
        self.job(t, f"fill {', '.join(cols)} from {src.qualified}", {
            "kind": "update",
            # Identifiers quoted above; the engine runs these as the job's SET expressions.
            # FOR SHARE: the newest committed source value, not the batch snapshot's.
            "set": [[c, f"(SELECT s.{quote(c)} FROM {src_q} AS s WHERE {where} "  # noqa: S608
                        "FOR SHARE)"] for c in cols]})
        on = sql.SQL(" AND ").join([sql.SQL("t.{k} = s.{k}").format(k=sql.Identifier(k))
                                    for k in key])
        row = ids(sql.SQL("{a}.{c}").format(a=sql.Identifier(a), c=sql.Identifier(c))
                  for a in ("s",) for c in cols)
        trow = ids(sql.SQL("t.{c}").format(c=sql.Identifier(c)) for c in cols)
        self.check("start", f"every row of {src.qualified} is in {t.qualified}, with the "
                   "same values", sql.SQL(
                       "SELECT NOT EXISTS (SELECT 1 FROM {s} AS s LEFT JOIN {t} AS t ON {on} "
                       "WHERE t.{k} IS NULL OR ROW({row}) IS DISTINCT FROM ROW({trow}))").format(
                           s=src.ident, t=t.ident, on=on, k=sql.Identifier(key[0]), row=row,
                           trow=trow), duration="scan", table=src.qualified)
        self.add("complete", f"drop triggers {self.trg}, {self.pull}, {self.back} and "
                 f"{self.back_del}, drop table "
                 f"{src.qualified} (one transaction)", "tx",
                 *self.drop_trigger_statements(src, self.trg),
                 *self.drop_trigger_statements(t, self.pull),
                 *self.drop_trigger_statements(t, self.back),
                 *self.drop_trigger_statements(t, self.back_del),
                 sql.SQL("DROP TABLE IF EXISTS {}").format(src.ident), lock=self.brief(src),
                 risk="high")
        self.shape.drop(src)
        self.src = src
        return f"merge {', '.join(cols)} of {src.qualified} into {t.qualified}"

    def irreversible(self) -> str | None:
        return f"table {self.src.qualified} (its columns live on in the merged table)"


class Backfill(_Op):
    """A data change of its own (transform a format, fill a column): an update job."""

    def build(self) -> str:
        t = self.shape.table(self.text("table"))
        raw = self.get("set", required=True)
        if not isinstance(raw, dict) or not raw or not all(
                isinstance(v, str) and v.strip() for v in raw.values()):
            raise InvalidInput(f"{self.where()}: `set` must be a table of column = "
                               "\"expression\"")
        raw = {sqltext.identifier(c, slot="`set` column"): sqltext.expression(v, slot=f"set.{c}")
               for c, v in raw.items()}
        for c, v in raw.items():
            self.expr(t, v, f"set.{c}", cast_to=t.column(c).type)
        where = self.expression("where")
        if where:
            self.expr(t, where, "where", boolean=True)
        spec: dict[str, Any] = {"kind": "update", "set": [[c, v] for c, v in raw.items()]}
        if where:
            spec["where"] = where
        self.job(t, f"set {', '.join(raw)}", spec, undo_log=True)
        self.warnings.append("a backfill writes rows in place: rollback does not restore "
                             "the old values; its undo log (kept after complete and "
                             "rollback, unless undo_log = false) lets `backfill revert JOB` "
                             "restore them")
        return f"backfill {t.qualified}: set {', '.join(raw)}" + (f" where {where}" if where
                                                                   else "")


class RawSql(_Op):
    """An escape hatch: statements for each phase, linted; flagged rules must be allowed."""

    def build(self) -> str:
        from backfill.migrate.lint import lint_sql

        # The executor sets lock_timeout itself; the linter cannot see that.
        allow = set(self.names("allow", required=False, idents=False)) | {"missing-lock-timeout"}
        concurrent = self.flag("concurrent")
        described = self.opt("description", "custom SQL")
        for phase, key in (("start", "up"), ("complete", "complete"), ("rollback", "down")):
            text = self.text(key) if key == "up" else self.opt(key)
            if text is None:
                continue
            # One statement per string, sent one at a time; no transaction control.
            split = sqltext.statements(text, slot=f"`{key}`")
            findings = [f for f in lint_sql(text, f"{self.where()} `{key}`")
                        if f.rule not in allow]
            if findings:
                raise InvalidInput(
                    f"{self.where()}: `{key}` is flagged by the linter:\n  "
                    + "\n  ".join(f.render() for f in findings)
                    + "\nrewrite it, or list the rules in `allow` if you accept the risk")
            statements = tuple(sql.SQL(st) for st in split)
            self.add(phase, f"{described} ({key})", "concurrent" if concurrent else "tx",
                     *statements, lock="as written", risk="medium")
        return described


OPERATIONS: dict[str, type[_Op]] = {
    "create_table": CreateTable, "drop_table": DropTable,
    "add_column": AddColumn, "drop_column": DropColumn,
    "rename_column": RenameColumn, "change_type": ChangeType,
    "add_foreign_key": AddForeignKey, "add_check": AddCheck, "add_unique": AddUnique,
    "create_index": CreateIndex, "drop_index": DropIndex,
    "split_table": SplitTable, "merge_tables": MergeTables,
    "backfill": Backfill, "sql": RawSql,
}


def build_plan(conn: Conn, mig: MigrationFile) -> tuple[OpPlan, ...]:
    """Every operation's steps, checked against ``conn``'s catalog; writes nothing. When an
    operation keeps two shapes of a table in sync, a last plan adds the version schema."""
    shape = Shape(conn)
    shape.version_schema = version_schema(mig.id)
    plans = []
    for i, data in enumerate(mig.operations):
        plans.append(OPERATIONS[data["op"]](i, data, shape, conn, mig).plan())
    if shape.to_version():
        plans.append(_version_plan(conn, shape, mig, len(plans)))
    return tuple(plans)


def version_schema(migration_id: str) -> str:
    """The schema holding the new version's views: ``bf_v_`` and the id, lower case, runs of
    other characters as one ``_`` (a hash when that loses anything or passes 63 bytes)."""
    clean = re.sub(r"[^a-z0-9]+", "_", migration_id.lower()).strip("_")
    name = "bf_v_" + clean
    if len(name) > 63:
        digest = hashlib.sha1(migration_id.encode()).hexdigest()[:8]
        name = name[:54] + "_" + digest
    return name


def _grants(conn: Conn, t: TableShape) -> dict[str | None, list[str]]:
    """The table's privileges a view can carry, per role other than its owner (None: PUBLIC)."""
    if not t.exists:
        return {}
    rows = conn.execute(
        """SELECT r.rolname, a.privilege_type
           FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
           LEFT JOIN pg_roles r ON r.oid = a.grantee
           WHERE c.oid = %s::regclass AND a.grantee <> c.relowner
             AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE')
           ORDER BY 1, 2""", (t.regclass,)).fetchall()
    out: dict[str | None, list[str]] = {}
    for role, privilege in rows:
        out.setdefault(None if role is None else str(role), []).append(str(privilege))
    return out


def _version_plan(conn: Conn, shape: Shape, mig: MigrationFile, index: int) -> OpPlan:
    """pgroll's versioned schema: one simple (so updatable) view per table the migration
    changes, showing it as it will be after complete: the new columns under their final
    names, the moved or replaced ones left out, in the column order complete leaves. The new
    application sets ``search_path = <schema>, public``; the sync triggers tell its writes by
    that path. Complete drops the views last, in one transaction: by then the tables have
    exactly the views' shape, so the new application's queries (prepared ones too) fall
    through to the tables unchanged."""
    op = _Op(index, {"op": "version_schema"}, shape, conn, mig)
    schema = shape.version_schema
    where = "the version schema"
    shape.claim("schema", shape.to_version()[0], schema, where)
    names: dict[str, TableShape] = {}
    for t in shape.to_version():
        if t.name in names:
            raise InvalidInput(f"{where}: {names[t.name].qualified} and {t.qualified} would "
                               f"both be {schema}.{t.name}; change them in two migrations")
        names[t.name] = t
    ident = sql.Identifier(schema)
    creates: list[sql.Composable] = [sql.SQL("CREATE SCHEMA {}").format(ident)]
    users: set[str | None] = set()
    drops: list[sql.Composable] = []
    for t in names.values():
        view = sql.Identifier(schema, t.name)
        cols = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.Identifier(c.physical), sql.Identifier(c.name))
            if c.physical else sql.Identifier(c.name) for c in t.columns.values())
        creates.append(sql.SQL("CREATE VIEW {} AS SELECT {} FROM {}").format(view, cols, t.ident))
        drops.append(sql.SQL("DROP VIEW IF EXISTS {}").format(view))
        for grantee, privileges in _grants(conn, t).items():
            # Whoever may read or write the table may do the same through its view (the view
            # reaches the table with its owner's rights, like any view).
            who = sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)
            users.add(grantee)
            creates.append(sql.SQL("GRANT {} ON {} TO {}").format(
                sql.SQL(", ").join(sql.SQL(p) for p in privileges), view, who))
    creates += [sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
        ident, sql.SQL("PUBLIC") if g is None else sql.Identifier(g))
        for g in sorted(users, key=lambda g: (g is not None, g or ""))]
    drops.append(sql.SQL("DROP SCHEMA IF EXISTS {}").format(ident))
    tables = ", ".join(t.qualified for t in names.values())
    op.add("start", f"version schema {schema}: the new shape of {tables} as views (the new "
           f"application: search_path = {schema}, public)", "tx", *creates,
           lock="none (new views)")
    op.check("start", f"version schema {schema} has its views", sql.SQL(
        "SELECT count(*) = {} FROM pg_views WHERE schemaname = {}").format(
            sql.Literal(len(names)), sql.Literal(schema)))
    op.add("complete", f"drop version schema {schema} (the tables now have its shape; the "
           "new application's queries fall through to them)", "tx", *drops,
           lock=f"ACCESS EXCLUSIVE on the views in {schema} (brief, under lock_timeout)")
    op.check("complete", f"version schema {schema} is gone", sql.SQL(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {})").format(
            sql.Literal(schema)))
    op.add("rollback", f"drop version schema {schema}", "tx", *drops,
           lock=f"ACCESS EXCLUSIVE on the views in {schema} (brief, under lock_timeout)")
    return OpPlan(index, "version_schema",
                  f"version schema {schema} for the new application version ({tables})",
                  tuple(op.steps),
                  (f"between start and complete, run the new application with search_path = "
                   f"{schema}, public (the old one keeps its own); complete only once no "
                   "old-version session is left",))


def ordered_steps(plans: Iterable[OpPlan]) -> dict[str, list[Step]]:
    """Steps per phase in execution order: start runs each operation's DDL, then the
    backfills, then the VALIDATEs, then the checks; complete in file order; rollback in
    reverse."""
    steps: dict[str, list[Step]] = {p: [] for p in PHASES}
    plans = list(plans)
    # VALIDATE comes after the backfills: a constraint may be about a column they fill.
    def rank(s: Step) -> int:
        if s.mode == "check":
            return 3
        if s.mode == "backfill":
            return 1
        return 2 if s.duration == "scan" else 0

    start = [s for p in plans for s in p.steps if s.phase == "start"]
    steps["start"] = sorted(start, key=rank)   # stable: file order kept within a rank
    steps["complete"] = [s for p in plans for s in p.steps if s.phase == "complete"]
    steps["rollback"] = [s for p in reversed(plans) for s in reversed(p.steps)
                         if s.phase == "rollback"]
    return steps


# -- helpers ------------------------------------------------------------------------------------

#: Conversions that keep every value (the round trip reads back equal), by base type.
_WIDER = {"int2": {"int4", "int8", "numeric", "float8"}, "int4": {"int8", "numeric"},
          "int8": {"numeric"}, "float4": {"float8"}, "varchar": {"text"}}


def _type_parts(text: str) -> tuple[str, tuple[int, ...], bool] | None:
    """``character varying(50)`` -> ``("varchar", (50,), False)``: base, modifiers, array."""
    try:
        stmt: Any = parse_sql(f"SELECT NULL::{text}")[0].stmt
        tn = stmt.targetList[0].val.typeName
        mods = tuple(int(m.val.ival) for m in (tn.typmods or ()))
    except (ParseError, AttributeError, IndexError, TypeError, ValueError):
        return None
    return str(tn.names[-1].sval), mods, bool(tn.arrayBounds)


def widening(old: str, new: str) -> bool:
    """Whether every value of type ``old`` survives a cast to ``new`` unchanged, by the types
    alone; False means "ask the data"."""
    a, b = _type_parts(old), _type_parts(new)
    if a is None or b is None or a[2] or b[2]:
        return a == b and a is not None
    (base_a, mods_a, _), (base_b, mods_b, _) = a, b
    if base_a != base_b:
        return base_b in _WIDER.get(base_a, set()) and (base_b != "numeric" or not mods_b)
    if not mods_b or mods_a == mods_b:
        return True
    if not mods_a:
        return False
    if base_a in ("varchar", "bpchar"):
        return mods_b[0] >= mods_a[0]
    if base_a == "numeric":
        scale_a = mods_a[1] if len(mods_a) > 1 else 0
        scale_b = mods_b[1] if len(mods_b) > 1 else 0
        return scale_b >= scale_a and mods_b[0] - scale_b >= mods_a[0] - scale_a
    return False


def quote(name: str) -> str:
    """An identifier quoted for an expression we hand to the job engine as text."""
    return '"' + name.replace('"', '""') + '"'



def _changed(cols: Iterable[str]) -> sql.Composable:
    """In a row trigger: the write changed one of ``cols`` (``NEW.c IS DISTINCT FROM OLD.c OR
    ...``)."""
    return sql.SQL(" OR ").join(
        sql.SQL("NEW.{c} IS DISTINCT FROM OLD.{c}").format(c=sql.Identifier(c)) for c in cols)


def _touched(c: str) -> sql.Composable:
    """In a row trigger: an INSERT (which writes every column) or an UPDATE that changed ``c``."""
    return sql.SQL("(TG_OP = 'INSERT' OR NEW.{c} IS DISTINCT FROM OLD.{c})").format(
        c=sql.Identifier(c))

def object_name(*parts: str) -> str:
    """A deterministic name for an object we create (trigger, constraint), within 63 bytes."""
    clean = [re.sub(r"[^a-z0-9_]", "", p.lower()) for p in parts]
    base = "bf_" + "_".join(clean)
    # Names that lost characters ("Orders" and "orders") or length get a hash of the originals.
    if len(base) <= 63 and clean == list(parts):
        return base
    digest = hashlib.sha1("\0".join(parts).encode()).hexdigest()[:8]
    return base[:54] + "_" + digest


def _no_column(t: TableShape, col: str) -> sql.Composable:
    return sql.SQL("NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {}::regclass "
                   "AND attname = {} AND NOT attisdropped)").format(
        sql.Literal(t.regclass), sql.Literal(col))


#: The step runner's view of a check's result, for the executor.
CheckResult = Callable[[Conn], bool]
