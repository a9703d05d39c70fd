"""What every operation shares: reading its fields, adding steps, and the SQL helpers of the
sync triggers."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, overload

import psycopg
from pglast import parse_sql
from pglast.parser import ParseError
from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.errors import InvalidFragment, InvalidInput
from backfill.job.spec import JobSpec
from backfill.migrate.file import MigrationFile
from backfill.migrate.shape import Shape, TableShape, quote
from backfill.migrate.steps import OpPlan, Step

_DOLLAR = "$bf$"
#: The transaction-local setting a sync trigger raises around its own write to the other side.
SYNC_GUARD = "backfill.syncing"
#: Column names a trigger cannot declare as variables (they would shadow the row records).
_PLPGSQL_RESERVED = {"new", "old", "found"}


# -- operations -------------------------------------------------------------------------------


class Operation:
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



def any_changed(cols: Iterable[str]) -> sql.Composable:
    """In a row trigger: the write changed one of ``cols`` (``NEW.c IS DISTINCT FROM OLD.c OR
    ...``)."""
    return sql.SQL(" OR ").join(
        sql.SQL("NEW.{c} IS DISTINCT FROM OLD.{c}").format(c=sql.Identifier(c)) for c in cols)


def touched(c: str) -> sql.Composable:
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


def no_column(t: TableShape, col: str) -> sql.Composable:
    return sql.SQL("NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {}::regclass "
                   "AND attname = {} AND NOT attisdropped)").format(
        sql.Literal(t.regclass), sql.Literal(col))
