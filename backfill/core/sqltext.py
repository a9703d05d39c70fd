"""The one gate for user text that becomes SQL: names, expressions, types and statements.

Every piece of text a user hands over (``-t``, ``--key``, ``--set``, ``--where``, ``--sql``, a
migration file's names, types, defaults, checks and expressions, the controller's probes) is
read here before it is used, with PostgreSQL's own parser (pglast) for SQL and an exact reader
of SQL's identifier syntax for names, and must be exactly what its slot allows:

- a **name** (:func:`identifier`, :func:`qualified_name`, :func:`identifier_list`) is read as
  SQL reads it: unquoted, it folds to lower case; in double quotes it keeps case, spaces, dots
  and commas (``""`` is a quote);
- an **expression** or **predicate** (:func:`expression`) is one scalar expression: it must
  parse as the only target of ``SELECT <text>``, with no comment in it (a ``--`` would swallow
  the rest of the statement it is put in), and is put into our statements in parentheses;
- a **type** (:func:`type_name`) must parse as the only thing after ``SELECT NULL::``;
- a **statement** (:func:`statement`) is exactly one statement of an allowed kind; transaction
  control is never one of them.

Anything else raises :class:`~backfill.core.errors.InvalidFragment` (exit 2) before anything runs.
The checks run where the text enters (a spec, a migration plan, a controller config) and again
where it is used (:func:`expression_sql`, :func:`statement_sql`), so text stored earlier is
checked again. :func:`execute_one` sends a statement with the extended protocol, on which the
server refuses more than one statement in a query string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, LiteralString, cast

from pglast import keywords
from pglast import parse_sql as _parse_sql
from pglast.parser import ParseError, scan
from psycopg import sql

from backfill.core.errors import InvalidFragment, InvalidInput

#: Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes); longer ones it truncates.
MAX_NAME_BYTES = 63
NAME_RULES = ("names are read as SQL writes them: unquoted they fold to lower case; in double "
              'quotes they keep case, spaces, dots and commas ("Sales Data"."Order-Items", '
              'a "" inside quotes is one quote)')

_UNQUOTED = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")
#: Unquoted names fold ASCII letters only, as PostgreSQL does in a UTF-8 database.
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SPACE = " \t\n\r\f\v"
_RESERVED = frozenset(keywords.RESERVED_KEYWORDS)
#: The statement kinds (pglast node names) each slot allows.
SQL_JOB_STATEMENTS = ("UpdateStmt", "DeleteStmt", "InsertStmt", "SelectStmt", "MergeStmt")
PROBE_STATEMENTS = ("SelectStmt",)
_NEVER = ("TransactionStmt",)


# -- names ------------------------------------------------------------------------------------


#: Functions no job expression or statement may call: they change the session a batch runs
#: in (its statement_timeout and lock_timeout are what keep the application from waiting on
#: it), act on other sessions or the server, hold locks the batch's own do not account for, or
#: reach outside the database. A function of the user's that calls one is not seen: database
#: privileges are the second line.
REFUSED_FUNCTIONS = frozenset({
    "set_config", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_log_backend_memory_contexts",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock",
    "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_import", "lo_export",
    "pg_file_write", "pg_file_rename", "pg_file_unlink",
    "dblink", "dblink_exec", "dblink_connect", "dblink_connect_u", "dblink_send_query",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_drop_replication_slot", "pg_replication_slot_advance",
    "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
    "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes", "pg_logical_slot_peek_binary_changes",
    "pg_logical_emit_message",
    "dblink_open", "dblink_fetch", "dblink_close", "dblink_disconnect", "dblink_get_result",
    "dblink_cancel_query",
    "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir", "pg_ls_replslotdir",
    "lo_from_bytea", "lo_put", "lo_unlink", "lo_create", "lo_creat",
})
#: Relations no job statement may write: an UPDATE of ``pg_settings`` is ``set_config()`` by
#: a rule (and lasts past the batch's transaction). Reading them is fine.
REFUSED_RELATIONS = frozenset({"pg_settings"})


def _no_refused_functions(tree: Any, slot: str, text: str) -> None:
    written = sorted({n.relation.relname for n in _walk(tree)
                      if type(n).__name__ in ("UpdateStmt", "InsertStmt", "DeleteStmt",
                                              "MergeStmt") and n.relation is not None}
                     & REFUSED_RELATIONS)
    if written:
        raise _fail(slot, text, f"writes {', '.join(written)}: that changes the session's "
                                "settings, which a job may not")
    called = sorted(function_calls(tree) & REFUSED_FUNCTIONS)
    if called:
        raise _fail(slot, text, f"calls {', '.join(f'{c}()' for c in called)}: a job may not "
                                "change its session's settings, sleep, take locks of its own, "
                                "act on other sessions or reach outside the database")


def _fail(slot: str, text: str, why: str) -> InvalidFragment:
    return InvalidFragment(f"{slot} {text!r}: {why}")


def _bad_name(slot: str, text: str, why: str) -> InvalidFragment:
    return InvalidFragment(f"malformed {slot} name {text!r}: {why}")


def _read_names(text: str, slot: str) -> list[tuple[str, ...]]:
    """``a, "B".c`` -> ``[("a",), ("B", "c")]``: comma-separated dotted names, as SQL reads
    them (unquoted: ASCII folded to lower case, as PostgreSQL does)."""
    if not isinstance(text, str):
        raise InvalidFragment(f"{slot}: expected a name, got {text!r}")
    items: list[tuple[str, ...]] = []
    parts: list[str] = []
    i, n = 0, len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in _SPACE:
            j += 1
        return j

    while True:
        i = skip(i)
        if i < n and text[i] == '"':
            buf, j = [], i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise _bad_name(slot, text, "a quoted name is not closed")
                buf.append(text[j:k])
                if text.startswith('"', k + 1):
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            name = "".join(buf)
            if not name:
                raise _bad_name(slot, text, 'an empty quoted name ("")')
            if "\x00" in name:
                raise _bad_name(slot, text, "a name cannot hold a NUL character")
        else:
            m = _UNQUOTED.match(text, i)
            if not m:
                at = f"at {text[i:]!r}" if i < n else "at the end"
                raise _bad_name(slot, text, f"expected a name {at}; {NAME_RULES}")
            word = m.group(0)
            name = word.translate(_FOLD)
            if name in _RESERVED:
                raise _bad_name(slot, text, f"{word} is a reserved word in SQL; to name something "
                                f'so, quote it: "{name}"')
            i = m.end()
        if len(name.encode()) > MAX_NAME_BYTES:
            raise _bad_name(slot, text, f"the name {name!r} is longer than {MAX_NAME_BYTES} bytes "
                            "(PostgreSQL would cut it short)")
        parts.append(name)
        i = skip(i)
        if i >= n:
            items.append(tuple(parts))
            return items
        if text[i] == ".":
            i += 1
        elif text[i] == ",":
            items.append(tuple(parts))
            parts = []
            i += 1
        else:
            raise _bad_name(slot, text, f"unexpected {text[i:]!r} after a name; {NAME_RULES}")


def identifier(text: str, *, slot: str = "name") -> str:
    """One name (a column, a constraint), as SQL reads it: ``Total`` is ``total``,
    ``"Total"`` is ``Total``."""
    items = _read_names(text, slot)
    if len(items) != 1 or len(items[0]) != 1:
        raise _bad_name(slot, text, "expected one name (quote a name that holds a dot or a comma)")
    return items[0][0]


def qualified_name(text: str, *, slot: str = "table") -> tuple[str | None, str]:
    """``name`` or ``schema.name`` as SQL reads it -> (schema or None, name)."""
    items = _read_names(text, slot)
    if len(items) != 1 or len(items[0]) > 2:
        raise _bad_name(slot, text, "expected name or schema.name (quote a name that holds a dot "
                        "or a comma)")
    parts = items[0]
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def identifier_list(text: str | Iterable[str], *, slot: str = "columns") -> tuple[str, ...]:
    """``a, "B,c"`` -> ``("a", "B,c")``; a list: each item is one name."""
    if isinstance(text, str):
        if not text.strip():
            return ()
        items = _read_names(text, slot)
        if any(len(parts) != 1 for parts in items):
            raise _bad_name(slot, text, "expected comma-separated names (quote a name that holds "
                            "a dot or a comma)")
        return tuple(parts[0] for parts in items)
    return tuple(identifier(t, slot=slot) for t in text)


def quote_ident(name: str) -> str:
    """``name`` as SQL would write it: bare when it reads back the same, else quoted."""
    if _PLAIN.fullmatch(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def render_qualified(schema: str | None, name: str) -> str:
    """``schema.name`` written so that :func:`qualified_name` (and SQL) reads it back."""
    return f"{quote_ident(schema)}.{quote_ident(name)}" if schema else quote_ident(name)


# -- SQL fragments ----------------------------------------------------------------------------


def _parse(text: str, slot: str, shown: str) -> Any:
    try:
        return _parse_sql(text)
    except ParseError as exc:
        raise _fail(slot, shown, f"does not parse on its own ({exc})") from None


def _no_comments(text: str, slot: str) -> None:
    try:
        tokens = scan(text)
    except ParseError as exc:
        raise _fail(slot, text, f"does not parse on its own ({exc})") from None
    if any(t.name in ("SQL_COMMENT", "C_COMMENT") for t in tokens):
        raise _fail(slot, text, "a fragment may not hold a comment (-- or /* */)")


def _select_of_one(stmts: Any, slot: str, text: str, what: str) -> Any:
    """The value of ``SELECT <value>`` when that is all there is, else refused."""
    if len(stmts) != 1:
        raise _fail(slot, text, f"expected {what}, got {len(stmts)} statements")
    s = stmts[0].stmt
    if type(s).__name__ != "SelectStmt" or not s.targetList or len(s.targetList) != 1:
        raise _fail(slot, text, f"expected {what}")
    extra = [f for f in ("distinctClause", "intoClause", "fromClause", "whereClause",
                         "groupClause", "havingClause", "windowClause", "valuesLists",
                         "sortClause", "limitOffset", "limitCount", "lockingClause",
                         "withClause", "larg", "rarg") if getattr(s, f, None)]
    if extra or s.op.name != "SETOP_NONE" or s.groupDistinct:
        raise _fail(slot, text, f"expected {what}, not a query")
    target = s.targetList[0]
    if target.name or target.indirection:
        raise _fail(slot, text, f"expected {what} (no alias)")
    val = target.val
    if type(val).__name__ == "ColumnRef" and type(val.fields[-1]).__name__ == "A_Star":
        raise _fail(slot, text, f"expected {what}, not *")
    return val


def expression(text: str, *, slot: str = "expression") -> str:
    """Check that ``text`` is exactly one scalar expression (a SET value, a predicate, a
    default); return it, stripped."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidFragment(f"{slot}: expected an expression, got {text!r}")
    text = text.strip()
    _no_comments(text, slot)
    _select_of_one(_parse(f"SELECT {text}", slot, text), slot, text, "one expression")
    # In the parentheses we put it in, it must still be one expression.
    tree = _parse(f"SELECT ({text})", slot, text)
    _select_of_one(tree, slot, text, "one expression")
    _no_refused_functions(tree, slot, text)
    return text


