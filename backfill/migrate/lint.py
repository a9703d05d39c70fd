"""A linter for migration SQL: statements that lock the application out, rewrite a table, or
lose data, found with the PostgreSQL parser itself (pglast) rather than regular expressions.

Rules follow squawk's and strong_migrations' core set. Each finding names the rule, the line,
why it is dangerous and the safe alternative. A statement opts out with a comment inside it or
on the lines before it: ``-- backfill-lint: ignore <rule>[, <rule>...]`` (or ``ignore all``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from pglast import parse_sql
from pglast.enums.parsenodes import AlterTableType as AT
from pglast.enums.parsenodes import ConstrType as CT
from pglast.enums.parsenodes import ObjectType as OT
from pglast.enums.parsenodes import TransactionStmtKind as TK
from pglast.parser import ParseError

from backfill.core import sqltext
from backfill.core.errors import InvalidInput


@dataclass(frozen=True)
class Rule:
    id: str
    why: str
    instead: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("index-not-concurrent",
         "CREATE INDEX takes a SHARE lock: writes to the table wait for the whole build",
         "CREATE INDEX CONCURRENTLY (outside a transaction block)"),
    Rule("concurrently-in-transaction",
         "CONCURRENTLY cannot run inside a transaction block: the statement fails",
         "run it on its own, outside BEGIN ... COMMIT"),
    Rule("constraint-not-not-valid",
         "adding a CHECK or FOREIGN KEY scans the whole table under a lock that blocks writes "
         "(a foreign key also locks the referenced table)",
         "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a later statement"),
    Rule("set-not-null",
         "SET NOT NULL scans the whole table under an ACCESS EXCLUSIVE lock",
         "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; then "
         "SET NOT NULL uses the valid check and does not scan"),
    Rule("volatile-default",
         "a volatile DEFAULT (random(), clock_timestamp(), gen_random_uuid(), nextval()) "
         "rewrites the whole table under an ACCESS EXCLUSIVE lock",
         "add the column without a default (or with a constant one), then backfill it in "
         "batches (`backfill enqueue`)"),
    Rule("type-change",
         "ALTER COLUMN TYPE rewrites the table (and its indexes) under an ACCESS EXCLUSIVE lock, "
         "unless it is a binary-compatible widening (varchar(n) to a longer varchar or text, "
         "numeric(p,s) to a larger precision with the same scale)",
         "add a new column, keep it in sync with a trigger, backfill it, then swap"),
    Rule("rename-column",
         "renaming a column breaks every running application instance that uses the old name",
         "add the new column, dual-write, backfill, switch the application, drop the old one"),
    Rule("rename-table",
         "renaming a table breaks every running application instance that uses the old name",
         "create the new table (or a view with the new name), migrate readers, then drop"),
    Rule("drop-column",
         "dropping a column breaks application instances that still read it, and loses its data",
         "stop using the column in the application first; drop it in a later release"),
    Rule("drop-table",
         "dropping a table loses its data and breaks application instances that still use it",
         "stop using the table first; drop it in a later release, after a backup"),
    Rule("unbounded-update",
         "an UPDATE without WHERE rewrites every row in one transaction: long locks, bloat, "
         "replica lag",
         "backfill it in keyset batches (`backfill enqueue --table ... --set ...`)"),
    Rule("unbounded-delete",
         "a DELETE without WHERE removes every row in one transaction: long locks, bloat, "
         "replica lag",
         "delete in keyset batches (`backfill enqueue --kind delete ...`), or TRUNCATE if the "
         "table is really disposable"),
    Rule("constraint-without-index",
         "ADD PRIMARY KEY / UNIQUE builds its index under an ACCESS EXCLUSIVE lock",
         "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX"),
    Rule("vacuum-full",
         "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock",
         "plain VACUUM, or pg_repack"),
    Rule("cluster",
         "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock",
         "pg_repack"),
    Rule("reindex-not-concurrent",
         "REINDEX without CONCURRENTLY blocks writes (and reads using the index)",
         "REINDEX ... CONCURRENTLY"),
    Rule("lock-table",
         "an explicit LOCK TABLE blocks the application for as long as the transaction lasts",
         "rely on the statement's own, narrower lock, with a short lock_timeout"),
    Rule("truncate",
         "TRUNCATE takes an ACCESS EXCLUSIVE lock and removes every row",
         "batched deletes if the rows matter; otherwise make sure nothing uses the table"),
    Rule("int-primary-key",
         "a 32-bit (serial/int) primary key runs out at 2.1 billion, and widening it later "
         "rewrites the table",
         "bigint GENERATED ALWAYS AS IDENTITY (or bigserial)"),
    Rule("drop-index-not-concurrent",
         "DROP INDEX takes an ACCESS EXCLUSIVE lock on the index's table: reads and writes "
         "wait for it, and everything queued behind it",
         "DROP INDEX CONCURRENTLY (outside a transaction block)"),
    Rule("add-column-not-null-no-default",
         "ADD COLUMN ... NOT NULL without a DEFAULT fails on a table that has rows, and "
         "breaks every running application instance that inserts without the column",
         "add it with a constant DEFAULT (stored once, no rewrite), or nullable, backfill it, "
         "then SET NOT NULL behind a validated CHECK"),
    Rule("add-column-rewrite",
         "adding a serial, identity or stored generated column to an existing table rewrites "
         "the table under an ACCESS EXCLUSIVE lock, computing every row's value",
         "add a plain nullable column (and a default for new rows), then backfill it in "
         "batches (`backfill enqueue`)"),
    Rule("exclusion-constraint",
         "ADD CONSTRAINT ... EXCLUDE builds its index and checks every row under an ACCESS "
         "EXCLUSIVE lock, and cannot be NOT VALID",
         "enforce it in the application, or add it while the table is still small or new"),
    Rule("drop-database",
         "dropping a database loses every table in it",
         "make sure nothing uses it, take a backup, and drop it by hand, not in a migration"),
    Rule("missing-lock-timeout",
         "DDL waiting for its lock queues every later query on the table behind it",
         "SET lock_timeout = '2s' (and retry) before the first DDL statement"),
)}

_IGNORE = re.compile(r"--\s*backfill-lint:\s*ignore\s+([\w\-, ]+)", re.IGNORECASE)
_VOLATILE = {"random", "clock_timestamp", "gen_random_uuid", "uuid_generate_v4", "nextval",
             "timeofday", "txid_current", "setseed"}
_SMALL_INTS = {"serial", "serial4", "int4", "int2", "smallserial", "serial2"}
_SERIALS = {"serial", "serial4", "bigserial", "serial8", "smallserial", "serial2"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str
    statement: str
    why: str
    instead: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return (f"{self.file}:{self.line}: {self.rule}: {self.why}.\n"
                f"    statement: {self.statement}\n    instead: {self.instead}")


def _names(type_name: Any) -> list[str]:
    return [n.sval for n in (type_name.names or ())]


def _is_null(expr: Any) -> bool:
    """A NULL constant, cast or not (``NULL``, ``NULL::int``, ``CAST(NULL AS int)``)."""
    while type(expr).__name__ == "TypeCast":
        expr = expr.arg
    return type(expr).__name__ == "A_Const" and bool(getattr(expr, "isnull", False))


def _relname(rel: Any) -> str:
    return f"{rel.schemaname}.{rel.relname}" if rel.schemaname else rel.relname


def _has_option(options: Any, name: str) -> bool:
    return any(getattr(o, "defname", None) == name for o in (options or ()))


def _safe_widening_target(type_name: Any) -> bool:
    names = _names(type_name)
    base = names[-1] if names else ""
    mods = type_name.typmods
    # text, or varchar/numeric without a limit: a widening of the limited form (or a no-op).
    return base == "text" or (base in ("varchar", "numeric") and not mods)


def _line_of(sql: str, offset: int) -> int:
    """1-based line of the first token at or after ``offset`` (skipping blanks and comments)."""
    i, n = offset, len(sql)
    while i < n:
        if sql[i].isspace():
            i += 1
        elif sql.startswith("--", i):
            nl = sql.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i)
            i = n if end < 0 else end + 2
        else:
            break
    return sql.count("\n", 0, min(i, n)) + 1


def _dropped_new(st: Any, index_table: dict[str, str], created: set[str]) -> bool:
    """Whether a DROP INDEX drops only indexes of tables this file created."""
    return all(index_table.get(".".join(n.sval for n in obj)) in created
               for obj in st.objects or ())


def lint_sql(sql: str, filename: str = "<sql>") -> list[Finding]:
    """Findings for every statement in ``sql`` (a whole migration file)."""
    try:
        statements = parse_sql(sql)
    except ParseError as exc:
        raise InvalidInput(f"{filename}: cannot parse SQL: {exc}") from None
    data = sql.encode("utf-8")
    findings: list[Finding] = []
    in_tx = False
    created: set[str] = set()
    lock_timeout_set = False
    timeout_reported = False  # missing-lock-timeout is reported once, at the first DDL
    validated_checks: set[str] = set()
    index_table: dict[str, str] = {}   # index created in this file -> its table
    previous_end = 0
    for raw in statements:
        start = raw.stmt_location or 0
        length = raw.stmt_len or (len(data) - start)
        # Comments before the statement (since the previous one) belong to it.
        span = data[previous_end:start + length].decode("utf-8", "replace")
        text = data[start:start + length].decode("utf-8", "replace")
        previous_end = start + length
        line = _line_of(sql, len(data[:start].decode("utf-8", "replace")))
        short = " ".join(text.split())
        short = short if len(short) <= 100 else short[:97] + "..."
        ignored: set[str] = set()
        for m in _IGNORE.finditer(span):
            ignored |= {r.strip().lower() for r in m.group(1).split(",") if r.strip()}
        hits: list[str] = []
        st: Any = raw.stmt
        kind = type(st).__name__

        if kind == "TransactionStmt":
            if st.kind in (TK.TRANS_STMT_BEGIN, TK.TRANS_STMT_START):
                in_tx = True
            elif st.kind in (TK.TRANS_STMT_COMMIT, TK.TRANS_STMT_ROLLBACK,
                             TK.TRANS_STMT_PREPARE):
                in_tx = False
        elif kind == "VariableSetStmt" and st.name == "lock_timeout":
            lock_timeout_set = True
        elif kind == "CreateStmt":
            created.add(_relname(st.relation))
            for elt in st.tableElts or ():
                if type(elt).__name__ != "ColumnDef":
                    continue
                names = _names(elt.typeName)
                is_pk = any(c.contype == CT.CONSTR_PRIMARY for c in (elt.constraints or ()))
                if is_pk and names and names[-1] in _SMALL_INTS:
                    hits.append("int-primary-key")
        elif kind == "IndexStmt":
            table = _relname(st.relation)
            if st.idxname:
                schema = st.relation.schemaname
                index_table[f"{schema}.{st.idxname}" if schema else st.idxname] = table
            if st.concurrent and in_tx:
                hits.append("concurrently-in-transaction")
            if not st.concurrent and table not in created:
                hits.append("index-not-concurrent")
        elif kind == "AlterTableStmt":
            table = _relname(st.relation)
            new_table = table in created
            for cmd in st.cmds or ():
                sub, d = cmd.subtype, cmd.def_
                if sub == AT.AT_AddColumn and d is not None:
                    # DEFAULT NULL (or NULL::type) is no default: the rows still get NULL.
                    kinds = {c.contype for c in d.constraints or ()
                             if not (c.contype == CT.CONSTR_DEFAULT and _is_null(c.raw_expr))}
                    serial = bool(set(_names(d.typeName)[-1:]) & _SERIALS)
                    if not new_table and (
                            serial or kinds & {CT.CONSTR_IDENTITY, CT.CONSTR_GENERATED}):
                        hits.append("add-column-rewrite")
                    elif (not new_table and CT.CONSTR_NOTNULL in kinds
                          and CT.CONSTR_DEFAULT not in kinds):
                        hits.append("add-column-not-null-no-default")
                    for c in d.constraints or ():
                        if c.contype == CT.CONSTR_DEFAULT and c.raw_expr is not None and (
                                sqltext.function_calls(c.raw_expr) & _VOLATILE) and not new_table:
                            hits.append("volatile-default")
                        if c.contype in (CT.CONSTR_PRIMARY, CT.CONSTR_UNIQUE) and not new_table:
                            hits.append("constraint-without-index")
                    if _names(d.typeName)[-1:] and _names(d.typeName)[-1] in _SMALL_INTS and any(
                            c.contype == CT.CONSTR_PRIMARY for c in (d.constraints or ())):
                        hits.append("int-primary-key")
                elif sub == AT.AT_AddConstraint and d is not None and not new_table:
                    if d.contype in (CT.CONSTR_CHECK, CT.CONSTR_FOREIGN) and not d.skip_validation:
                        hits.append("constraint-not-not-valid")
                    if d.contype in (CT.CONSTR_PRIMARY, CT.CONSTR_UNIQUE) and not d.indexname:
                        hits.append("constraint-without-index")
                    if d.contype == CT.CONSTR_EXCLUSION:
                        hits.append("exclusion-constraint")
                elif sub == AT.AT_SetNotNull and not new_table:
                    if f"{table}.{cmd.name}" not in validated_checks:
                        hits.append("set-not-null")
                elif sub == AT.AT_AlterColumnType and not new_table:
                    if d is None or not _safe_widening_target(d.typeName):
                        hits.append("type-change")
                elif sub == AT.AT_DropColumn:
                    hits.append("drop-column")
                elif sub == AT.AT_ValidateConstraint and cmd.name:
                    # A validated CHECK (col IS NOT NULL) lets a later SET NOT NULL skip the
                    # scan: remember the columns such checks were added for in this file.
                    for col in re.findall(rf"constraint\s+{re.escape(cmd.name)}\s+check\s*"
                                          r"\(\s*\"?(\w+)\"?\s+is\s+not\s+null", sql,
                                          re.IGNORECASE):
                        validated_checks.add(f"{table}.{col}")
        elif kind == "RenameStmt":
            if st.renameType == OT.OBJECT_COLUMN:
                hits.append("rename-column")
            elif st.renameType == OT.OBJECT_TABLE:
                hits.append("rename-table")
        elif kind == "DropStmt":
            if st.removeType == OT.OBJECT_TABLE:
                hits.append("drop-table")
            if st.removeType == OT.OBJECT_INDEX and not st.concurrent and not _dropped_new(
                    st, index_table, created):
                hits.append("drop-index-not-concurrent")
            if st.concurrent and in_tx:
                hits.append("concurrently-in-transaction")
        elif kind == "UpdateStmt" and st.whereClause is None:
            hits.append("unbounded-update")
        elif kind == "DeleteStmt" and st.whereClause is None:
            hits.append("unbounded-delete")
        elif kind == "VacuumStmt" and _has_option(st.options, "full"):
            hits.append("vacuum-full")
        elif kind == "ClusterStmt":
            hits.append("cluster")
        elif kind == "ReindexStmt":
            if not _has_option(st.params, "concurrently"):
                hits.append("reindex-not-concurrent")
            elif in_tx:
                hits.append("concurrently-in-transaction")
        elif kind == "LockStmt":
            hits.append("lock-table")
        elif kind == "TruncateStmt":
            hits.append("truncate")
        elif kind == "DropdbStmt":
            hits.append("drop-database")

        is_ddl = kind in ("AlterTableStmt", "IndexStmt", "RenameStmt", "DropStmt")
        # Nobody else uses a table this file creates.
        on_new_table = (kind in ("AlterTableStmt", "IndexStmt")
                        and _relname(st.relation) in created) or (
            kind == "DropStmt" and st.removeType == OT.OBJECT_INDEX
            and _dropped_new(st, index_table, created))
        if is_ddl and not lock_timeout_set and not timeout_reported and not on_new_table:
            timeout_reported = True
            if "missing-lock-timeout" not in ignored and "all" not in ignored:
                r = RULES["missing-lock-timeout"]
                findings.append(Finding(filename, line, r.id, short, r.why, r.instead))
        for rule_id in dict.fromkeys(hits):
            if rule_id in ignored or "all" in ignored:
                continue
            r = RULES[rule_id]
            findings.append(Finding(filename, line, rule_id, short, r.why, r.instead))
    return sorted(findings, key=lambda f: (f.line, f.rule))
