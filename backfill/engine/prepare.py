"""A job's spec turned into a :class:`PreparedJob` against the database it runs on: the table and
key resolved and bound, the statements built, a dry EXPLAIN run; or a stored job's, re-proved."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
from psycopg import sql

from backfill.core import sqltext
from backfill.core.catalog import Column, Conn, Table, resolve_key, resolve_table
from backfill.core.errors import ColumnNotFound, InvalidInput, InvalidKey, InvalidStatement
from backfill.engine.binding import Binding, Relation, bind
from backfill.engine.kinds import PreparedJob, explain_write_error, table_ident, undo_table
from backfill.job.spec import JobSpec, TransformFn, load_function, source_engine


def _remote_columns(spec: JobSpec, table: Table, dest: Table,
                    key: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(destination columns, source columns) of a cross-database copy: ``column_map`` pairs,
    then every other destination column the source has under the same name."""
    mapped = dict(spec.column_map)
    for d, s in mapped.items():
        dest.column(d)
        table.column(s)
    wanted = spec.columns or tuple(c.name for c in dest.columns if not c.generated)
    names = {c.name for c in table.columns if not c.generated}
    pairs = [(d, mapped.get(d, d)) for d in wanted if d in mapped or d in names]
    for d in spec.columns:
        if d not in dict(pairs):
            raise ColumnNotFound(f"column {d!r} of {dest.qualified} has no source column in "
                                 f"{table.qualified} (map it with --map {d}=<source column>)")
    if not pairs:
        raise ColumnNotFound(f"{table.qualified} and {dest.qualified} have no column in common")
    sources = [s for _, s in pairs]
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise InvalidInput(f"source column(s) {', '.join(twice)} would be copied twice (once "
                           "mapped, once by name): map or list each source column once")
    if spec.kind == "move":
        lost = [c.name for c in table.columns if not c.generated and c.name not in sources]
        if lost:
            raise InvalidInput(f"a move deletes whole source rows, but {', '.join(lost)} of "
                               f"{table.qualified} would not be copied: add them to "
                               f"{dest.qualified} (or --map them), or copy instead of move")
    copied = dict(pairs)
    for k in key:
        if copied.get(k) != k:
            raise InvalidInput(f"the key column {k!r} must be copied under its own name (verify "
                               "and a later delete find rows by it)")
    return tuple(d for d, _ in pairs), tuple(s for _, s in pairs)


def prepare_stored(conn: Conn, job: Any, *, explain: bool,
                   source: Conn | None = None) -> PreparedJob:
    """Prepare a stored job (a :class:`~backfill.state.store.JobRecord`) on the exact table and key
    it was enqueued on; :class:`InvalidInput` if the table was replaced or the key changed."""
    spec = dataclasses.replace(job.spec,
                               table=sqltext.render_qualified(job.source_schema, job.source_table),
                               key=tuple(job.key_columns))
    try:
        prepared = prepare(conn, spec, explain=explain, source=source)
    except InvalidKey as exc:
        raise InvalidKey(f"job {job.id}'s key ({', '.join(job.key_columns)}) is no longer "
                         f"usable: {exc}") from exc
    if prepared.table.oid != job.source_oid:
        raise InvalidInput(
            f"table {prepared.table.qualified} was dropped and recreated since job {job.id} was "
            "enqueued: its checkpoints do not apply to the new table; cancel the job and "
            "enqueue a new one"
        )
    if prepared.key_types != tuple(job.key_types):
        raise InvalidKey(
            f"the key columns of job {job.id} changed type ({', '.join(job.key_types)} -> "
            f"{', '.join(prepared.key_types)}); cancel the job and enqueue a new one"
        )
    if prepared.dest is not None and job.dest_oid is not None and prepared.dest.oid != job.dest_oid:
        raise InvalidInput(
            f"destination table {prepared.dest.qualified} was dropped and recreated since job "
            f"{job.id} was enqueued: the rows it already wrote are in the old one; cancel the "
            "job and enqueue a new one")
    if job.spec.undo_enabled:
        undo = undo_table(job.id)
        found = conn.execute("SELECT to_regclass(%s)::oid", (undo.as_string(conn),)).fetchone()
        if not (found and found[0]):
            raise InvalidInput(f"job {job.id}'s undo log ({undo.as_string(conn)}) "
                               "is gone (pruned?); it cannot run without one")
        assert prepared.binding is not None
        binding = dataclasses.replace(prepared.binding, relations=(
            *prepared.binding.relations,
            # update and delete batches always run the undo INSERT; a transform's only when
            # a row changed
            Relation("undo log", "backfill", f"undo_{job.id}", int(found[0]),
                     written=job.spec.kind in ("update", "delete"))))
        prepared = dataclasses.replace(prepared, undo=undo, binding=binding)
    return prepared


