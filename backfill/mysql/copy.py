"""The copy: MySQL rows in keyset batches into PostgreSQL, each batch's rows and its
checkpoint committed in one destination transaction.

A move starts by recording, in ``backfill_mysql_checkpoint`` (in the destination), the binlog
position of a consistent snapshot taken before the first read: every change the batches do
not see comes after it, and the catch-up (:mod:`backfill.mysql.binlog`) replays from there.
Then each batch reads ``WHERE key > cursor ORDER BY key LIMIT n`` from MySQL, converts the
rows (exactly, or :class:`ValueRefused` with the row's key), and in one PostgreSQL
transaction COPYs them and moves the cursor by compare-and-set from the value it read: a kill
anywhere loses nothing and repeats nothing, and two runners on one table cannot both commit
a batch. A lost connection to either server is retried, reconnecting, for ``retry_for``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import sql

from backfill.core.db import connect as pg_connect
from backfill.core.errors import InvalidInput, TableNotFound
from backfill.job.states import ACTIVE, JobState
from backfill.mysql.errors import CheckpointConflict, SourceNotReady, ValueRefused
from backfill.mysql.model import TablePlan
from backfill.mysql.source import (
    MySQLSource,
    Outage,
    connect,
    connection_lost,
    quote_name,
)
from backfill.mysql.values import RawRowConverter, Refusal, source_reader

CHECKPOINT_TABLE = "backfill_mysql_checkpoint"

_CREATE_CHECKPOINT = sql.SQL("""
CREATE TABLE IF NOT EXISTS {} (
    dest_schema text NOT NULL,
    dest_table text NOT NULL,
    source text NOT NULL,                 -- database.table on the MySQL side
    key_columns text[] NOT NULL,
    last_key jsonb,                       -- NULL: no batch yet
    copy_done boolean NOT NULL DEFAULT false,
    rows_copied bigint NOT NULL DEFAULT 0,
    start_file text NOT NULL,             -- the binlog position of the copy's snapshot
    start_pos bigint NOT NULL,
    applied_file text NOT NULL,           -- the catch-up's position (starts at start)
    applied_pos bigint NOT NULL,
    applied_event_at timestamptz,         -- source time of the last applied event
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    job_id bigint,                        -- the copy job whose copy this is (NULL: mysql copy)
    PRIMARY KEY (dest_schema, dest_table)
)""").format(sql.Identifier(CHECKPOINT_TABLE))

#: A checkpoint table created before the copy jobs recorded their position lacks job_id.
_ADD_JOB_ID = sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS job_id bigint").format(
    sql.Identifier(CHECKPOINT_TABLE))

#: The states in which a copy job still owns its table's checkpoint row (a failed job can be
#: retried from its checkpoint); a succeeded or cancelled job's row goes to a newer job.
OWNING_JOB_STATES = ACTIVE | {JobState.FAILED}


@dataclass(frozen=True, order=True)
class BinlogPosition:
    file: str
    pos: int

    def __str__(self) -> str:
        return f"{self.file}:{self.pos}"


@dataclass(frozen=True)
class MoveState:
    """One row of ``backfill_mysql_checkpoint``. A row a copy job wrote (``job_id``) holds
    only the binlog positions: the copy's progress is the job's, and ``copy_done`` says
    whether the job has succeeded (``job_state``)."""

    source: str
    key_columns: tuple[str, ...]
    last_key: tuple[Any, ...] | None
    copy_done: bool
    rows_copied: int
    start: BinlogPosition
    applied: BinlogPosition
    applied_event_at: dt.datetime | None
    events_applied: int
    job_id: int | None = None
    job_state: str | None = None     # the job's state, when a job copied the table


@dataclass(frozen=True)
class CopyResult:
    rows: int            # copied by this call
    batches: int
    seconds: float
    state: MoveState


# -- cursor values in the checkpoint ------------------------------------------------------------

def encode_key(values: Sequence[Any]) -> list[list[str]]:
    """Key values (canonical source values) as JSON that round-trips their type."""
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            raise InvalidInput(f"a key value cannot be {v!r}")
        if isinstance(v, int):
            out.append(["i", str(v)])
        elif isinstance(v, Decimal):
            out.append(["n", str(v)])
        elif isinstance(v, str):
            out.append(["s", v])
        elif isinstance(v, bytes | bytearray):
            out.append(["b", bytes(v).hex()])
        elif isinstance(v, dt.datetime):
            out.append(["t", v.replace(tzinfo=None).isoformat()])  # UTC wall time for TIMESTAMP
        elif isinstance(v, dt.date):
            out.append(["d", v.isoformat()])
        else:
            raise InvalidInput(f"a key value of type {type(v).__name__} is not supported")
    return out


def decode_key(data: Sequence[Sequence[str]]) -> tuple[Any, ...]:
    readers: dict[str, Callable[[str], Any]] = {
        "i": int, "n": Decimal, "s": str, "b": bytes.fromhex,
        "t": dt.datetime.fromisoformat, "d": dt.date.fromisoformat}
    return tuple(readers[tag](text) for tag, text in data)


# -- the source's binlog --------------------------------------------------------------------------

def _variables(mconn: Any, *names: str) -> dict[str, str | None]:
    with mconn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ("
                    + ", ".join(["%s"] * len(names)) + ")", names)
        found = {_s(k).lower(): _s(v) for k, v in cur.fetchall()}
    return {n: found.get(n) for n in names}


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)


def check_source(mconn: Any) -> None:
    """Refuse (:class:`SourceNotReady`) a server whose binlog cannot feed the catch-up: off,
    not ROW, images not FULL, or (where the server has it) row metadata not FULL."""
    v = _variables(mconn, "log_bin", "binlog_format", "binlog_row_image", "binlog_row_metadata")
    if (v["log_bin"] or "").upper() not in ("ON", "1"):
        raise SourceNotReady("the source's binary log is off: start it with log_bin "
                             "(and binlog_format=ROW, binlog_row_image=FULL)")
    if (v["binlog_format"] or "").upper() != "ROW":
        raise SourceNotReady(f"the source's binlog_format is {v['binlog_format']}, not ROW: "
                             "SET GLOBAL binlog_format = 'ROW' (and in the server's config)")
    if (v["binlog_row_image"] or "FULL").upper() != "FULL":
        raise SourceNotReady(f"the source's binlog_row_image is {v['binlog_row_image']}, not "
                             "FULL: the catch-up needs whole rows")
    if v["binlog_row_metadata"] is not None and v["binlog_row_metadata"].upper() != "FULL":
        raise SourceNotReady(f"the source's binlog_row_metadata is {v['binlog_row_metadata']},"
                             " not FULL: the catch-up needs column names and signedness")


def snapshot_position(mconn: Any) -> BinlogPosition:
    """The binlog position of a consistent snapshot: MariaDB reports the exact one for
    ``START TRANSACTION WITH CONSISTENT SNAPSHOT``; elsewhere the current position, read
    inside the snapshot (changes between the two are replayed, which is harmless)."""
    with mconn.cursor() as cur:
        cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        try:
            cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%%'")
            status = {_s(k).lower(): _s(v) for k, v in cur.fetchall()}
            if status.get("binlog_snapshot_file"):
                return BinlogPosition(status["binlog_snapshot_file"],
                                      int(status["binlog_snapshot_position"]))
            return current_position(mconn)
        finally:
            cur.execute("COMMIT")


def current_position(mconn: Any) -> BinlogPosition:
    with mconn.cursor() as cur:
        try:
            cur.execute("SHOW BINARY LOG STATUS")      # MySQL 8.4+
        except Exception:
            cur.execute("SHOW MASTER STATUS")
        row = cur.fetchone()
    if not row:
        raise SourceNotReady("the source's binary log is off")
    return BinlogPosition(_s(row[0]), int(row[1]))


# -- the checkpoint -----------------------------------------------------------------------------

def _ckpt() -> sql.Identifier:
    return sql.Identifier(CHECKPOINT_TABLE)


def ensure_checkpoint_table(pg: Any) -> None:
    pg.execute(_CREATE_CHECKPOINT)
    # Only when missing: the ALTER's lock, inside a job's range snapshot, would hold up the
    # catch-ups of other tables until that transaction ends.
    if pg.execute("SELECT NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = %s::regclass"
                  " AND attname = 'job_id' AND NOT attisdropped)",
                  (CHECKPOINT_TABLE,)).fetchone()[0]:
        pg.execute(_ADD_JOB_ID)


def _job_state(pg: Any, job_id: int) -> str | None:
    from backfill.state import store

    jobs = store.get_jobs(pg, [job_id])
    return str(jobs[0].state) if jobs else None


def read_state(pg: Any, plan: TablePlan) -> MoveState | None:
    """The table's checkpoint, or None (no move started, or no checkpoint table yet)."""
    if pg.execute("SELECT to_regclass(%s)", (CHECKPOINT_TABLE,)).fetchone()[0] is None:
        return None
    return _state_where(pg, sql.SQL("dest_schema = %s AND dest_table = %s"),
                        (plan.schema, plan.name))