def type_name(text: str, *, slot: str = "type") -> str:
    """Check that ``text`` is exactly one type name (``numeric(12,2)``, ``text[]``)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidFragment(f"{slot}: expected a type, got {text!r}")
    text = text.strip()
    _no_comments(text, slot)
    val = _select_of_one(_parse(f"SELECT NULL::{text}", slot, text), slot, text, "one type")
    if (type(val).__name__ != "TypeCast" or type(val.arg).__name__ != "A_Const"
            or not val.arg.isnull):
        raise _fail(slot, text, "expected one type name")
    return text


def expression_sql(text: str, *, slot: str = "expression", percent: bool = True) -> sql.SQL:
    """A checked expression for composing into a statement, in parentheses. ``percent``:
    the statement has parameters, so a literal ``%`` is escaped."""
    checked = expression(text, slot=slot)
    if percent:
        checked = checked.replace("%", "%%")
    return sql.SQL(cast(LiteralString, f"({checked})"))  # type: ignore[redundant-cast]


def type_sql(text: str, *, slot: str = "type") -> sql.SQL:
    return sql.SQL(cast(LiteralString, type_name(text, slot=slot)))  # type: ignore[redundant-cast]


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")


def _placeholders_as_params(text: str, slot: str,
                            names: dict[str, int] | None = None) -> str:
    """psycopg's ``%(name)s`` as ``$n`` (and ``%%`` as ``%``), so the parser reads the
    statement as the server will; a lone ``%`` is refused (psycopg would reject it).
    ``names`` collects the parameter number of each name."""
    names = {} if names is None else names

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        if m.group(1) is None:
            raise _fail(slot, text, "a literal percent is written %% in a statement with "
                                    "parameters (%(lower)s, %(upper)s)")
        return f"${names.setdefault(m.group(1), len(names) + 1)}"

    return _PLACEHOLDER.sub(sub, text)


def statement(text: str, *, allowed: Iterable[str], slot: str = "statement",
              placeholders: bool = False) -> str:
    """Check that ``text`` is exactly one statement of an ``allowed`` kind (pglast node names:
    ``UpdateStmt``, ``SelectStmt``…); transaction control never is. ``placeholders``: the
    text holds psycopg's ``%(name)s`` parameters."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidFragment(f"{slot}: expected a statement, got {text!r}")
    names: dict[str, int] = {}
    parsed = _placeholders_as_params(text, slot, names) if placeholders else text
    stmts = _parse(parsed, slot, text)
    if len(stmts) != 1:
        raise _fail(slot, text, f"expected one statement, got {len(stmts)}")
    _statement_kind(stmts[0].stmt, tuple(allowed), slot, text)
    _no_refused_functions(stmts, slot, text)
    return text.strip()


