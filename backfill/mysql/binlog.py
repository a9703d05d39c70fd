"""The catch-up: changes made on the source since the copy's snapshot, read from the binary
log (row-based, with mysql-replication) and applied to PostgreSQL in batches, with the new
binlog position committed in the same transaction.

A batch gathers whole source transactions (it ends only at a commit: an ``XidEvent``, or a
``COMMIT`` query for non-transactional tables), coalesces them per key (the last image wins:
an upsert of the full row, or a delete; an update that changes the key is a delete of the old
key and an upsert of the new one), then runs one multi-row DELETE and one multi-row
``INSERT … ON CONFLICT (key) DO UPDATE`` per table (chunked under PostgreSQL's parameter
limit), and moves each table's position by compare-and-set. Replaying an event twice gives
the same row, so a kill between the apply and the commit, or a rerun from an older position,
is harmless: the apply is idempotent, the position exact.

The catch-up runs after the copy of each table is done (it refuses earlier): the copy's rows
are at least as new as the snapshot, and the replay from the snapshot's position brings them
to the source's current state.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from backfill.core.db import connect as pg_connect
from backfill.core.errors import BackfillError, InvalidInput
from backfill.mysql.copy import (
    CHECKPOINT_TABLE,
    OWNING_JOB_STATES,
    BinlogPosition,
    MoveState,
    check_source,
    current_position,
    read_state,
    refusal_error,
)
from backfill.mysql.errors import SourceNotReady
from backfill.mysql.model import TablePlan
from backfill.mysql.source import MySQLSource, Outage, connect, connection_lost, query
from backfill.mysql.values import Refusal, RowConverter

#: PostgreSQL's limit on a statement's parameters.
MAX_PARAMS = 65_535


class SourceSchemaChanged(BackfillError):
    """Raised by the catch-up when the binlog holds DDL on a table being moved (ALTER, DROP,
    RENAME, TRUNCATE): the applied position stays before it; re-plan the table."""


@dataclass(frozen=True)
class Lag:
    """How far the destination is behind the source, for the tables given: ``events`` row
    changes not applied yet, ``seconds`` since the oldest of them was written on the source
    (0 when none)."""

    seconds: float
    events: int
    applied: BinlogPosition
    source: BinlogPosition


@dataclass(frozen=True)
class CatchUpResult:
    events: int          # row changes read and applied (before coalescing)
    rows_written: int    # rows upserted or deleted (after coalescing)
    batches: int
    position: BinlogPosition


@dataclass
class _Pending:
    """One table's coalesced changes: key → full row (upsert) or None (delete)."""

    plan: TablePlan
    converter: RowConverter
    changes: dict[tuple[Any, ...], list[Any] | None] = field(default_factory=dict)
    events: int = 0

    def key_of(self, row: list[Any]) -> tuple[Any, ...]:
        return tuple(row[i] for i in self.plan.key_positions)

    def convert(self, values: dict[str, Any], none_sources: dict[str, str]) -> list[Any]:
        """A binlog row image in plan order, converted. The reader gives None for NULL and
        for other things, which ``none_sources`` tells apart."""
        for name, why in none_sources.items():
            if why == "empty set":
                values = {**values, name: ""}
            elif why in ("cols bitmap", "same with before values"):
                raise SourceNotReady(
                    f"{self.plan.source.name}.{name} is missing from a binlog row image "
                    f"({why}): the source needs binlog_row_image=FULL and no partial JSON "
                    "updates (binlog_row_value_options='')")
        names = [c.source.name for c in self.plan.columns]
        if names[0] not in values and "UNKNOWN_COL0" in values:
            # No column names in the binlog (row metadata not FULL): by position, so the
            # image must have the planned number of columns (else a column was added or
            # dropped, and positions no longer mean the planned columns).
            if len(values) != len(names):
                raise SourceSchemaChanged(
                    f"{self.plan.source.name}: a binlog row has {len(values)} columns, the "
                    f"plan {len(names)}: the table changed since it was planned")
            ordered = [values.get(f"UNKNOWN_COL{i}") for i in range(len(names))]
        else:
            try:
                ordered = [values[n] for n in names]
            except KeyError as exc:
                raise SourceSchemaChanged(
                    f"{self.plan.source.name}: a binlog row has no column {exc.args[0]}: the "
                    "table changed since it was planned") from None
        try:
            return self.converter.convert(ordered)
        except Refusal as r:
            key = [ordered[i] for i in self.plan.key_positions]
            raise refusal_error(self.plan, key, r) from None