def read_job_state(pg: Any, job_id: int) -> tuple[str, str, MoveState] | None:
    """The checkpoint row a copy job wrote: (destination schema, table, state), or None."""
    if pg.execute("SELECT to_regclass(%s)", (CHECKPOINT_TABLE,)).fetchone()[0] is None:
        return None
    row = pg.execute(sql.SQL(
        "SELECT dest_schema, dest_table FROM {} c"
        " WHERE (to_jsonb(c) ->> 'job_id')::bigint = %s").format(_ckpt()), (job_id,)).fetchone()
    if row is None:
        return None
    state = _state_where(pg, sql.SQL("dest_schema = %s AND dest_table = %s"), (row[0], row[1]))
    return (row[0], row[1], state) if state is not None else None


def _state_where(pg: Any, where: sql.Composable, params: Sequence[Any]) -> MoveState | None:
    # job_id read through to_jsonb: a table of an older version has no such column yet.
    row = pg.execute(sql.SQL(
        "SELECT source, key_columns, last_key, copy_done, rows_copied, start_file, start_pos,"
        " applied_file, applied_pos, applied_event_at, events_applied,"
        " (to_jsonb(c) ->> 'job_id')::bigint FROM {} c WHERE {}").format(_ckpt(), where),
        params).fetchone()
    if row is None:
        return None
    job_id = row[11]
    job_state = _job_state(pg, job_id) if job_id is not None else None
    return MoveState(source=row[0], key_columns=tuple(row[1]),
                     last_key=decode_key(row[2]) if row[2] is not None else None,
                     copy_done=row[3] if job_id is None else job_state == "succeeded",
                     rows_copied=row[4],
                     start=BinlogPosition(row[5], row[6]),
                     applied=BinlogPosition(row[7], row[8]), applied_event_at=row[9],
                     events_applied=row[10], job_id=job_id, job_state=job_state)