def parameters_used(text: str, *, slot: str = "statement") -> frozenset[str]:
    """The ``%(name)s`` parameters a statement really uses: those the parser finds as
    parameters, not those inside a comment or a string literal."""
    names: dict[str, int] = {}
    stmts = _parse(_placeholders_as_params(text, slot, names), slot, text)
    numbers = {int(n.number) for n in _walk(stmts) if type(n).__name__ == "ParamRef"}
    return frozenset(name for name, number in names.items() if number in numbers)


def _walk(node: Any) -> Iterator[Any]:
    """Every pglast node under ``node`` (tuples and node fields, depth first)."""
    if isinstance(node, tuple | list):
        for item in node:
            yield from _walk(item)
    elif type(node).__module__ == "pglast.ast":
        yield node
        for attr in node.__slots__:
            yield from _walk(getattr(node, attr, None))


def _statement_kind(s: Any, allowed: tuple[str, ...], slot: str, text: str) -> None:
    kind = type(s).__name__
    if kind in _NEVER or kind not in allowed:
        names = ", ".join(a.removesuffix("Stmt").upper() for a in allowed)
        raise _fail(slot, text, f"a {kind.removesuffix('Stmt')} statement is not accepted "
                                f"here (accepted: {names})")
    if kind == "SelectStmt" and s.intoClause:
        raise _fail(slot, text, "SELECT INTO creates a table: not accepted here")


