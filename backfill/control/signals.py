"""Health signal collectors: the controller's I/O. Each returns :class:`~backfill.control.policy.Reading`
values; one that cannot be read returns ``value=None`` with the error (the policy fails closed).

Signals: lock waiters on a job's tables (and sessions blocked by the job's own backends),
physical replication lag (a heartbeat row written on the primary and read on each replica, plus
``pg_stat_replication``), WAL retained by logical slots, the oldest open transaction (and
prepared transaction), autovacuum on a job's table, and custom SQL probes.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill.control.policy import Limit, Reading
from backfill.core import sqltext
from backfill.core.catalog import Conn
from backfill.core.db import connect, redact_dsn, redact_text
from backfill.core.errors import InvalidFragment


@dataclass(frozen=True)
class Replica:
    name: str
    dsn: str

    def __repr__(self) -> str:
        return f"Replica({self.name!r}, {redact_dsn(self.dsn)!r})"


@dataclass(frozen=True)
class Probe:
    """An operator's SQL returning one number, compared with ``limit``."""

    name: str
    query: str
    limit: Limit


@dataclass(frozen=True)
class WatchedJob:
    id: int
    tables: tuple[int, ...]  # oids of the tables it reads and writes


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact_text(text[0] if text else type(exc).__name__)


# -- the primary -------------------------------------------------------------------------------


class Heartbeats:
    """The heartbeats this process wrote on the primary, newest last (a few minutes' worth).

    A replica's lag is how long ago the primary was where the replica is now: the time since
    the first heartbeat the replica has not replayed. Measured against the primary's clock
    only, so clock skew between servers does not matter; and exact after a pause in
    heartbeats (a controller restart, a new leader), where "the age of the replica's
    heartbeat" would read the length of the pause as lag."""

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.written: list[dt.datetime] = []

    def write(self, conn: Conn) -> None:
        row = conn.execute(
            """INSERT INTO backfill.heartbeat (id, at) VALUES (1, clock_timestamp())
               ON CONFLICT (id) DO UPDATE SET at = excluded.at RETURNING at""").fetchone()
        if row is not None:
            self.written.append(row[0])
            del self.written[:-self.keep]

    def seed(self, conn: Conn) -> None:
        """Start from the heartbeat on the primary now (another controller's, maybe old): a
        replica that has not replayed it is behind by at least its age."""
        row = conn.execute("SELECT at FROM backfill.heartbeat WHERE id = 1").fetchone()
        if row is not None and (not self.written or row[0] > self.written[-1]):
            self.written.append(row[0])

    def lag(self, replayed: dt.datetime, now: dt.datetime) -> float | None:
        """Seconds the replica is behind, given the heartbeat it has replayed; ``None`` when
        this process has not written since then (it cannot tell)."""
        if not self.written:
            return None
        if replayed >= self.written[-1]:
            return 0.0
        missing = bisect.bisect_right(self.written, replayed)
        if missing == 0 and replayed < self.written[0]:
            # Older than anything remembered: behind by at least the oldest one's age.
            return (now - self.written[0]).total_seconds()
        return max(0.0, (now - self.written[missing]).total_seconds())


def lock_waiters(conn: Conn, job: WatchedJob) -> list[Reading]:
    """Sessions queued on the job's tables: how many, and the oldest wait. A session counts
    when it waits for a lock on one of the tables, or when ``pg_blocking_pids()`` names a
    session holding a lock on one of them (or one of the job's own backends). The second
    rule finds the head of a queue on a row: it waits on the row holder's transactionid lock,
    whose relation is NULL. The job's own waits are not counted (its lock_timeout handles
    them)."""
    row = conn.execute(
        """WITH here AS (SELECT oid FROM pg_database WHERE datname = current_database()),
                holders AS (
                    -- oids are per database: a lock in another database is not on our tables
                    SELECT coalesce(array_agg(DISTINCT l.pid), '{}') AS pids FROM pg_locks l
                    WHERE l.granted AND l.relation = ANY(%(rels)s::oid[])
                      AND l.database = (SELECT oid FROM here))
           SELECT count(*), coalesce(extract(epoch FROM max(clock_timestamp() - w.since)), 0),
                  string_agg(DISTINCT coalesce(nullif(a.application_name, ''), a.usename::text)
                             || ' (pid ' || a.pid || ')', ', ')
           FROM pg_stat_activity a
           JOIN LATERAL (
               SELECT min(l.waitstart) AS since,
                      bool_or(l.relation = ANY(%(rels)s::oid[])
                              AND l.database = (SELECT oid FROM here)) AS on_rel
               FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted) w ON true
           WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()
             AND coalesce(a.application_name, '') NOT LIKE 'backfill job %%'
             AND (w.on_rel
                  OR pg_blocking_pids(a.pid) && (SELECT pids FROM holders)
                  OR EXISTS (
                   SELECT 1 FROM pg_stat_activity b
                   WHERE b.pid = ANY(pg_blocking_pids(a.pid)) AND b.application_name = %(app)s))""",
        {"rels": list(job.tables), "app": f"backfill job {job.id}"},
    ).fetchone()
    count, oldest, who = (int(row[0]), float(row[1]), row[2]) if row else (0, 0.0, None)
    detail = f"waiting: {who}" if who else None
    return [Reading("lock_waiters", f"lock_waiters[job {job.id}]", count, detail=detail,
                    job_id=job.id),
            Reading("lock_wait", f"lock_wait[job {job.id}]", oldest, detail=detail,
                    job_id=job.id)]