def _source_name(plan: TablePlan) -> str:
    return f"{plan.source.database}.{plan.source.name}"


def start_move(pg: Any, mconn: Any, plan: TablePlan) -> MoveState:
    """The table's checkpoint, created at the first call (with the snapshot's binlog
    position) and checked against the plan at the next ones."""
    ensure_checkpoint_table(pg)
    state = read_state(pg, plan)
    if state is None:
        check_source(mconn)
        qualified = sql.Identifier(plan.schema, plan.name).as_string(None)
        if pg.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()[0] is None:
            raise TableNotFound(f"the destination table {plan.schema}.{plan.name} does not "
                                "exist: create it first (convert-schema --apply)")
        has_rows = pg.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(
            sql.Identifier(plan.schema, plan.name))).fetchone()[0]
        if has_rows:
            raise InvalidInput(f"{plan.schema}.{plan.name} already holds rows but no copy "
                               "checkpoint: the copy would duplicate them; empty it first")
        pos = snapshot_position(mconn)
        pg.execute(sql.SQL(
            "INSERT INTO {} (dest_schema, dest_table, source, key_columns, start_file,"
            " start_pos, applied_file, applied_pos) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING").format(_ckpt()),
            (plan.schema, plan.name, _source_name(plan), list(plan.key), pos.file, pos.pos,
             pos.file, pos.pos))
        state = read_state(pg, plan)
        assert state is not None
    if state.job_id is not None:
        raise InvalidInput(
            f"{plan.schema}.{plan.name} is copied by job {state.job_id} ({state.job_state}): "
            "`backfill run` it; `backfill mysql copy` does not take over a job's table")
    if state.source != _source_name(plan) or state.key_columns != tuple(plan.key):
        raise InvalidInput(
            f"{plan.schema}.{plan.name} is being moved from {state.source} on key "
            f"({', '.join(state.key_columns)}), not from {_source_name(plan)} on "
            f"({', '.join(plan.key)})")
    return state


