"""The plan: every operation of a file expanded into steps, against the catalog it will run on.

An operation that keeps two shapes of a table in sync adds the version schema last."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from psycopg import sql

from backfill.core.catalog import Conn
from backfill.core.errors import InvalidInput
from backfill.migrate.file import MigrationFile
from backfill.migrate.operations import OPERATIONS
from backfill.migrate.operations.base import Operation
from backfill.migrate.shape import Shape, TableShape
from backfill.migrate.steps import OpPlan


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
    op = Operation(index, {"op": "version_schema"}, shape, conn, mig)
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


#: The step runner's view of a check's result, for the executor.
CheckResult = Callable[[Conn], bool]
