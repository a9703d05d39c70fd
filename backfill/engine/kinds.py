"""Binding a :class:`JobSpec` to the catalog, and the SQL each kind runs per batch.

``prepare`` checks everything that can be checked before the first write: tables, columns, the
key, and (``dry_explain``) that the batch statement parses and type-checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from backfill.core import sqltext
from backfill.core.catalog import Conn, Table
from backfill.core.errors import InvalidInput, InvalidStatement
from backfill.engine.binding import Binding
from backfill.engine.keyset import Key, KeyCodec, Keyset, render_key
from backfill.job.spec import JobSpec, TransformFn


def user_sql(text: str, *, placeholders: bool = False) -> sql.SQL:
    """Operator-written SQL, through the gate (:mod:`backfill.core.sqltext`) again where it is
    used, so a spec stored earlier is checked too: a SET value or a predicate must be one
    expression (put in parentheses), a sql job's statement one statement of a DML kind.

    Fragments run next to our own parameters, so a literal ``%`` (``val % 7``, ``LIKE 'a%'``)
    is escaped, except in a sql job's statement, whose ``%(lower)s``/``%(upper)s``
    placeholders are the point (there a literal percent is written ``%%``).
    """
    if placeholders:
        return sqltext.statement_sql(text, allowed=sqltext.SQL_JOB_STATEMENTS,
                                     slot="sql statement", placeholders=True)
    return sqltext.expression_sql(text)


def table_ident(table: Table) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


@dataclass(frozen=True)
class PreparedJob:
    """A spec checked against the catalog, able to build and run its batch statement."""

    spec: JobSpec
    table: Table
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    dest: Table | None
    copy_columns: tuple[str, ...]
    fn: TransformFn | None
    #: The job's undo table (``backfill.undo_<id>``) when it keeps an undo log.
    undo: sql.Identifier | None = None
    #: revert jobs: the kind of the job reverted (delete: rows go back in; else: values).
    reverted_kind: str | None = None
    #: cross-database copies: the source column read for each of ``copy_columns``.
    source_columns: tuple[str, ...] = ()
    #: What every batch proves in its transaction before its checkpoint (see
    #: :mod:`backfill.engine.binding`): the relations it writes here, and (here, or on the source
    #: connection of a cross-database job: ``source_binding``) the source and its key.
    binding: Binding | None = None
    source_binding: Binding | None = None
    #: ``server_version_num`` of the database written (18+: undo rows by ``RETURNING OLD``).
    server_version: int = 0
    #: A source in another engine (MySQL/MariaDB), prepared with the job: the
    #: :class:`~backfill.engine.sources.Source` its batches read (None: PostgreSQL).
    foreign: Any = None
    #: Logged updates before 18: how many of the last batch's rows held values in the
    #: written columns (see :meth:`_write_optimistic`), per process; not part of the job.
    _held: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        """Reads another database (``spec.source_dsn``): keyset probes and reads go to a
        connection there, writes and checkpoints stay here."""
        return self.spec.source_dsn is not None

    def source_hash(self, alias: str) -> sql.Composable:
        """The checksum term of a source row: each column cast to its destination type, so
        both sides hash the same text (sessions use :func:`backfill.core.db.canonical_text`)."""
        assert self.dest is not None
        types = {c.name: c.type for c in self.dest.columns}
        return row_hash(self.source_columns or self.copy_columns, alias,
                        tuple(types[d] for d in self.copy_columns))

    def delete_remote(self, read: Conn, conn: Conn, lo: Key | None, hi: Key) -> int:
        """One batch of a cross-database move's second phase: delete a key range from the
        source once it is in the destination, unchanged. In a source transaction the range's
        rows are locked (``FOR UPDATE``), their keys and checksums compared with the
        destination's rows of exactly those keys, and exactly those rows (by ctid, stable
        while locked) deleted; any difference deletes nothing and fails the job. Rows that
        arrive in the range meanwhile are not touched. An empty range is an earlier attempt
        that deleted it (the checkpoint here follows the delete there): done."""
        assert self.dest is not None
        params = Keyset.params(lo, hi)
        codec = KeyCodec(self.key_types)
        with read.transaction():
            read.execute("SELECT set_config('lock_timeout', %s, true), "
                         "set_config('statement_timeout', %s, true)",
                         (f"{max(1, int(self.spec.options.lock_timeout_ms))}ms",
                          f"{max(1, int(self.spec.options.statement_timeout_ms))}ms"))
            rows = read.execute(sql.SQL(
                "SELECT s.tableoid, s.ctid, {keys}, {h} FROM {t} AS s WHERE {p}{f} FOR UPDATE"
            ).format(
                    keys=sql.SQL(", ").join(sql.Identifier("s", k) for k in self.key),
                    h=self.source_hash("s"), t=table_ident(self.table),
                    p=self.keyset.predicate(lower=lo is not None, alias="s"),
                    f=self.extra_filter()), params).fetchall()
            if not rows:
                return 0
            total = sum(r[-1] for r in rows)
            keys = [codec.encode(tuple(r[2:-1])) for r in rows]
            pick = sql.SQL(" AND ").join(
                sql.SQL("d.{k} = (e ->> {i})::{t}").format(k=sql.Identifier(k), i=sql.Literal(i),
                                                          t=sql.SQL(typ))
                for i, (k, typ) in enumerate(zip(self.key, self.key_types, strict=True)))
            there = conn.execute(sql.SQL(
                "SELECT count(*), coalesce(sum({h}), 0) FROM {d} AS d WHERE EXISTS "
                "(SELECT 1 FROM jsonb_array_elements(%s) AS e WHERE {pick})").format(
                    h=row_hash(self.copy_columns, "d"), d=table_ident(self.dest), pick=pick),
                (Jsonb(keys),)).fetchone()
            if self.binding is not None:
                # Before the source's rows go: the destination checked is the bound one.
                self.binding.prove(conn, wrote=False)
            if there is None or (int(there[0]), there[1]) != (len(rows), total):
                after = render_key(lo) if lo is not None else "the first key"
                raise InvalidStatement(
                    f"move: of the {len(rows)} source rows after {after} through "
                    f"{render_key(hi)}, the destination has {there[0] if there else 0} with "
                    "those keys, and their contents differ: changed since the copy, or never "
                    "copied. Nothing was deleted; reconcile the two, then retry")
            # A row version is (partition, ctid): ctids repeat across a partitioned table's
            # partitions.
            cur = read.execute(sql.SQL(
                "DELETE FROM {t} WHERE ctid = ANY (%(tids)s::tid[]) AND (tableoid, ctid) IN "
                "(SELECT * FROM unnest(%(oids)s::oid[], %(tids)s::tid[]))").format(
                    t=table_ident(self.table)),
                {"oids": [r[0] for r in rows], "tids": [r[1] for r in rows]})
            if self.source_binding is not None:
                self.source_binding.prove(read)   # the rows deleted are the bound table's
            return max(cur.rowcount, 0)

    def copy_remote(self, read: Conn, conn: Conn, lo: Key | None, hi: Key) -> int:
        """One batch of a cross-database copy: ``COPY (SELECT …) TO STDOUT`` on the source
        piped into ``COPY dest FROM STDIN`` here, inside the caller's transaction (so the rows
        commit with the checkpoint). Returns the rows written."""
        assert self.dest is not None
        select = sql.SQL("COPY (SELECT {c} FROM {t} WHERE {p}{f} ORDER BY {o}) TO STDOUT").format(
            c=sql.SQL(", ").join(map(sql.Identifier, self.source_columns)),
            t=table_ident(self.table), p=self.keyset.predicate(lower=lo is not None),
            f=self.extra_filter(), o=self.keyset.order_by())
        with psycopg.ClientCursor(read) as cc:   # COPY takes no parameters: bind them here
            query = cc.mogrify(select, Keyset.params(lo, hi))
        into = sql.SQL("COPY {d} ({c}) FROM STDIN").format(
            d=table_ident(self.dest), c=sql.SQL(", ").join(map(sql.Identifier, self.copy_columns)))
        with read.transaction(), read.cursor() as rcur, conn.cursor() as wcur:
            rcur.execute("SELECT set_config('statement_timeout', %s, true)",
                         (f"{max(1, int(self.spec.options.statement_timeout_ms))}ms",))
            with rcur.copy(query) as out, wcur.copy(into) as inp:
                for block in out:
                    inp.write(block)
            if self.source_binding is not None:
                self.source_binding.prove(read)   # the rows read are the bound table's
            return max(wcur.rowcount, 0)

    @property
    def keyset(self) -> Keyset:
        return Keyset(table_ident(self.table), self.key)

    def conflict_key(self) -> str:
        """What this job writes, for the one-active-job-per-table-and-columns rule: a JSON
        list of ``[table, columns or null]``, tables by oid (a table dropped and recreated
        under the same name is another table: a job stuck on the old one does not block it),
        names as stored (any character), columns sorted."""
        return json.dumps([[t, sorted(cols) if cols else None]
                           for t, cols in self.write_targets()], separators=(",", ":"))

    def write_targets(self) -> list[tuple[str, frozenset[str] | None]]:
        """Every table this job writes (``oid:<n>``; a cross-database source: ``remote:`` and
        its name there), with the columns (``None``: whole rows)."""
        if self.remote:   # the source is another database: its tables are not ours to lock
            if self.spec.kind == "delete":
                return [(f"remote:{self.table.qualified}", None)]
            assert self.dest is not None
            return [(f"oid:{self.dest.oid}", None)]
        if self.dest is not None:
            targets: list[tuple[str, frozenset[str] | None]] = [(f"oid:{self.dest.oid}", None)]
            if self.spec.kind == "move":  # deletes from its source too
                targets.append((f"oid:{self.table.oid}", None))
            return targets
        cols = self.spec.write_columns()
        return [(f"oid:{self.table.oid}", frozenset(cols) if cols else None)]

    # -- statements -----------------------------------------------------------------------

    def extra_filter(self) -> sql.Composable:
        """`` AND (where)`` when the job has an extra predicate, else nothing."""
        if self.spec.where:
            return sql.SQL(" AND {}").format(user_sql(self.spec.where))
        return sql.SQL("")

    def write_statement(self, *, lower: bool) -> sql.Composed:
        """The statement of one batch over ``(lo, hi]`` (``lower=False``: from the first key)."""
        s = self.spec
        pred = self.keyset.predicate(lower=lower)
        t = table_ident(self.table)
        if s.kind == "update":
            assignments = self._assignments()
            if self.optimistic_log:
                return self._update_logged_fill(assignments, pred)
            if self.undo is not None:
                return self._update_logged(assignments, pred)
            return sql.SQL("UPDATE {t} SET {a} WHERE {p}{f}").format(
                t=t, a=assignments, p=pred, f=self.extra_filter()
            )
        if s.kind == "delete":
            if self.undo is not None:
                cols = sql.SQL(", ").join(map(sql.Identifier, self.undo_columns()))
                return sql.SQL(
                    "WITH gone AS (DELETE FROM {t} WHERE {p}{f} RETURNING {c}) "
                    "INSERT INTO {u} ({c}) SELECT {c} FROM gone").format(
                        t=t, p=pred, f=self.extra_filter(), c=cols, u=self.undo)
            return sql.SQL("DELETE FROM {t} WHERE {p}{f}").format(t=t, p=pred, f=self.extra_filter())
        if s.kind == "revert":
            return self._revert_statement(lower)
        if s.kind in ("copy", "move"):
            assert self.dest is not None
            cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.copy_columns)
            conflict = self._on_conflict()
            if s.kind == "copy":
                # An upsert copy may race a trigger mirroring the same rows (a table split):
                # FOR SHARE waits for a concurrent update of a source row and reads its newest
                # version, so an older value never overwrites a newer one in the destination.
                lock = sql.SQL(" FOR SHARE OF {}").format(sql.Identifier(self.table.name)) \
                    if s.on_conflict == "update" else sql.SQL("")
                return sql.SQL(
                    "INSERT INTO {d} ({c}) SELECT {c} FROM {t} WHERE {p}{f}{lock}{conflict}"
                ).format(d=table_ident(self.dest), c=cols, t=t, p=pred, f=self.extra_filter(),
                         lock=lock, conflict=conflict)
            return sql.SQL(
                "WITH moved AS (DELETE FROM {t} WHERE {p}{f} RETURNING {c}) "
                "INSERT INTO {d} ({c}) SELECT {c} FROM moved{conflict}"
            ).format(d=table_ident(self.dest), c=cols, t=t, p=pred, f=self.extra_filter(),
                     conflict=conflict)
        if s.kind == "transform":
            read = sql.SQL(", ").join(sql.Identifier(c) for c in self._transform_reads())
            return sql.SQL(
                "SELECT {r} FROM {t} WHERE {p}{f} ORDER BY {o} FOR NO KEY UPDATE"
            ).format(r=read, t=t, p=pred, f=self.extra_filter(), o=self.keyset.order_by())
        assert s.statement is not None
        return sql.Composed([user_sql(s.statement, placeholders=True)])

    def _transform_reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.key, *self.spec.columns)))

    # -- the undo log ----------------------------------------------------------------------

    def undo_columns(self) -> tuple[str, ...]:
        """Columns of the undo table: a deleted row whole; else the key, then each written
        column's value before (``old:c``) and after (``new:c``) the job."""
        if self.spec.kind == "delete":
            return tuple(c.name for c in self.table.columns if not c.generated)
        writes = self.spec.write_columns()
        return (*self.key, *(f"old:{c}" for c in writes), *(f"new:{c}" for c in writes))

    def create_undo_table(self, conn: Conn, job_id: int) -> sql.Identifier:
        """``backfill.undo_<job_id>``, typed like the table, keyed like the job."""
        undo = undo_table(job_id)
        t = table_ident(self.table)
        if self.spec.kind == "delete":
            select = sql.SQL(", ").join(map(sql.Identifier, self.undo_columns()))
        else:
            writes = self.spec.write_columns()
            select = sql.SQL(", ").join([
                *(sql.Identifier(k) for k in self.key),
                *(sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(f"old:{c}"))
                  for c in writes),
                *(sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(f"new:{c}"))
                  for c in writes)])
        # Append-only, read only by a revert: autovacuum's insert-triggered passes over it
        # would only compete with the job (anti-wraparound vacuums still run).
        conn.execute(sql.SQL("CREATE TABLE {u} WITH (autovacuum_enabled = false) AS "
                             "SELECT {s} FROM {t} WITH NO DATA").format(u=undo, s=select, t=t))
        if self.spec.kind == "transform":   # its batches read their undo rows back by key
            index_undo_table(conn, job_id, self.key)
        # Update and delete jobs only append: no index to maintain on every batch for the
        # sake of a revert that may never come; a revert adds the key when it starts.
        return undo

    def _assignments(self) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), user_sql(e)) for c, e in self.spec.set)

    @property
    def optimistic_log(self) -> bool:
        """An update with an undo log on PostgreSQL before 18: its batches read the old values
        without locking the rows first (see :meth:`_update_logged`)."""
        return (self.spec.kind == "update" and self.undo is not None
                and self.server_version < 180000)

    def _update_logged(self, assignments: sql.Composable, pred: sql.Composable, *,
                       optimistic: bool = False) -> sql.Composed:
        """One statement: update the batch's rows and log each row's values before and after.

        PostgreSQL 18: ``RETURNING OLD``. Before: read the old values, then update exactly
        those row versions. ``optimistic``: the read does not lock (locking writes every row
        an extra time); the update is restricted to the row versions read (partition,
        ``ctid`` and ``xmin``: a filter every plan rechecks on a row's newer version, where
        older minor releases did not recheck a Tid Scan's own condition), so a row another
        session updated in between is skipped, and the statement returns (rows read, rows
        holding values, rows logged) for :meth:`_write_optimistic` to see that it must redo
        the batch with ``FOR NO KEY UPDATE``. The CTE's columns are renamed so the user's
        SET expressions still name the table's columns; the CTEs' names cannot be a table's."""
        t = table_ident(self.table)
        writes = self.spec.write_columns()
        ids = sql.SQL(", ").join
        if self.server_version >= 180000:
            # One pass: the old values of the very row versions updated (after a concurrent
            # update, the newest: what the FOR NO KEY UPDATE read below achieves on older
            # servers), with no second scan of the range and no join.
            return sql.SQL(
                "WITH {upd} AS (UPDATE {t} SET {a} WHERE {p}{f} RETURNING {ret}) "
                "INSERT INTO {u} ({cols}) SELECT * FROM {upd}").format(
                    upd=sql.Identifier("t:upd"), t=t, a=assignments, p=pred,
                    f=self.extra_filter(), u=self.undo,
                    cols=ids(map(sql.Identifier, self.undo_columns())),
                    ret=ids([*(sql.SQL("new.{} AS {}").format(sql.Identifier(k), sql.Identifier(k))
                               for k in self.key),
                             *(sql.SQL("old.{} AS {}").format(sql.Identifier(c),
                                                             sql.Identifier(f"old:{c}"))
                               for c in writes),
                             *(sql.SQL("new.{} AS {}").format(sql.Identifier(c),
                                                             sql.Identifier(f"new:{c}"))
                               for c in writes)]))
        # The read's CTE is "t:prev" (a name no table in the statement can have; on 18, "old"
        # in RETURNING is the old row); its columns are renamed so the user's SET expressions
        # still name the table's columns. The update returns the old values from it: no
        # second join to log them.
        prev = sql.Identifier("t:prev")
        old_as = ids(sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(f"old:{c}"))
                     for c in writes)
        returning = ids([*(sql.SQL("{t}.{c}").format(t=t, c=sql.Identifier(k)) for k in self.key),
                         *(sql.SQL("{}.{}").format(prev, sql.Identifier(f"old:{c}"))
                           for c in writes),
                         *(sql.SQL("{t}.{c}").format(t=t, c=sql.Identifier(c)) for c in writes)])
        cols = ids(map(sql.Identifier, self.undo_columns()))
        upd, ins = sql.Identifier("t:upd"), sql.Identifier("t:ins")
        if optimistic:
            return sql.SQL(
                "WITH {prev} AS (SELECT tableoid AS {oid}, ctid AS {tid}, xmin AS {xmin}, "
                "{old_as} FROM {t} WHERE {p}{f}), "
                "{upd} AS (UPDATE {t} SET {a} FROM {prev} WHERE {p}{f} AND {t}.ctid = {prev}.{tid} "
                "AND {t}.tableoid = {prev}.{oid} AND {t}.xmin = {prev}.{xmin} RETURNING {ret}), "
                "{ins} AS (INSERT INTO {u} ({cols}) SELECT * FROM {upd} RETURNING 1) "
                "SELECT (SELECT count(*) FROM {prev}), "
                "(SELECT count(*) FROM {prev} WHERE num_nonnulls({olds}) > 0), "
                "(SELECT count(*) FROM {ins})").format(
                    prev=prev, tid=sql.Identifier("t:ctid"), oid=sql.Identifier("t:oid"),
                    xmin=sql.Identifier("t:xmin"), upd=upd, ins=ins,
                    old_as=old_as, t=t, p=pred,
                    f=self.extra_filter(), a=assignments, ret=returning, u=self.undo, cols=cols,
                    olds=ids(sql.Identifier(f"old:{c}") for c in writes))
        key_as = ids(sql.SQL("{} AS {}").format(sql.Identifier(k), sql.Identifier(f"k:{k}"))
                     for k in self.key)
        join = sql.SQL(" AND ").join(
            sql.SQL("{t}.{k} = {prev}.{ok}").format(t=t, k=sql.Identifier(k), prev=prev,
                                                    ok=sql.Identifier(f"k:{k}"))
            for k in self.key)
        return sql.SQL(
            "WITH {prev} AS (SELECT {key_as}, {old_as} FROM {t} WHERE {p}{f} FOR NO KEY UPDATE), "
            # The batch's range again on the table: joined on the key alone, the planner may
            # walk the table from its first key for every batch.
            "{upd} AS (UPDATE {t} SET {a} FROM {prev} WHERE {p}{f} AND {join} RETURNING {ret}) "
            "INSERT INTO {u} ({cols}) SELECT * FROM {upd}").format(
                prev=prev, upd=upd, key_as=key_as, old_as=old_as, t=t, p=pred, f=self.extra_filter(),
                a=assignments, join=join, ret=returning, u=self.undo, cols=cols)

    def _update_logged_fill(self, assignments: sql.Composable,
                            pred: sql.Composable) -> sql.Composed:
        """The logged update before 18 of a batch whose written columns are all NULL (a new
        column being filled): the old values are known, so nothing is read into a CTE and
        joined back. Returns (rows in the batch, rows holding values, rows logged).

        One statement, one snapshot: ``t:batch`` counts the batch's rows and those holding
        a value in a written column; only if none does, the update runs, over the same rows
        in key order (as a plain update locks them), each still required to hold no value
        (rechecked by PostgreSQL on the newest version of a row another session changed
        meanwhile, so the NULL logged is what the job overwrote) and logged with NULL as
        its old values. A batch holding values changes nothing here (0 logged) and
        :meth:`_write_optimistic` runs :meth:`_update_logged` instead; a row changed in
        between so that it holds a value is skipped, and the batch is redone locking."""
        t = table_ident(self.table)
        writes = self.spec.write_columns()
        ids = sql.SQL(", ").join
        names = ids(map(sql.Identifier, writes))
        batch, fill, ins = (sql.Identifier(n) for n in ("t:batch", "t:fill", "t:ins"))
        return sql.SQL(
            "WITH {batch} AS (SELECT count(*) AS n, count(*) FILTER "
            "(WHERE num_nonnulls({names}) > 0) AS held FROM {t} WHERE {p}{f}), "
            "{fill} AS (UPDATE {t} SET {a} WHERE {p}{f} AND num_nulls({names}) = {k} "
            "AND (SELECT held FROM {batch}) = 0 RETURNING {fill_ret}), "
            "{ins} AS (INSERT INTO {u} ({fill_cols}) SELECT * FROM {fill} RETURNING 1) "
            "SELECT (SELECT n FROM {batch}), (SELECT held FROM {batch}), "
            "(SELECT count(*) FROM {ins})").format(
                batch=batch, fill=fill, ins=ins, names=names, t=t, p=pred,
                f=self.extra_filter(), a=assignments, k=sql.Literal(len(writes)), u=self.undo,
                fill_ret=ids(sql.SQL("{t}.{c}").format(t=t, c=sql.Identifier(c))
                             for c in (*self.key, *writes)),
                fill_cols=ids([*map(sql.Identifier, self.key),
                               *(sql.Identifier(f"new:{c}") for c in writes)]))

    def _revert_statement(self, lower: bool) -> sql.Composed:
        """Apply a batch of an undo log (this job's "table") back to its table ("dest").

        Values: restored only where the row still holds what the job wrote (``on_conflict``
        update: whatever it holds now). Deleted rows: inserted back, skipped when the key is
        taken again (update: overwritten)."""
        assert self.dest is not None
        u, d = table_ident(self.table), table_ident(self.dest)
        pred = self.keyset.predicate(lower=lower, alias="u")
        ids = sql.SQL(", ").join
        if self.reverted_kind == "delete":
            names = ids(map(sql.Identifier, self.copy_columns))
            conflict: sql.Composable = sql.SQL(" ON CONFLICT DO NOTHING")
            if self.spec.on_conflict == "update":
                rest = [c for c in self.copy_columns if c not in self.key]
                conflict = sql.SQL(" ON CONFLICT ({k}) DO UPDATE SET {s}").format(
                    k=ids(map(sql.Identifier, self.key)),
                    s=ids(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                          for c in rest)) if rest else sql.SQL(" ON CONFLICT DO NOTHING")
            return sql.SQL("INSERT INTO {d} ({c}) OVERRIDING SYSTEM VALUE SELECT {uc} FROM {u} "
                           "AS u WHERE {p}{conflict}").format(
                d=d, c=names, uc=ids(sql.SQL("u.{}").format(sql.Identifier(c))
                                    for c in self.copy_columns),
                u=u, p=pred, conflict=conflict)
        cols = self.copy_columns
        unchanged: sql.Composable = sql.SQL("")
        if self.spec.on_conflict != "update":
            # *= (on records: hence the sub-selects) compares the stored bytes: types
            # without = (json, point) work, and a value
            # the application changed to an "equal" one ('1 mon' vs '30 days') counts.
            unchanged = sql.SQL(" AND (SELECT ROW({now})) *= (SELECT ROW({new}))").format(
                now=ids(sql.SQL("{d}.{c}").format(d=d, c=sql.Identifier(c)) for c in cols),
                new=ids(sql.SQL("u.{}").format(sql.Identifier(f"new:{c}")) for c in cols))
        return sql.SQL("UPDATE {d} SET {s} FROM {u} AS u WHERE {p} AND {j}{unchanged}").format(
            d=d, s=ids(sql.SQL("{c} = u.{o}").format(c=sql.Identifier(c),
                                                     o=sql.Identifier(f"old:{c}"))
                       for c in cols),
            u=u, p=pred, j=sql.SQL(" AND ").join(
                sql.SQL("{d}.{k} = u.{k}").format(d=d, k=sql.Identifier(k)) for k in self.key),
            unchanged=unchanged)

    def _on_conflict(self) -> sql.Composable:
        mode = self.spec.on_conflict
        if mode == "nothing":
            return sql.SQL(" ON CONFLICT DO NOTHING")
        if mode == "update":
            rest = [c for c in self.copy_columns if c not in self.key]
            keys = sql.SQL(", ").join(sql.Identifier(c) for c in self.key)
            if not rest:
                return sql.SQL(" ON CONFLICT ({k}) DO NOTHING").format(k=keys)
            sets = sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in rest
            )
            return sql.SQL(" ON CONFLICT ({k}) DO UPDATE SET {s}").format(k=keys, s=sets)
        return sql.SQL("")

    def statement_params(self, lo: Key | None, hi: Key, first: Key | None) -> dict[str, Any]:
        """Parameters of the batch statement; the sql kind gets inclusive bounds by name."""
        if self.spec.kind != "sql":
            return Keyset.params(lo, hi)
        lower = first if first is not None else hi
        params: dict[str, Any] = {}
        for i, col in enumerate(self.key):
            params[f"lower_{col}"] = lower[i]
            params[f"upper_{col}"] = hi[i]
        if len(self.key) == 1:
            params["lower"] = lower[0]
            params["upper"] = hi[0]
        return params

    def write_batch(self, conn: Conn, lo: Key | None, hi: Key, first: Key | None,
                    *, sync: Callable[[], None] | None = None) -> int:
        """Run the batch's write on ``conn`` (inside the caller's transaction); rows changed.

        ``sync`` flushes a pipeline so the statement's row count is known.
        """
        stmt = self.write_statement(lower=lo is not None)
        params = self.statement_params(lo, hi, first)
        if self.optimistic_log:
            return self._write_optimistic(conn, stmt, params, lower=lo is not None, sync=sync)
        if self.spec.kind != "transform":
            cur = conn.execute(stmt, params)
            if sync is not None:
                sync()
            return max(cur.rowcount, 0)
        return self._transform_batch(conn, stmt, params)

    def _write_optimistic(self, conn: Conn, stmt: sql.Composed, params: dict[str, Any], *,
                          lower: bool, sync: Callable[[], None] | None) -> int:
        """The logged update without locking its rows first; if another session updated
        one of them between the read and the write (rows read != rows logged), roll back to
        before it and run the locking statement instead. Rows logged.

        ``stmt`` (:meth:`_update_logged_fill`) updates a batch whose written columns are all
        NULL without reading them; it is tried while the batches before held no values
        (or the first), and a batch holding some runs :meth:`_update_logged`, which reads
        every row's old values, at once after it (nothing was changed) or instead of it
        until a batch holds none again. Either way one update locks the batch's rows (no
        second pass over some of them, which could deadlock with an application
        transaction locking rows in key order)."""
        pred = self.keyset.predicate(lower=lower)

        def counts(statement: sql.Composed) -> tuple[int, int, int]:
            """(rows in the batch, rows holding values, rows logged); the second kept."""
            row = conn.execute(statement, params).fetchone()
            read, held, logged = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
            self._held[:] = [held]
            return read, held, logged

        conn.execute("SAVEPOINT backfill_logged")
        if not self._held or self._held[-1] == 0:
            read, held, logged = counts(stmt)
            if held == 0 and read == logged:
                return logged
        if self._held[-1] > 0:   # this batch holds values: nothing written yet, read them
            read, _, logged = counts(
                self._update_logged(self._assignments(), pred, optimistic=True))
            if read == logged:
                return logged
        conn.execute("ROLLBACK TO SAVEPOINT backfill_logged")
        careful = self._update_logged(self._assignments(), pred)
        cur = conn.execute(careful, params)
        if sync is not None:
            sync()
        return max(cur.rowcount, 0)

    def _transform_batch(self, conn: Conn, select: sql.Composed, params: dict[str, Any]) -> int:
        assert self.fn is not None
        writes = set(self.spec.write_columns())
        with conn.cursor() as cur:
            cur.execute(select, params)
            rows = cur.fetchall()  # first: in a pipeline the description arrives with the rows
            names = [d.name for d in cur.description or ()]
        changes: list[tuple[tuple[str, ...], list[Any]]] = []
        given = dict.fromkeys((*self.key, *self.spec.columns))
        for values in rows:
            row = dict(zip(names, values, strict=True))
            out = self.fn({c: row[c] for c in given})
            if not out:
                continue
            unknown = set(out) - writes
            if unknown:
                raise InvalidInput(
                    f"transform {self.spec.function} returned columns it may not write: "
                    f"{', '.join(sorted(unknown))} (writes: {', '.join(sorted(writes))})"
                )
            changed = {c: v for c, v in out.items() if row.get(c) != v}
            if not changed:
                continue
            cols = tuple(sorted(changed))
            # A dict goes to json/jsonb (psycopg adapts lists to arrays, dicts not at all).
            changes.append((cols, [*(Jsonb(changed[c]) if isinstance(changed[c], dict)
                                     else changed[c] for c in cols),
                                   *(row[k] for k in self.key)]))

        by_cols: dict[tuple[str, ...], list[list[Any]]] = {}
        for cols, args in changes:
            by_cols.setdefault(cols, []).append(args)
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in self.key
        )
        if self.undo is not None and changes:
            self._log_transform(conn, params, updates=lambda: self._apply(conn, by_cols, where))
            return len(changes)
        self._apply(conn, by_cols, where)
        return len(changes)

    def _apply(self, conn: Conn, by_cols: dict[tuple[str, ...], list[list[Any]]],
               where: sql.Composable) -> None:
        for cols, arg_rows in by_cols.items():
            stmt = sql.SQL("UPDATE {t} SET {s} WHERE {w}").format(
                t=table_ident(self.table),
                s=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in cols
                ),
                w=where,
            )
            with conn.cursor() as cur:
                cur.executemany(stmt, arg_rows)

    def _log_transform(self, conn: Conn, params: dict[str, Any], *,
                       updates: Callable[[], None]) -> None:
        """The undo rows of a transform batch, made in the database (exact types, no round
        trip through Python): every row of the (locked) batch before the updates, its values
        after, then the rows the transform left as they were are dropped."""
        assert self.undo is not None
        t, u = table_ident(self.table), self.undo
        writes = self.spec.write_columns()
        ids = sql.SQL(", ").join
        lower = "lo0" in params
        upred = self.keyset.predicate(lower=lower, alias="u")
        conn.execute(sql.SQL(
            "INSERT INTO {u} ({keys}, {olds}, {news}) SELECT {keys}, {vals}, {vals} FROM {t} "
            "WHERE {p}{f}").format(
                u=u, keys=ids(map(sql.Identifier, self.key)),
                olds=ids(sql.Identifier(f"old:{c}") for c in writes),
                news=ids(sql.Identifier(f"new:{c}") for c in writes),
                vals=ids(map(sql.Identifier, writes)), t=t,
                p=self.keyset.predicate(lower=lower), f=self.extra_filter()), params)
        updates()
        match = sql.SQL(" AND ").join(sql.SQL("{t}.{k} = u.{k}").format(t=t, k=sql.Identifier(k))
                                      for k in self.key)
        conn.execute(sql.SQL("UPDATE {u} AS u SET {sets} FROM {t} WHERE {match} AND {p}").format(
            u=u, sets=ids(sql.SQL("{n} = {t}.{c}").format(
                n=sql.Identifier(f"new:{c}"), t=t, c=sql.Identifier(c)) for c in writes),
            t=t, match=match, p=upred), params)
        conn.execute(sql.SQL("DELETE FROM {u} AS u WHERE {p} AND (SELECT ROW({o})) *= "
                             "(SELECT ROW({n}))").format(
            u=u, p=upred, o=ids(sql.SQL("u.{}").format(sql.Identifier(f"old:{c}")) for c in writes),
            n=ids(sql.SQL("u.{}").format(sql.Identifier(f"new:{c}")) for c in writes)), params)

    def first_batch(self, conn: Conn) -> tuple[Key, Key] | None:
        """(first key, last key) of the first batch, or ``None`` for an empty table."""
        ks = self.keyset
        upper = ks.max_key(conn)
        if upper is None:
            return None
        first = ks.first_key(conn, None, upper)
        last = ks.probe(conn, None, upper, self.spec.options.batch_size - 1) or upper
        return (first or upper), last

    def dry_explain(self, conn: Conn, bounds: tuple[Key, Key] | None) -> str:
        """EXPLAIN the first batch's statement (``bounds``, from :meth:`first_batch`: the batch
        as it will run, not the whole range) in a rolled-back transaction; return the plan.

        Raises :class:`InvalidStatement` when it does not parse or type-check.
        """
        first, upper = bounds if bounds is not None else (None, None)
        stmt = self.write_statement(lower=False)
        if upper is None:
            params: dict[str, Any] = {f"hi{i}": None for i in range(len(self.key))}
            if self.spec.kind == "sql":
                params = {f"lower_{c}": None for c in self.key} | {f"upper_{c}": None for c in self.key}
                params |= {"lower": None, "upper": None}
        else:
            params = self.statement_params(None, upper, first)
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SET LOCAL statement_timeout = '30s'")
                rows = conn.execute(sql.SQL("EXPLAIN {}").format(stmt), params).fetchall()
        # Syntax and name errors (class 42), bad literals (22), unsupported features (0A).
        except (psycopg.ProgrammingError, psycopg.DataError, psycopg.NotSupportedError) as exc:
            raise InvalidStatement(explain_write_error(self.spec, exc)) from exc
        return "\n".join(str(r[0]) for r in rows)