def ready_state(pg: Any, plan: TablePlan) -> MoveState:
    """The table's checkpoint, if its copy is done (a ``backfill mysql copy`` finished, or
    the copy job that recorded it succeeded, with the plan the catch-up uses): else
    :class:`InvalidInput` saying what to do first."""
    where = f"{plan.schema}.{plan.name}"
    state = read_state(pg, plan)
    if state is None:
        raise InvalidInput(
            f"{where}: no copy recorded a binlog position to catch up from: neither a copy "
            "job (`backfill enqueue --kind copy --source mysql://…`, then `backfill run`; the "
            "position is recorded when it starts) nor `backfill mysql copy`")
    if state.job_id is not None:
        if state.job_state != "succeeded":
            then = (f" (`backfill run {state.job_id}`)" if state.job_state in OWNING_JOB_STATES
                    else "; copy the table again with a new job")
            raise InvalidInput(
                f"{where}: copy job {state.job_id} is {state.job_state or 'gone'}; the "
                f"catch-up starts once it has succeeded{then}")
        _check_job_plan(pg, plan, state.job_id)
    elif not state.copy_done:
        raise InvalidInput(f"{where}: the copy is not done; the catch-up starts after it")
    return state


def _check_job_plan(pg: Any, plan: TablePlan, job_id: int) -> None:
    """The catch-up must convert as the job did: same key, same column types."""
    from backfill.state import store

    stored = store.get_job(pg, job_id).spec.source_plan or {}
    planned = ([(c["name"], c["type"]) for c in stored.get("columns", [])],
               list(stored.get("key", [])))
    mine = ([(c.name, c.pg_type) for c in plan.columns], list(plan.key))
    if stored and planned != mine:
        differ = sorted(f"{n} {t}" for n, t in set(planned[0]) - set(mine[0]))
        raise InvalidInput(
            f"{plan.schema}.{plan.name}: the catch-up plans the table differently from copy job "
            f"{job_id} ({', '.join(differ) or 'the key'} there): give it the job's --cast "
            f"options ({', '.join(store.get_job(pg, job_id).spec.casts) or 'none'})")


_DDL = re.compile(r"(ALTER|DROP|RENAME|TRUNCATE|CREATE)\b", re.I)
#: What may come before a statement's verb: whitespace, ``/* ... */`` comments (a tool's tag,
#: ``/* gh-ost */``), ``-- ...`` and ``# ...`` lines, and the opener of an executable
#: comment (``/*!40101 ALTER ...``, ``/*M!100100 ...``), whose text the server runs.
_LEADING = re.compile(r"(?:\s+|/\*(?![M]?!)[\s\S]*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)"
                      r"|/\*M?!\d*)*")
_IDENT = r"(?:`(?:[^`]|``)+`|[\w$]+)"


def _statement(query_text: str) -> str:
    """The statement without the comments and whitespace before it."""
    return query_text[_LEADING.match(query_text).end():]   # type: ignore[union-attr]


def _is_ddl(query_text: str) -> bool:
    return _DDL.match(_statement(query_text)) is not None


def _unquote(ident: str) -> str:
    return ident[1:-1].replace("``", "`") if ident.startswith("`") else ident


def _mentions(query_text: str, table: str, database: str | None = None,
              session: str = "") -> bool:
    """Whether the statement names ``table`` of ``database``: qualified with it (whatever
    the issuing session's default database), or unqualified from a session whose default
    database is it (or none: said conservatively). Without ``database``: any mention."""
    name = "(?:`" + re.escape(table.replace("`", "``")) + "`|" + re.escape(table) + ")"
    pattern = r"(?<![\w$.`])(?:(" + _IDENT + r")\s*\.\s*)?" + name + r"(?![\w$`])"
    for m in re.finditer(pattern, query_text, re.I):
        if database is None:
            return True
        qualifier = m.group(1)
        where = _unquote(qualifier) if qualifier is not None else session
        if (where == "" and qualifier is None) or where.lower() == database.lower():
            return True
    return False