def record_job_start(pg: Any, mconn: Any, plan: TablePlan, job_id: int) -> str | None:
    """Record, in ``pg``'s open transaction (the one that snapshots the job's range, before
    its first batch and before that snapshot's read of the source), the binlog position of a
    consistent snapshot as the catch-up's start for the table a copy job copies. Every batch
    reads the source later, so it sees at least every change before that position, and the
    catch-up replays every change after it (upserts and deletes of whole rows by key, which
    give the same row whether or not the batch had already seen the change).

    Returns None when recorded (or already recorded for this job), or why not (the job then
    copies without a catch-up): the source's binlog cannot feed one, or the table's row
    belongs to ``backfill mysql copy`` or to another job that may still go on."""
    ensure_checkpoint_table(pg)
    state = read_state(pg, plan)
    if state is not None and state.job_id == job_id:
        return None
    if state is not None and state.job_id is None:
        return (f"{plan.schema}.{plan.name} has a `backfill mysql copy` checkpoint: that copy "
                "owns the table's catch-up position")
    if state is not None and state.job_state in OWNING_JOB_STATES:
        return (f"job {state.job_id} ({state.job_state}) owns {plan.schema}.{plan.name}'s "
                "catch-up position")
    if state is not None and pg.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(
            sql.Identifier(plan.schema, plan.name))).fetchone()[0]:
        # Keep the earlier copy's position while its rows are there (this job's COPY would
        # collide with them): only a new copy into an emptied table takes the row over.
        return (f"{plan.schema}.{plan.name} holds the rows of job {state.job_id}'s copy, "
                "whose catch-up position stays: empty the table before copying it again")
    try:
        check_source(mconn)
    except SourceNotReady as exc:
        return str(exc)
    pos = snapshot_position(mconn)
    cur = pg.execute(sql.SQL(
        "INSERT INTO {} AS c (dest_schema, dest_table, source, key_columns, start_file,"
        " start_pos, applied_file, applied_pos, job_id, copy_done)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, false)"
        " ON CONFLICT (dest_schema, dest_table) DO UPDATE SET source = EXCLUDED.source,"
        " key_columns = EXCLUDED.key_columns, last_key = NULL, rows_copied = 0,"
        " start_file = EXCLUDED.start_file, start_pos = EXCLUDED.start_pos,"
        " applied_file = EXCLUDED.applied_file, applied_pos = EXCLUDED.applied_pos,"
        " applied_event_at = NULL, events_applied = 0, job_id = EXCLUDED.job_id,"
        " updated_at = now() WHERE c.job_id IS NOT DISTINCT FROM %s").format(_ckpt()),
        (plan.schema, plan.name, _source_name(plan), list(plan.key), pos.file, pos.pos,
         pos.file, pos.pos, job_id, state.job_id if state is not None else -1))
    if cur.rowcount != 1:   # a `mysql copy` or another job wrote the row meanwhile
        return (f"{plan.schema}.{plan.name}'s catch-up position was taken meanwhile by "
                "another copy")
    return None


# -- batches --------------------------------------------------------------------------------------

def _select(plan: TablePlan, after: bool, upto: bool = False) -> str:
    """The batch's SELECT. Composite keys are compared as ``k1 >= a AND (k1 > a OR (k1 = a
    AND k2 > b) ...)``, which every MySQL version turns into one index range. ``upto``: and
    at most a key (a job's range: ``(k1, k2) <= (c, d)``, a filter on that range)."""
    cols = ", ".join(quote_name(c.source.name) for c in plan.columns)
    keys = [quote_name(k) for k in plan.key]
    table = f"{quote_name(plan.source.database)}.{quote_name(plan.source.name)}"
    where = ""
    if after:
        ors = []
        for i, k in enumerate(keys):
            eqs = [f"{p} = %s" for p in keys[:i]]
            ors.append("(" + " AND ".join([*eqs, f"{k} > %s"]) + ")")
        where = f" WHERE {keys[0]} >= %s AND ({' OR '.join(ors)})"
    if upto:
        row = f"({', '.join(keys)}) <= ({', '.join(['%s'] * len(keys))})"
        where = f"{where} AND {row}" if where else f" WHERE {row}"
    return (f"SELECT {cols} FROM {table}{where} "   # noqa: S608 - names quoted by quote_name
            f"ORDER BY {', '.join(keys)} LIMIT %s")