def row_hash(columns: tuple[str, ...], alias: str,
             types: tuple[str, ...] | None = None) -> sql.Composable:
    """64 bits of md5 of a row's text form, as a bigint (sums of it are numeric: no
    overflow). ``types``: cast each column first (to hash like another table's row)."""
    row = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Identifier(alias, c), sql.SQL(t)) if types
        else sql.Identifier(alias, c)
        for c, t in zip(columns, types or columns, strict=True))
    return sql.SQL("('x' || left(md5(ROW({})::text), 16))::bit(64)::bigint").format(row)


def undo_table(job_id: int) -> sql.Identifier:
    return sql.Identifier("backfill", f"undo_{job_id}")


def index_undo_table(conn: Conn, job_id: int, key: tuple[str, ...]) -> bool:
    """Give an undo log its primary key (the job's key) unless it has one: a revert walks it
    in key order. Logs written before this change, and transforms', have it already.
    Returns whether it was added. Run it while no job writes the log (its revert's start)."""
    undo = undo_table(job_id)
    has = conn.execute("SELECT EXISTS (SELECT FROM pg_index WHERE indrelid = to_regclass(%s) "
                       "AND indisprimary)", (undo.as_string(conn),)).fetchone()
    if has and has[0]:
        return False
    conn.execute(sql.SQL("ALTER TABLE {u} ADD PRIMARY KEY ({k})").format(
        u=undo, k=sql.SQL(", ").join(map(sql.Identifier, key))))
    return True


def explain_write_error(spec: JobSpec, exc: Exception) -> str:
    what = {
        "update": "the SET expression or WHERE",
        "sql": "the statement",
        "delete": "the WHERE predicate",
        "copy": "the copy",
        "move": "the move",
        "transform": "the transform's read",
        "revert": "the revert",
    }[spec.kind]
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{what} of job {spec.display_name!r} does not check out: {msg}"