class CatchUp:
    """One catch-up session over ``plans`` (tables of one source database)."""

    def __init__(self, source: MySQLSource, pg: Any, plans: Sequence[TablePlan], *,
                 server_id: int | None = None) -> None:
        if not plans:
            raise InvalidInput("no table to catch up")
        self.source = source
        self.pg = pg
        self.plans = list(plans)
        self.by_name = {p.source.name: p for p in self.plans}
        self.server_id = server_id or random.randint(1 << 30, (1 << 32) - 2)
        self.states: dict[str, MoveState] = {}
        for plan in self.plans:
            self.states[plan.source.name] = ready_state(pg, plan)

    def start(self) -> BinlogPosition:
        return min(s.applied for s in self.states.values())

    @contextmanager
    def stream(self, start: BinlogPosition, *, blocking: bool,
               heartbeat: float | None = None) -> Iterator[Any]:
        from pymysqlreplication import BinLogStreamReader  # type: ignore[import-untyped]
        from pymysqlreplication.event import (  # type: ignore[import-untyped]
            HeartbeatLogEvent,
            QueryEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import (  # type: ignore[import-untyped]
            DeleteRowsEvent,
            UpdateRowsEvent,
            WriteRowsEvent,
        )

        mconn = connect(self.source, raw=False)
        try:
            check_source(mconn)
            logs = {str(r[0]) for r in query(mconn, "SHOW BINARY LOGS")}
        finally:
            mconn.close()
        if start.file not in logs:
            raise SourceNotReady(
                f"the source no longer has binlog {start.file} (purged): the catch-up cannot "
                "continue; keep binlogs longer (binlog_expire_logs_seconds) and copy again")
        events = [WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, XidEvent, QueryEvent]
        if blocking:
            events.append(HeartbeatLogEvent)
        settings = self.source.connection_settings()
        settings["database"] = self.source.database
        reader = BinLogStreamReader(
            connection_settings=settings, server_id=self.server_id, log_file=start.file,
            log_pos=start.pos, resume_stream=True, blocking=blocking, only_events=events,
            only_schemas=[self.source.database], only_tables=list(self.by_name),
            # is_mariadb=False on MariaDB too: the library's MariaDB mode starts from the first
            # binlog, ignoring the position, unless given a GTID; the classic dump by file and
            # position works on both servers.
            is_mariadb=False, enable_logging=False,
            slave_heartbeat=heartbeat)
        try:
            yield reader
        finally:
            reader.close()

    def _applied(self, name: str) -> BinlogPosition:
        return self.states[name].applied

    def run(self, *, batch_events: int = 10_000, batch_seconds: float = 1.0,
            follow: bool = False, stop: Callable[[], bool] | None = None,
            on_batch: Callable[[CatchUpResult], None] | None = None) -> CatchUpResult:
        """Apply events from the applied position to the end of the binlog (``follow``:
        until ``stop()`` is true, waiting for new events)."""
        from pymysqlreplication.event import (
            HeartbeatLogEvent,
            QueryEvent,
            XidEvent,
        )
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent

        pending = {n: _Pending(p, RowConverter(p.columns)) for n, p in self.by_name.items()}
        totals = {"events": 0, "rows": 0, "batches": 0}
        boundary: BinlogPosition | None = None
        last_at: dt.datetime | None = None
        first_pending = 0.0
        position = self.start()

        def flush() -> None:
            nonlocal first_pending
            if boundary is None:
                return
            rows = self._apply(list(pending.values()), boundary, last_at)
            totals["rows"] += rows
            totals["batches"] += 1
            for p in pending.values():
                totals["events"] += p.events
                p.changes.clear()
                p.events = 0
            first_pending = 0.0
            if on_batch is not None:
                on_batch(CatchUpResult(totals["events"], totals["rows"], totals["batches"],
                                       boundary))

        with self.stream(position, blocking=follow, heartbeat=1.0 if follow else None) as rd:
            for ev in rd:
                pos = BinlogPosition(rd.log_file, rd.log_pos)
                if isinstance(ev, XidEvent) or (
                        isinstance(ev, QueryEvent) and _query(ev).upper() == "COMMIT"):
                    boundary = pos
                    last_at = dt.datetime.fromtimestamp(ev.timestamp, dt.UTC)
                    n = sum(p.events for p in pending.values())
                    if n >= batch_events or (
                            n and time.monotonic() - first_pending >= batch_seconds):
                        flush()
                elif isinstance(ev, QueryEvent):
                    if pos > position:
                        self._check_ddl(ev, pos)
                elif isinstance(ev, HeartbeatLogEvent):
                    if any(p.events for p in pending.values()):
                        flush()
                else:
                    table = pending.get(ev.table)
                    if table is None or pos <= self._applied(ev.table):
                        continue
                    if not first_pending:
                        first_pending = time.monotonic()
                    self._add(table, ev, isinstance(ev, UpdateRowsEvent),
                              isinstance(ev, DeleteRowsEvent))
                if stop is not None and stop():
                    break
            flush()
        return CatchUpResult(totals["events"], totals["rows"], totals["batches"],
                             min(s.applied for s in self.states.values()))

    def _check_ddl(self, ev: Any, pos: BinlogPosition) -> None:
        text = _query(ev)
        schema = ev.schema.decode() if isinstance(ev.schema, bytes) else (ev.schema or "")
        if _is_ddl(text) and any(_mentions(_statement(text), name, self.source.database,
                                           schema) for name in self.by_name):
            raise SourceSchemaChanged(
                f"the source ran DDL on a table being moved, at {pos}: {text[:200]!r}; the "
                "applied position stays before it")

    @staticmethod
    def _add(p: _Pending, ev: Any, update: bool, delete: bool) -> None:
        for row in ev.rows:
            p.events += 1
            if update:
                before = p.convert(row["before_values"], row.get("before_none_sources", {}))
                after = p.convert(row["after_values"], row.get("after_none_sources", {}))
                old, new = p.key_of(before), p.key_of(after)
                if old != new:
                    p.changes[old] = None
                p.changes[new] = after
            elif delete:
                values = p.convert(row["values"], row.get("none_sources", {}))
                p.changes[p.key_of(values)] = None
            else:
                values = p.convert(row["values"], row.get("none_sources", {}))
                p.changes[p.key_of(values)] = values

    def _apply(self, pending: list[_Pending], boundary: BinlogPosition,
               last_at: dt.datetime | None) -> int:
        written = 0
        with self.pg.transaction(), self.pg.cursor() as cur:
            for p in pending:
                written += apply_changes(cur, p.plan, p.changes)
            for p in pending:
                name = p.plan.source.name
                prev = self.states[name].applied
                if boundary <= prev:
                    continue
                cur.execute(sql.SQL(
                    "UPDATE {} SET applied_file = %s, applied_pos = %s,"
                    " applied_event_at = coalesce(%s, applied_event_at),"
                    " events_applied = events_applied + %s, updated_at = now()"
                    " WHERE dest_schema = %s AND dest_table = %s AND applied_file = %s"
                    " AND applied_pos = %s").format(sql.Identifier(CHECKPOINT_TABLE)),
                    (boundary.file, boundary.pos, last_at, p.events, p.plan.schema,
                     p.plan.name, prev.file, prev.pos))
                if cur.rowcount != 1:
                    from backfill.mysql.errors import CheckpointConflict
                    raise CheckpointConflict(
                        f"the catch-up position of {p.plan.schema}.{p.plan.name} moved under "
                        "this batch (another catch-up?): nothing committed")
        for p in pending:
            st = self.states[p.plan.source.name]
            if boundary > st.applied:
                self.states[p.plan.source.name] = MoveState(
                    **{**st.__dict__, "applied": boundary,
                       "events_applied": st.events_applied + p.events})
        return written


def apply_changes(cur: Any, plan: TablePlan,
                  changes: Mapping[tuple[Any, ...], Sequence[Any] | None]) -> int:
    """Coalesced changes (key → full converted row, or None to delete) as one multi-row
    DELETE and one multi-row upsert, in the caller's transaction; returns the rows touched.
    Deletes go first: a key deleted and another inserted cannot collide."""
    deletes = [k for k, v in changes.items() if v is None]
    upserts = [v for v in changes.values() if v is not None]
    return _delete(cur, plan, deletes) + _upsert(cur, plan, upserts)


def _query(ev: Any) -> str:
    q = ev.query
    return (q.decode("utf-8", "replace") if isinstance(q, bytes | bytearray) else str(q)).strip()


def _chunks(items: Sequence[Any], width: int) -> Iterator[Sequence[Any]]:
    step = max(1, MAX_PARAMS // max(1, width))
    for i in range(0, len(items), step):
        yield items[i:i + step]


def _delete(cur: Any, plan: TablePlan, keys: Sequence[tuple[Any, ...]]) -> int:
    if not keys:
        return 0
    key_cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.key_casts)
    n = 0
    for chunk in _chunks(keys, len(plan.key)):
        row = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(plan.key)))
        cur.execute(sql.SQL("DELETE FROM {} WHERE ({}) IN ({})").format(
            sql.Identifier(plan.schema, plan.name), key_cols,
            sql.SQL(", ").join([row] * len(chunk))),
            [v for k in chunk for v in k])
        n += cur.rowcount
    return n