def _params(last: Sequence[Any] | None, limit: int,
            upper: Sequence[Any] | None = None) -> list[Any]:
    params: list[Any] = []
    if last is not None:
        params.append(last[0])
        for i in range(len(last)):
            params.extend(last[: i + 1])
    return [*params, *(upper or ()), limit]


def refusal_error(plan: TablePlan, key: Sequence[Any], r: Refusal) -> ValueRefused:
    column = getattr(r, "column", "?")
    shown = ", ".join(f"{k}={v!r}" for k, v in zip(plan.key, key, strict=True))
    return ValueRefused(
        f"{plan.source.name} row ({shown}), column {column}: {r.reason}; "
        f"--cast '{plan.source.name}.{column}={r.fix}' would move it")


def read_key(plan: TablePlan, raw: Sequence[Any]) -> tuple[Any, ...]:
    """The canonical key of a row whose key columns' raw values are ``raw`` (in key order);
    :class:`ValueRefused` for a zero date in a key column (``0000-00-00``, a zero month or
    day, which NOT NULL allows without NO_ZERO_DATE): it reads as no value, which neither
    orders a batch nor has a PostgreSQL date."""
    key = tuple(source_reader(c.source)(v) for c, v in zip(plan.key_casts, raw, strict=True))
    if None not in key:
        return key
    column = plan.key[key.index(None)]
    shown = ", ".join(f"{k}={_raw_text(v)}" for k, v in zip(plan.key, raw, strict=True))
    where = " AND ".join(f"{k} = {_raw_text(v)}" for k, v in zip(plan.key, raw, strict=True))
    raise ValueRefused(
        f"{plan.source.name} row ({shown}), column {column}: a zero date in a key column, "  # noqa: S608 - a message
        "which has no PostgreSQL date and cannot order the copy's batches; give the row a "
        f"real date on the source (UPDATE {plan.source.name} SET {column} = ... WHERE "
        f"{where}) or enqueue the job with another unique key (--key)")


def _raw_text(v: Any) -> str:
    """A raw key value as SQL shows it: text quoted, numbers bare."""
    if isinstance(v, bytes | bytearray):
        return repr(v.decode("utf-8", "replace"))
    return repr(v) if isinstance(v, str) else str(v)