def prepare(conn: Conn, spec: JobSpec, *, explain: bool = True,
            source: Conn | None = None) -> PreparedJob:
    """Validate ``spec`` against the database (and its source database for a cross-database
    copy: ``source``, or a short connection opened here); nothing is written."""
    if source_engine(spec.source_dsn) == "mysql":
        return _prepare_mysql(conn, spec)
    if spec.source_dsn is not None and source is None:
        from backfill.core.db import connect

        with connect(spec.source_dsn, application_name="backfill source") as src:
            return prepare(conn, spec, explain=explain, source=src)
    read = source if source is not None else conn
    table = resolve_table(read, spec.table)
    key = resolve_key(read, table, spec.key or None)
    key_types = tuple(table.column(k).type for k in key)
    dest: Table | None = None
    copy_columns: tuple[str, ...] = ()
    fn: TransformFn | None = None
    if spec.kind == "update":
        for col, _ in spec.set:
            if table.column(col).generated:
                raise ColumnNotFound(f"column {table.qualified}.{col} is generated; it cannot be SET")
            if col in key:
                raise InvalidInput(
                    f"an update job may not SET key column {col!r}: rows would move within the "  # noqa: S608
                    "range being walked (skipped or processed twice); use a copy job instead"
                )
    source_columns: tuple[str, ...] = ()
    if spec.kind in ("copy", "move"):
        assert spec.dest is not None
        dest = resolve_table(conn, spec.dest)
        if dest.oid == table.oid and source is None:
            raise InvalidInput(f"{spec.kind}: source and destination are the same table")
        if spec.source_dsn is not None:
            assert source is not None
            same = ("SELECT (SELECT system_identifier FROM pg_control_system())::text, "
                    "current_database()::text")
            if (conn.execute(same).fetchone() == source.execute(same).fetchone()
                    and dest.oid == table.oid):
                raise InvalidInput("copy: the destination is the source table itself")
            copy_columns, source_columns = _remote_columns(spec, table, dest, key)
        elif spec.columns:
            for name in spec.columns:
                table.column(name)
                dest.column(name)
            copy_columns = spec.columns
        else:
            source_names = {c.name for c in table.columns if not c.generated}
            copy_columns = tuple(
                col.name for col in dest.columns if not col.generated and col.name in source_names
            )
            if not copy_columns:
                raise ColumnNotFound(
                    f"{table.qualified} and {dest.qualified} have no column in common to copy"
                )
        missing_key = [k for k in key if k not in copy_columns]
        if spec.on_conflict == "update" and missing_key:
            raise InvalidInput(
                f"on_conflict=update needs the key ({', '.join(key)}) among the copied columns"
            )
    if spec.kind == "delete" and spec.source_dsn is not None:
        assert spec.dest is not None
        dest = resolve_table(conn, spec.dest)
        copy_columns, source_columns = _remote_columns(spec, table, dest, key)
    reverted_kind = None
    if spec.kind == "revert":
        assert spec.dest is not None
        assert spec.reverts is not None
        dest = resolve_table(conn, spec.dest)
        row = conn.execute("SELECT kind, spec FROM backfill.jobs WHERE id = %s",
                           (spec.reverts,)).fetchone()
        if row is None:
            raise InvalidInput(f"job {spec.reverts}, which this job reverts, does not exist")
        reverted_kind = str(row[0])
        if reverted_kind == "delete":
            copy_columns = tuple(c.name for c in table.columns)
        else:
            copy_columns = JobSpec.from_json(row[1]).write_columns()
        for c in copy_columns:
            dest.column(c)
    if spec.kind == "transform":
        for name in (*spec.columns, *spec.write_columns()):
            table.column(name)
        for name in spec.write_columns():
            if name in key:
                raise InvalidInput(f"transform may not write key column {name!r}")
        assert spec.function is not None
        fn = load_function(spec.function)
    # Which relations a batch's write must have written (row-locked): the source of the kinds
    # that change it in place (a move's too; a cross-database delete on the source side), the
    # table a copy or revert writes. A sql job's statement may write anywhere: not proven.
    origin = Relation("undo log" if spec.kind == "revert" else "source", table.schema,
                      table.name, table.oid,
                      written=spec.kind == "delete" if spec.source_dsn is not None
                      else spec.kind in ("update", "delete", "transform", "move"))
    target = None if dest is None else Relation(
        "reverted" if spec.kind == "revert" else "destination", dest.schema, dest.name, dest.oid,
        written=spec.kind in ("copy", "move", "revert"))
    if spec.source_dsn is not None:   # the source is in another database: proven there
        binding = bind(conn, [target] if target else [], ())
        source_binding: Binding | None = bind(read, [origin], key)
    else:
        binding = bind(conn, [origin, *([target] if target else [])], key)
        source_binding = None
    prepared = PreparedJob(spec, table, key, key_types, dest, copy_columns, fn,
                           reverted_kind=reverted_kind, source_columns=source_columns,
                           binding=binding, source_binding=source_binding,
                           server_version=conn.info.server_version)
    if explain and prepared.remote:
        try:
            with read.transaction(force_rollback=True):
                # {}: the filter's % is escaped as %%; sent alone, on the extended protocol.
                sqltext.execute_one(read, sql.SQL("EXPLAIN SELECT {c} FROM {t} WHERE true{f}").format(
                    c=sql.SQL(", ").join(map(sql.Identifier, source_columns)),
                    t=table_ident(table), f=prepared.extra_filter()), {})
        except (psycopg.ProgrammingError, psycopg.DataError) as exc:
            raise InvalidStatement(explain_write_error(spec, exc)) from exc
    elif explain:
        try:
            prepared.dry_explain(conn, prepared.first_batch(conn))
        except psycopg.DataError as exc:  # e.g. 'infinity' in a timestamp key
            raise InvalidKey(
                f"the key values of {table.qualified} cannot be read as "
                f"({', '.join(key_types)}): {str(exc).strip().splitlines()[0]}"
            ) from exc
    return prepared


def _prepare_mysql(conn: Conn, spec: JobSpec) -> PreparedJob:
    """A copy from a MySQL/MariaDB table (:mod:`backfill.mysql.job`): the destination exists
    here (``convert-schema --apply``) and is bound; the source's plan (key, casts) is made,
    or checked against the one stored with the job; the returned spec carries it."""
    from backfill.mysql.job import open_job_source  # the driver only for such jobs

    assert spec.dest is not None
    dest = resolve_table(conn, spec.dest)
    src, planned = open_job_source(spec, dest_schema=dest.schema, dest_name=dest.name,
                                   dest_columns=[c.name for c in dest.columns if not c.generated])
    spec = dataclasses.replace(spec, source_plan=planned, key=src.key)
    table = Table(src.plan.source.database, src.plan.source.name, 0,
                  tuple(Column(n, t, False, False) for n, t in src.columns), src.rows_estimate)
    target = Relation("destination", dest.schema, dest.name, dest.oid, written=True)
    return PreparedJob(spec, table, src.key, src.key_types, dest,
                       tuple(c.name for c in src.plan.columns), None,
                       source_columns=tuple(n for n, _ in src.columns),
                       binding=bind(conn, [target], ()), server_version=conn.info.server_version,
                       foreign=src)