def _upsert(cur: Any, plan: TablePlan, rows: Sequence[Sequence[Any]]) -> int:
    if not rows:
        return 0
    cols = [sql.Identifier(c.name) for c in plan.columns]
    keyset = {c.name for c in plan.key_casts}
    others = [sql.Identifier(c.name) for c in plan.columns if c.name not in keyset]
    action = (sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
        sql.SQL("{} = EXCLUDED.{}").format(c, c) for c in others)) if others
        else sql.SQL("DO NOTHING"))
    one = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(cols)))
    n = 0
    for chunk in _chunks(rows, len(cols)):
        cur.execute(sql.SQL("INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) {}").format(
            sql.Identifier(plan.schema, plan.name), sql.SQL(", ").join(cols),
            sql.SQL(", ").join([one] * len(chunk)),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.key_casts), action),
            [v for r in chunk for v in r])
        n += len(chunk)
    return n


def catch_up(source: MySQLSource, dest_dsn: str, plans: Sequence[TablePlan], *,
             batch_events: int = 10_000, batch_seconds: float = 1.0, follow: bool = False,
             stop: Callable[[], bool] | None = None, retry_for: float = 120.0,
             server_id: int | None = None,
             on_batch: Callable[[CatchUpResult], None] | None = None) -> CatchUpResult:
    """Apply the binlog to the tables of ``plans`` from their applied positions: to the end
    of the binlog, or with ``follow`` until ``stop()``. Lost connections to either server are
    retried from the committed position while they fail for less than ``retry_for`` s."""
    outage = Outage(retry_for)
    done = CatchUpResult(0, 0, 0, BinlogPosition("", 0))
    while True:
        try:
            with pg_connect(dest_dsn, application_name="backfill-mysql-catchup") as pg:
                session = CatchUp(source, pg, plans, server_id=server_id)

                def seen(res: CatchUpResult) -> None:
                    outage.over()
                    if on_batch is not None:
                        on_batch(res)

                res = session.run(batch_events=batch_events, batch_seconds=batch_seconds,
                                  follow=follow, stop=stop, on_batch=seen)
                return CatchUpResult(done.events + res.events,
                                     done.rows_written + res.rows_written,
                                     done.batches + res.batches, res.position)
        except Exception as exc:
            if not connection_lost(exc) or not outage.wait():
                raise


def measure_lag(source: MySQLSource, dest_dsn: str, plans: Sequence[TablePlan]) -> Lag:
    """Read (not apply) the binlog from the applied positions to its end: the row changes
    the tables have not received, and the age of the oldest."""
    from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

    with pg_connect(dest_dsn, application_name="backfill-mysql-lag") as pg:
        session = CatchUp(source, pg, plans)
    start = session.start()
    mconn = connect(source, raw=False)
    try:
        end = current_position(mconn)
    finally:
        mconn.close()
    events, oldest = 0, None
    with session.stream(start, blocking=False) as rd:
        for ev in rd:
            if not isinstance(ev, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                continue
            pos = BinlogPosition(rd.log_file, rd.log_pos)
            if ev.table not in session.by_name or pos <= session._applied(ev.table):
                continue
            if end < pos:
                break
            events += len(ev.rows)
            oldest = ev.timestamp if oldest is None else min(oldest, ev.timestamp)
    seconds = max(0.0, time.time() - oldest) if oldest is not None else 0.0
    return Lag(seconds=seconds, events=events, applied=start, source=end)