class BatchReader:
    """Keyset batches from the source, as (raw rows, key of the last row)."""

    def __init__(self, mconn: Any, plan: TablePlan) -> None:
        self.mconn = mconn
        self.plan = plan
        self.converter = RawRowConverter(plan.columns)   # rows of a raw SELECT
        self._keys = [(i, source_reader(plan.columns[i].source)) for i in plan.key_positions]
        self._date_keys = [i for i in plan.key_positions
                           if plan.columns[i].source.data_type in ("date", "datetime",
                                                                   "timestamp")]
        self._first = _select(plan, after=False)
        self._next = _select(plan, after=True)
        self._upto = {after: _select(plan, after=after, upto=True) for after in (False, True)}

    def key_of(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """The row's key as canonical source values (what the next batch starts after);
        :class:`ValueRefused` for a zero date (:func:`read_key`)."""
        key = tuple(read(row[i]) for i, read in self._keys)
        if None in key:
            return read_key(self.plan, [row[i] for i, _ in self._keys])
        return key

    def read(self, last: Sequence[Any] | None, limit: int,
             upper: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Up to ``limit`` rows after ``last`` (None: from the first), in key order, and with
        ``upper`` at most that key."""
        if upper is not None:
            query = self._upto[last is not None]
        else:
            query = self._first if last is None else self._next
        with self.mconn.cursor() as cur:
            cur.execute(query, _params(last, limit, upper))
            return list(cur.fetchall())

    def convert(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        try:
            out = self.converter.convert_rows(rows)
        except Refusal as r:
            row = rows[r.row_index]  # type: ignore[attr-defined]
            raise refusal_error(self.plan, self.key_of(row), r) from None
        for i in self._date_keys:   # a zero date reads as None: refused, not a NULL key
            for raw, row in zip(rows, out, strict=True):
                if row[i] is None:
                    self.key_of(raw)
        return out


def _copy_sql(plan: TablePlan) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(plan.schema, plan.name),
        sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.columns))


def copy_rows(cur: Any, plan: TablePlan, rows: Sequence[Sequence[Any]]) -> None:
    """COPY converted rows into the destination table, in the caller's transaction (the
    engine's batch calls this, then commits its own checkpoint)."""
    if rows:
        with cur.copy(_copy_sql(plan)) as cp:
            for r in rows:
                cp.write_row(r)


def write_batch(pg: Any, plan: TablePlan, rows: Sequence[Sequence[Any]],
                before: tuple[Any, ...] | None, after: tuple[Any, ...] | None) -> None:
    """COPY ``rows`` and move the cursor from ``before`` to ``after`` (None: the copy is
    done) in one transaction; :class:`CheckpointConflict` if the cursor is not ``before``."""
    with pg.transaction(), pg.cursor() as cur:
        copy_rows(cur, plan, rows)
        prev = json.dumps(encode_key(before)) if before is not None else None
        if after is None:
            setting = sql.SQL("copy_done = true")
            params: tuple[Any, ...] = ()
        else:
            setting = sql.SQL("last_key = %s::jsonb")
            params = (json.dumps(encode_key(after)),)
        cur.execute(sql.SQL(
            "UPDATE {} SET {}, rows_copied = rows_copied + %s, updated_at = now()"
            " WHERE dest_schema = %s AND dest_table = %s AND NOT copy_done"
            " AND last_key IS NOT DISTINCT FROM %s::jsonb").format(_ckpt(), setting),
            (*params, len(rows), plan.schema, plan.name, prev))
        if cur.rowcount != 1:
            raise CheckpointConflict(
                f"the copy checkpoint of {plan.schema}.{plan.name} moved under this batch "
                "(another runner?): nothing committed")


def copy_table(source: MySQLSource, dest_dsn: str, plan: TablePlan, *,
               batch_size: int = 10_000, pause: float = 0.0, retry_for: float = 120.0,
               on_batch: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy the table of ``plan`` (created beforehand) until done, resuming from its
    checkpoint; safe to kill at any point and to run again. ``on_batch(rows, total)`` after
    each committed batch. Lost connections are retried, reconnecting, while each attempt
    fails for less than ``retry_for`` seconds in a row."""
    if batch_size < 1:
        raise InvalidInput("batch_size must be at least 1")
    t0 = time.monotonic()
    rows_done = batches = 0
    outage = Outage(retry_for)
    started = False      # before the first checkpoint read, nothing is retried: bad input
    while True:
        try:
            with pg_connect(dest_dsn, application_name="backfill-mysql-copy") as pg:
                mconn = connect(source)
                try:
                    state = start_move(pg, mconn, plan)
                    started = True
                    reader = BatchReader(mconn, plan)
                    last = state.last_key
                    total = state.rows_copied
                    # Read-ahead: the next batch is fetched (the server's scan and the
                    # network, outside the GIL) while this one is converted and written.
                    with ThreadPoolExecutor(1, thread_name_prefix="mysql-read") as pool:
                        ahead = None if state.copy_done else pool.submit(
                            reader.read, last, batch_size)
                        while ahead is not None:
                            raw = ahead.result()
                            done = len(raw) < batch_size
                            nxt = reader.key_of(raw[-1]) if raw else last
                            ahead = None if done else pool.submit(reader.read, nxt, batch_size)
                            rows = reader.convert(raw)
                            write_batch(pg, plan, rows, last, None if done and not raw else nxt)
                            outage.over()
                            rows_done += len(rows)
                            total += len(rows)
                            batches += 1
                            last = nxt
                            if on_batch is not None:
                                on_batch(len(rows), total)
                            if done and raw:   # marked done in its own batch: one CAS rule
                                write_batch(pg, plan, [], last, None)
                            if pause and not done:
                                time.sleep(pause)
                    final = read_state(pg, plan)
                    assert final is not None
                    return CopyResult(rows_done, batches, time.monotonic() - t0, final)
                finally:
                    mconn.close()
        except Exception as exc:
            if not started or not connection_lost(exc) or not outage.wait():
                raise
