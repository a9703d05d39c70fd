"""Re-check a job's completed ranges, chunk by chunk, and report the chunks that differ."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from backfill.core.catalog import Conn
from backfill.engine.keyset import Key, KeyCodec, render_key
from backfill.engine.kinds import PreparedJob, row_hash, table_ident, user_sql
from backfill.engine.prepare import prepare_stored
from backfill.job.spec import source_engine
from backfill.state import leases, store

DEFAULT_CHUNK = 50_000


@dataclass(frozen=True)
class RangeDiff:
    lower: Key | None
    upper: Key
    detail: str


@dataclass
class VerifyReport:
    job_id: int
    kind: str
    checked_rows: int = 0
    checked_chunks: int = 0
    diffs: list[RangeDiff] = field(default_factory=list)
    unverifiable: str | None = None

    @property
    def ok(self) -> bool:
        return not self.diffs and self.unverifiable is None

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "kind": self.kind, "ok": self.ok,
            "checked_rows": self.checked_rows, "checked_chunks": self.checked_chunks,
            "unverifiable": self.unverifiable,
            "diffs": [{"after": render_key(d.lower), "through": render_key(d.upper),
                       "detail": d.detail} for d in self.diffs],
        }


class _Checker:
    def __init__(self, conn: Conn, prepared: PreparedJob, src: Conn | None = None) -> None:
        self.conn = conn
        self.src = src if src is not None else conn   # a cross-database copy's source
        self.p = prepared
        self.ks = prepared.keyset

    def check(self, lo: Key | None, hi: Key) -> str | None:
        kind = self.p.spec.kind
        params = self.ks.params(lo, hi)
        pred = self.ks.predicate(lower=lo is not None)
        t = table_ident(self.p.table)
        if kind == "update":
            ok = sql.SQL(" AND ").join(
                sql.SQL("{} IS NOT DISTINCT FROM {}").format(sql.Identifier(c), user_sql(e))
                for c, e in self.p.spec.set
            )
            q = sql.SQL("SELECT count(*) FROM {t} WHERE {p}{f} AND NOT ({ok})").format(
                t=t, p=pred, f=self.p.extra_filter(), ok=ok)
            n = self._scalar(q, params)
            return f"{n} rows where the SET is not true" if n else None
        if kind == "revert":
            return self._check_revert(lo, hi)
        if kind == "delete":
            q = sql.SQL("SELECT count(*) FROM {t} WHERE {p}{f}").format(t=t, p=pred, f=self.p.extra_filter())
            n = self._scalar(q, params, self.src)
            return f"{n} rows still match the delete predicate" if n else None
        if kind in ("copy", "move"):
            assert self.p.dest is not None
            d = table_ident(self.p.dest)
            cols = self.p.copy_columns
            dpred = self.ks.predicate(lower=lo is not None, alias="d")
            spred = self.ks.predicate(lower=lo is not None, alias="s")
            if kind == "move":
                q = sql.SQL("SELECT count(*) FROM {t} AS s WHERE {p}{f}").format(
                    t=t, p=spred, f=self.p.extra_filter())
                n = self._scalar(q, params)
                return f"{n} source rows were not moved" if n else None
            src = self.src.execute(
                sql.SQL("SELECT count(*), coalesce(sum({h}), 0) FROM {t} AS s WHERE {p}{f}").format(
                    h=self.p.source_hash("s") if self.p.remote else row_hash(cols, "s"),
                    t=t, p=spred,
                    f=self.p.extra_filter()), params).fetchone()
            dst = self.conn.execute(
                sql.SQL("SELECT count(*), coalesce(sum({h}), 0) FROM {d} AS d WHERE {p}").format(
                    h=row_hash(cols, "d"), d=d, p=dpred), params).fetchone()
            assert src is not None
            assert dst is not None
            if src[0] != dst[0]:
                return f"source has {src[0]} rows, destination {dst[0]}"
            if src[1] != dst[1]:
                return f"{src[0]} rows on both sides but checksums differ"
            return None
        if kind == "transform":
            assert self.p.fn is not None
            read = sql.SQL(", ").join(
                sql.Identifier(c) for c in dict.fromkeys((*self.p.key, *self.p.spec.columns)))
            with self.conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT {r} FROM {t} WHERE {p}{f}").format(
                    r=read, t=t, p=pred, f=self.p.extra_filter()), params)
                names = [c.name for c in cur.description or ()]
                pending = 0
                for values in cur:
                    row = dict(zip(names, values, strict=True))
                    out = self.p.fn(dict(row))
                    if out and any(row.get(c) != v for c, v in out.items()):
                        pending += 1
            return f"{pending} rows the transform would still change" if pending else None
        return None

    def _check_revert(self, lo: Key | None, hi: Key) -> str | None:
        """Rows of the undo log still as the reverted job left them (a plain revert leaves
        rows changed since alone, so those count as done); deleted rows still missing."""
        assert self.p.dest is not None
        d = table_ident(self.p.dest)
        pred = self.ks.predicate(lower=lo is not None, alias="u")
        params = self.ks.params(lo, hi)
        join = sql.SQL(" AND ").join(sql.SQL("{d}.{k} = u.{k}").format(d=d, k=sql.Identifier(k))
                                     for k in self.p.key)
        ids = sql.SQL(", ").join
        if self.p.reverted_kind == "delete":
            q = sql.SQL("SELECT count(*) FROM {u} AS u WHERE {p} AND NOT EXISTS "
                        "(SELECT 1 FROM {d} WHERE {j})").format(
                u=table_ident(self.p.table), p=pred, d=d, j=join)
            n = self._scalar(q, params)
            return f"{n} deleted rows are still missing" if n else None
        cols = self.p.copy_columns
        now = ids(sql.SQL("{d}.{c}").format(d=d, c=sql.Identifier(c)) for c in cols)
        # Plain: rows still holding exactly what the job wrote; forced: rows not back at the
        # old values. Compared as stored bytes (*=, on records), like the revert itself.
        target = "new" if self.p.spec.on_conflict != "update" else "old"
        cmp = "" if target == "new" else "NOT "
        q = sql.SQL("SELECT count(*) FROM {u} AS u JOIN {d} ON {j} WHERE {p} "
                    "AND {cmp}((SELECT ROW({now})) *= (SELECT ROW({vals}))) "
                    "AND NOT ((SELECT ROW({new})) *= (SELECT ROW({old})))").format(
            u=table_ident(self.p.table), d=d, j=join, p=pred, now=now, cmp=sql.SQL(cmp),
            vals=ids(sql.SQL("u.{}").format(sql.Identifier(f"{target}:{c}")) for c in cols),
            new=ids(sql.SQL("u.{}").format(sql.Identifier(f"new:{c}")) for c in cols),
            old=ids(sql.SQL("u.{}").format(sql.Identifier(f"old:{c}")) for c in cols))
        n = self._scalar(q, params)
        return f"{n} rows still hold the reverted job's values" if n else None

    def _scalar(self, q: sql.Composed, params: dict[str, Any], conn: Conn | None = None) -> int:
        row = (conn or self.conn).execute(q, params).fetchone()
        return int(row[0]) if row else 0


_CLOCKS = {"now", "statement_timestamp", "transaction_timestamp", "clock_timestamp",
           "timeofday"}
_CLOCK_WORDS = ("current_timestamp", "current_date", "current_time", "localtimestamp",
                "localtime")


def _unrecomputable(conn: Conn, expressions: list[str]) -> list[str]:
    """Functions in ``expressions`` whose value changes between evaluations (volatile ones,
    and the clock): re-evaluating the SET in verify cannot match what the job wrote."""
    from backfill.core.sqltext import function_names

    names: set[str] = set()
    for e in expressions:
        names |= function_names(e)
        names |= {w for w in _CLOCK_WORDS if w in e.lower()}
    found = sorted(names & (_CLOCKS | set(_CLOCK_WORDS)))
    if names:
        row = conn.execute("SELECT array_agg(DISTINCT proname::text) FROM pg_proc "
                           "WHERE proname = ANY (%s) AND provolatile = 'v'",
                           (sorted(names),)).fetchone()
        found = sorted(set(found) | set(row[0] if row and row[0] else []))
    return found


def verify(conn: Conn, job_id: int, *, chunk: int = DEFAULT_CHUNK) -> VerifyReport:
    """Check every completed range of ``job_id`` in chunks of ``chunk`` keys."""
    job = store.get_job(conn, job_id)
    if source_engine(job.spec.source_dsn) == "mysql":
        return _verify_mysql(conn, job, chunk)
    if job.spec.source_dsn is not None:
        from backfill.core.db import canonical_text, connect

        with connect(job.spec.source_dsn, application_name="backfill verify source") as src:
            canonical_text(src)
            canonical_text(conn)
            return _verify(conn, job, chunk, src)
    return _verify(conn, job, chunk, None)


def _verify_mysql(conn: Conn, job: store.JobRecord, chunk: int) -> VerifyReport:
    """A copy from MySQL/MariaDB: each completed range read again from the source, converted
    by the job's plan, and compared row by row with the destination's rows of the same keys
    in one normalised text form (:mod:`backfill.mysql.verify`); when the job is done, the
    destination must hold no other rows."""
    report = VerifyReport(job.id, job.kind)
    prepared = prepare_stored(conn, job, explain=False)
    source = prepared.foreign
    assert source is not None
    assert prepared.dest is not None
    codec = KeyCodec(prepared.key_types)
    compared, all_done, upper = 0, True, None
    try:
        for slc in leases.slices(conn, job.id):
            all_done = all_done and slc.done
            end = codec.decode(slc.upper_bound if slc.done else slc.cursor)
            if end is None:
                continue
            upper = end
            lo = codec.decode(slc.lower_bound)
            rows, details = source.verify_range(conn, lo, end, chunk)
            compared += rows
            report.checked_chunks += max(1, -(-rows // chunk))
            report.diffs += [RangeDiff(lo, end, d) for d in details]
    finally:
        source.close()
    report.checked_rows = compared
    if all_done and upper is not None:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(prepared.dest.schema, prepared.dest.name))).fetchone()
        there = int(row[0]) if row else 0
        if there > compared:
            report.diffs.append(RangeDiff(None, upper, f"the destination has {there} rows, the "
                                          f"source {compared}: {there - compared} not from it"))
    return report


def _verify(conn: Conn, job: store.JobRecord, chunk: int, src: Conn | None) -> VerifyReport:
    report = VerifyReport(job.id, job.kind)
    job_id = job.id
    if job.kind == "sql":
        report.unverifiable = "sql jobs run arbitrary statements; there is nothing to re-check"
        return report
    if job.kind == "move" and job.spec.source_dsn is not None:
        report.unverifiable = ("a cross-database move is checked by its delete phase, which "
                               "deletes a source range only when it equals the destination's; "
                               "verify that job")
        return report
    if job.kind == "update":
        moving = _unrecomputable(conn, [e for _, e in job.spec.set])
        if moving:
            report.unverifiable = (f"its SET calls {', '.join(moving)}: values that differ at "
                                   "every evaluation cannot be re-checked")
            return report
    prepared = prepare_stored(conn, job, explain=False, source=src)
    codec = KeyCodec(prepared.key_types)
    checker = _Checker(conn, prepared, src)
    ks = prepared.keyset
    read = src if src is not None else conn
    for slc in leases.slices(conn, job_id):
        end = codec.decode(slc.upper_bound if slc.done else slc.cursor)
        if end is None:
            continue
        lo = codec.decode(slc.lower_bound)
        size, failures = chunk, 0
        while True:
            nxt = ks.probe(read, lo, end, size - 1)
            hi = nxt if nxt is not None else end
            try:
                detail = _check_chunk(conn, checker, lo, hi)
            except psycopg.errors.SerializationFailure:
                # A check that locks what it reads (a merge's FOR SHARE read of its source)
                # cannot serialize when the application updated one of those rows since the
                # snapshot: read a smaller chunk, in a new snapshot.
                failures += 1
                if failures > 50:
                    raise
                size = max(1, size // 4)
                time.sleep(0.005 * min(failures, 10))
                continue
            failures, size = 0, min(chunk, size * 2)
            report.checked_chunks += 1
            if detail:
                report.diffs.append(RangeDiff(lo, hi, detail))
            if nxt is None or nxt == end:
                break
            lo = hi
        report.checked_rows += slc.rows_scanned
    return report


def _check_chunk(conn: Conn, checker: _Checker, lo: Any, hi: Any) -> str | None:
    """One snapshot per chunk: a copy's source and destination are read as of the same moment,
    so concurrent writes mirrored by a trigger do not look like differences."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SET LOCAL statement_timeout = '5min'")
        return checker.check(lo, hi)