def statements(text: str, *, slot: str = "statements") -> tuple[str, ...]:
    """A script (a migration's raw ``sql``): its statements, one string each, to be sent one at
    a time; transaction control is refused (the executor owns the transactions)."""
    from pglast import split

    if not isinstance(text, str) or not text.strip():
        raise InvalidFragment(f"{slot}: expected SQL statements, got {text!r}")
    for raw in _parse(text, slot, text):
        if type(raw.stmt).__name__ in _NEVER:
            raise _fail(slot, text, "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) "
                                    "is not accepted: each step runs in the executor's own "
                                    "transaction")
    return tuple(split(text))


def statement_sql(text: str, *, allowed: Iterable[str], slot: str = "statement",
                  placeholders: bool = False) -> sql.SQL:
    checked = statement(text, allowed=allowed, slot=slot, placeholders=placeholders)
    return sql.SQL(cast(LiteralString, checked))  # type: ignore[redundant-cast]


def one_statement(text: str, *, slot: str = "statement") -> str:
    """Any single statement, except transaction control (a planned step's statement)."""
    stmts = _parse(text, slot, text)
    if len(stmts) != 1:
        raise _fail(slot, text, f"expected one statement, got {len(stmts)}")
    if type(stmts[0].stmt).__name__ in _NEVER:
        raise _fail(slot, text, "transaction control is not accepted here")
    return text


def execute_one(conn: Any, query: Any, params: Any = None) -> Any:
    """``conn.execute`` on the extended protocol, where the server refuses a query string
    that holds more than one statement. (Without parameters psycopg would use the simple
    protocol, which runs every statement in the string.) ``params={}``: no parameters, but
    ``%%`` in the query still means ``%``."""
    if params:
        return conn.execute(query, params)
    return conn.execute(query, params, binary=True)


# -- names an expression uses (the linter, the migration planner and verify read them) --------


def collect_names(node: Any, pick: Any) -> set[str]:
    """Names ``pick(n)`` returns for the nodes under ``node`` (None: not one of ours)."""
    found: set[str] = set()

    def walk(n: Any) -> None:
        if n is None:
            return
        if isinstance(n, tuple | list):
            for x in n:
                walk(x)
            return
        name = pick(n)
        if name is not None:
            found.add(name)
        if hasattr(n, "__slots__"):
            for attr in n.__slots__:
                value = getattr(n, attr, None)
                if value is not None and not isinstance(value, str | int | float | bool):
                    walk(value)

    walk(node)
    return found


def function_calls(node: Any) -> set[str]:
    """Function names called anywhere under ``node``."""
    return collect_names(node, lambda n: n.funcname[-1].sval if type(n).__name__ == "FuncCall"
                    else None)


def _parse_select(expression: str) -> Any:
    try:
        return _parse_sql(f"SELECT ({expression})")
    except ParseError as exc:
        raise InvalidInput(f"cannot parse expression {expression!r}: {exc}") from None


def column_names(expression: str) -> set[str]:
    """Column names an SQL expression refers to (``lower(email) || t.x`` -> email, x)."""
    if not expression.strip():
        return set()

    def pick(n: Any) -> str | None:
        if type(n).__name__ != "ColumnRef":
            return None
        last = n.fields[-1]
        return getattr(last, "sval", None)

    return collect_names(_parse_select(expression), pick)


def function_names(expression: str) -> set[str]:
    """Names of the functions an SQL expression calls (``lower(a) || now()`` -> lower, now)."""
    return function_calls(_parse_select(expression))