def autovacuum(conn: Conn, job: WatchedJob) -> Reading:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = ANY(%s::oid[])",
        (list(job.tables),)).fetchone()
    return Reading("autovacuum", f"autovacuum[job {job.id}]", 1.0 if row and row[0] else 0.0,
                   job_id=job.id)


def long_transaction(conn: Conn) -> Reading:
    """The oldest open transaction (or prepared transaction) other than backfill's own."""
    row = conn.execute(
        """SELECT extract(epoch FROM clock_timestamp() - xact_start), pid,
                  coalesce(nullif(application_name, ''), usename::text), state
           FROM pg_stat_activity
           WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
             AND backend_type = 'client backend'
             AND coalesce(application_name, '') NOT LIKE 'backfill%%'
           ORDER BY xact_start LIMIT 1""").fetchone()
    prepared = conn.execute(
        """SELECT extract(epoch FROM clock_timestamp() - prepared), gid FROM pg_prepared_xacts
           ORDER BY prepared LIMIT 1""").fetchone()
    age, detail = 0.0, None
    if row is not None:
        age, detail = float(row[0]), f"pid {row[1]} ({row[2]}), {row[3]}"
    if prepared is not None and float(prepared[0]) > age:
        age, detail = float(prepared[0]), f"prepared transaction {prepared[1]!r}"
    return Reading("long_transaction", "long_transaction", age, detail=detail)


def replication(conn: Conn) -> list[Reading]:
    """Per standby connected to this primary: replay lag (time) and bytes not yet replayed.
    ``replay_lag`` is NULL while the standby is idle and caught up: 0."""
    out = []
    for name, lag_s, lag_bytes in conn.execute(
        """SELECT coalesce(nullif(application_name, ''), 'standby')
                      || coalesce('@' || host(client_addr), ''),
                  coalesce(extract(epoch FROM replay_lag), 0),
                  coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)
           FROM pg_stat_replication ORDER BY 1""").fetchall():
        out.append(Reading("replica_lag", f"standby_replay_lag[{name}]", float(lag_s)))
        out.append(Reading("replica_lag_bytes", f"standby_replay_bytes[{name}]",
                           float(lag_bytes)))
    return out


def logical_slots(conn: Conn) -> list[Reading]:
    return [
        Reading("slot_retained", f"slot_retained[{name}]", float(retained),
                detail="inactive: is its subscriber gone?" if not active else None)
        for name, active, retained in conn.execute(
            """SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)
               FROM pg_replication_slots
               WHERE slot_type = 'logical' AND restart_lsn IS NOT NULL ORDER BY 1""").fetchall()
    ]


def probe(conn: Conn, p: Probe) -> Reading:
    kind = f"probe:{p.name}"
    try:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '5s'")
            conn.execute("SET LOCAL transaction_read_only = on")
            # Checked again (one SELECT), and sent alone on the extended protocol.
            query = sqltext.statement_sql(p.query, allowed=sqltext.PROBE_STATEMENTS,
                                          slot=f"probe {p.name}")
            row = sqltext.execute_one(conn, query).fetchone()
        value = float(row[0]) if row and row[0] is not None else None
        return Reading(kind, f"probe[{p.name}]", value,
                       error=None if value is not None else "returned no number")
    except (psycopg.DatabaseError, ValueError, TypeError, InvalidFragment) as exc:
        if isinstance(exc, psycopg.OperationalError) and conn.broken:
            raise
        return Reading(kind, f"probe[{p.name}]", None, error=_error(exc))


# -- replicas ----------------------------------------------------------------------------------


def replica_lag(replica: Replica, beats: Heartbeats, now: dt.datetime,
                timeout_s: float = 3.0) -> Reading:
    """Heartbeat lag on a replica (see :class:`Heartbeats`); ``now`` is the primary's clock."""
    signal = f"replica_lag[{replica.name}]"
    try:
        conn = connect(replica.dsn, connect_timeout=max(1, round(timeout_s)),
                       application_name="backfill controller")
    except Exception as exc:  # the replica refuses or is unreachable: fail closed
        return Reading("replica_lag", signal, None, error=_error(exc))
    try:
        conn.execute(sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{int(timeout_s * 1000)}ms")))
        row = conn.execute("SELECT at FROM backfill.heartbeat WHERE id = 1").fetchone()
        lag = beats.lag(row[0], now) if row is not None else None
        if lag is None:
            return Reading("replica_lag", signal, None,
                           error="no heartbeat of this controller replayed yet (is this a "
                                 "replica of the primary?)")
        return Reading("replica_lag", signal, lag)
    except psycopg.Error as exc:
        return Reading("replica_lag", signal, None, error=_error(exc))
    finally:
        conn.close()


def collect(conn: Conn, jobs: list[WatchedJob], replicas: list[Replica],
            probes: list[Probe], beats: Heartbeats) -> list[Reading]:
    """Every reading for one controller tick, taken on the primary ``conn`` and the replicas."""
    readings: list[Reading] = []
    for job in jobs:
        readings += lock_waiters(conn, job)
        readings.append(autovacuum(conn, job))
    readings.append(long_transaction(conn))
    readings += replication(conn)
    readings += logical_slots(conn)
    for p in probes:
        readings.append(probe(conn, p))
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    for r in replicas:
        readings.append(replica_lag(r, beats, row[0]))
    return readings
