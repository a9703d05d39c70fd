"""Prometheus metrics, read from the state store at each scrape.

The exporter (``backfill exporter``) is its own small process: every figure comes from
PostgreSQL (jobs, slices, events, the controller's last readings), so it is right whichever
runner or worker did the work, survives restarts of everything, and needs no coordination.
It is not served by the controller because the controller is optional and only its leader
acts, while metrics must exist, once, whether a controller runs or not.

Naming follows Prometheus conventions: ``backfill_`` prefix, base units in names
(``_seconds``, ``_bytes``), ``_total`` for counters. Labels are bounded: job id and name, kind,
table, state, signal kind, replica (and how its lag was read), slot, probe; never key values,
SQL or free text. Prometheus adds ``instance``: one exporter per database, so the rules tell
databases apart by it. Jobs are exported
while active, while failed (until retried or cancelled), and for ``finished_for_s`` after they
succeed or are cancelled, so series do not accumulate forever.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from psycopg import sql

from backfill.control.policy import kind_of
from backfill.core.db import connect, redact_text
from backfill.core.logs import get_logger
from backfill.engine.throttle import batch_interval_s
from backfill.job.options import JobOptions
from backfill.job.states import JobState
from backfill.state import checkpoints, control, store
from backfill.state.checkpoints import DURATION_BUCKETS_S

log = get_logger(component="exporter")

JOB_LABELS = ["job_id", "job_name"]  # not "job": Prometheus owns that label
#: Reading kinds exported as their own gauge: name, help, labels. Replica lag is per replica,
#: by method: "heartbeat" (a replica the controller reads, under its configured name) or
#: "replay_lag" (pg_stat_replication on the primary, application_name@address).
_REPLICA = ["replica", "method"]
SIGNAL_METRICS: dict[str, tuple[str, str, list[str]]] = {
    "replica_lag": ("backfill_signal_replica_lag_seconds", "Replica lag (heartbeat or replay).",
                    _REPLICA),
    "replica_lag_bytes": ("backfill_signal_replica_lag_bytes", "WAL bytes not yet replayed.",
                          _REPLICA),
    "lock_waiters": ("backfill_signal_lock_waiters", "Sessions waiting on a job's tables.",
                     ["job_id"]),
    "lock_wait": ("backfill_signal_lock_wait_seconds", "Oldest lock wait on a job's tables.",
                  ["job_id"]),
    "slot_retained": ("backfill_signal_slot_retained_bytes",
                      "WAL retained by a logical replication slot.", ["slot"]),
    "long_transaction": ("backfill_signal_long_transaction_seconds",
                         "Age of the oldest open transaction.", []),
    "autovacuum": ("backfill_signal_autovacuum_running",
                   "1 while autovacuum works on a job's table.", ["job_id"]),
}

_JOBS_SQL = """
SELECT j.id, j.name, j.kind, j.source_schema || '.' || j.source_table AS tbl, j.state,
       j.rows_estimate, j.runs_on, j.options, j.rate_share, j.batch_rate_share,
       extract(epoch FROM (SELECT max(e.at) FROM backfill.events e
                            WHERE e.job_id = j.id AND e.kind = 'transition'
                              AND e.to_state = 'running')) AS running_since,
       coalesce(s.rows_scanned, 0) AS rows_scanned, coalesce(s.rows_affected, 0) AS affected,
       coalesce(s.batches, 0) AS batches, s.batch_size, s.sum_ms, s.buckets,
       s.slices, s.slices_done,
       extract(epoch FROM coalesce(
           (SELECT max(b.finished_at) FROM backfill.batches b WHERE b.job_id = j.id),
           j.started_at)) AS last_batch_at,
       (SELECT count(*) FROM backfill.events e WHERE e.job_id = j.id AND e.kind = 'retry')
           AS retries,
       (SELECT count(*) FROM backfill.events e
         WHERE e.job_id = j.id AND e.kind = 'transition' AND e.to_state = 'failed') AS failures,
       (SELECT e.details -> 'readings' -> 0 ->> 'signal' FROM backfill.events e
         WHERE e.job_id = j.id AND e.kind = 'transition' AND e.to_state = 'throttled'
         ORDER BY e.id DESC LIMIT 1) AS throttle_signal
FROM backfill.jobs j
LEFT JOIN LATERAL (
    SELECT sum(rows_scanned) AS rows_scanned, sum(rows_affected) AS rows_affected,
           sum(batches) AS batches, max(batch_size) FILTER (WHERE NOT done) AS batch_size,
           sum(duration_sum_ms) AS sum_ms, count(*) AS slices,
           count(*) FILTER (WHERE done) AS slices_done,
           (SELECT array_agg(t ORDER BY i) FROM (
                SELECT i, sum(sl.duration_buckets[i]) AS t
                FROM backfill.slices sl, generate_series(1, %(nbuckets)s) i
                WHERE sl.job_id = j.id GROUP BY i) b) AS buckets
    FROM backfill.slices WHERE job_id = j.id) s ON true
WHERE j.state IN ('pending', 'running', 'throttled', 'paused', 'failed', 'awaiting_approval')
   OR j.finished_at > now() - %(finished_for)s * interval '1 second'
ORDER BY j.id
"""

# Queue health of jobs on the workers. ``waited``: how long the oldest piece of work handed to
# the workers has waited for one to start it: a slice's task that no worker has taken (its
# dispatched_at; a reaper re-send restarts the clock), or a pending job, which a worker's
# reaper starts within one pass. ``stale``: dispatch events that re-sent tasks no worker had
# started within the stale window (leases.claim_dispatch's ``stale`` detail).
_QUEUE_SQL = """
SELECT j.id, j.name, j.state,
       CASE WHEN j.state = 'pending' THEN extract(epoch FROM now() - coalesce(
                (SELECT max(e.at) FROM backfill.events e WHERE e.job_id = j.id
                   AND e.kind = 'transition' AND e.to_state = 'pending'), j.created_at))
            WHEN j.state = 'running' THEN coalesce(extract(epoch FROM now() - w.oldest), 0)
       END AS waited,
       coalesce(w.waiting, 0) AS waiting,
       (SELECT count(*) FROM backfill.events e
         WHERE e.job_id = j.id AND e.kind = 'dispatch' AND e.details ? 'stale') AS stale
FROM backfill.jobs j
LEFT JOIN LATERAL (
    SELECT min(s.dispatched_at) AS oldest, count(*) AS waiting FROM backfill.slices s
    WHERE s.job_id = j.id AND NOT s.done AND s.dispatched_at IS NOT NULL) w ON true
WHERE j.runs_on = 'workers'
  AND (j.state IN ('pending', 'running', 'throttled', 'paused', 'failed')
       OR j.finished_at > now() - %(finished_for)s * interval '1 second')
ORDER BY j.id
"""


_CONTROLLER_SQL = """
SELECT leader, extract(epoch FROM tick_at), readings, settings,
       extract(epoch FROM now() - tick_at) AS age_s
FROM backfill.controller WHERE id = 1
"""


@dataclass(frozen=True)
class _Snapshot:
    """What one read of the state store found (all the I/O of a scrape)."""

    jobs: list[Any]
    etas: dict[int, float | None]
    controller: Any
    queue: list[Any]


class StateCollector(Collector):
    """Reads the state store on each ``collect``, within ``timeout_s``.

    A hung database (a stopped backend, a dropped network) must not hang the scrape, nor pile
    up threads: the read runs on one reader thread at a time, which the scrape waits for at
    most ``timeout_s``. Past that the read's socket is shut down (a server-side timeout cannot
    help when the backend is stopped; the kernel still acknowledges keepalives) so the reader
    ends, and the scrape answers ``backfill_up 0``. A scrape that arrives while a read is in
    flight shares it; one that arrives while an abandoned read is still winding down answers
    ``backfill_up 0`` at once."""

    def __init__(self, dsn: str, *, finished_for_s: float = 3600.0,
                 timeout_s: float = 5.0, dispatch_stale_s: float = 120.0) -> None:
        self.dsn = dsn
        self.finished_for_s = finished_for_s
        self.timeout_s = timeout_s
        self.dispatch_stale_s = dispatch_stale_s
        self._conn: psycopg.Connection[Any] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._reader: Future[_Snapshot] | None = None
        self._abandoned = False

    def describe(self) -> list[Metric]:
        return []  # collected fresh at each scrape; nothing to check at registration

    # -- the read (on the reader thread) --------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._close()
            conn = connect(self.dsn, application_name="backfill exporter",
                           connect_timeout=max(2, math.ceil(self.timeout_s)))
            with self._lock:
                # Our own duplicate of the connection's socket: a scrape that gives up on a
                # stuck read shuts this one down, which no one else can close and reuse
                # meanwhile (libpq may close its own descriptor on an error at any time).
                self._conn = conn
                self._sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
            conn.execute(sql.SQL("SET statement_timeout = {}").format(
                sql.Literal(f"{max(1, int(self.timeout_s * 1000))}ms")))
        return self._conn

    def _close(self) -> None:
        """Close the connection and the socket duplicate, under the lock."""
        with self._lock:
            conn, self._conn = self._conn, None
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if conn is not None:
            conn.close()

    def _read(self) -> _Snapshot:
        try:
            conn = self._connection()
            jobs = conn.execute(_JOBS_SQL, {"finished_for": self.finished_for_s,
                                            "nbuckets": len(DURATION_BUCKETS_S) + 1}).fetchall()
            # The ETA as `show` computes it (backfill.state.pace: a recent window up to now, within
            # the job's rate limits), so the dashboard and the CLI agree.
            live = store.get_jobs(conn, [r[0] for r in jobs
                                         if r[4] in (JobState.RUNNING, JobState.THROTTLED)])
            etas = {i: p.eta_s for i, p in checkpoints.progress_of(conn, live).items()}
            controller = conn.execute(_CONTROLLER_SQL).fetchone()
            queue = conn.execute(_QUEUE_SQL, {"finished_for": self.finished_for_s}).fetchall()
        except BaseException:
            self._close()
            raise
        return _Snapshot(jobs, etas, controller, queue)

    def _abandon(self) -> None:
        """Unblock a read stuck on the network: shut its socket down (the reader then fails
        with a broken connection and closes it). Called from a scrape thread, holding the
        lock."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _snapshot(self) -> tuple[_Snapshot | None, str]:
        """This scrape's reading of the state store, or ``None`` and why not."""
        with self._lock:
            reader = self._reader
            if reader is not None and not reader.done() and self._abandoned:
                return None, "a previous read of the state store is still stuck"
            if reader is None or reader.done():
                reader = self._reader = Future()
                self._abandoned = False
                threading.Thread(target=self._run, args=(reader,), daemon=True,
                                 name="backfill-exporter-read").start()
        try:
            return reader.result(timeout=self.timeout_s), ""
        except FutureTimeout:
            with self._lock:
                if self._reader is reader and not reader.done():
                    self._abandoned = True
                    self._abandon()
            return None, f"no answer from the state store within {self.timeout_s:g}s"
        except Exception as exc:  # the database is away: say so, and serve what we can
            return None, redact_text(str(exc))

    def _run(self, reader: Future[_Snapshot]) -> None:
        try:
            reader.set_result(self._read())
        except BaseException as exc:  # handed to the scrape that waits
            reader.set_exception(exc)

    # -- the scrape ------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("backfill_up", "1 if the exporter could read the state store.")
        snap, why = self._snapshot()
        took = GaugeMetricFamily("backfill_exporter_scrape_duration_seconds",
                                 "Time to read the state store for this scrape.")
        if snap is None:
            log.warning("exporter.scrape_failed", error=why)
            up.add_metric([], 0)
            yield up
            took.add_metric([], time.perf_counter() - started)
            yield took
            return
        up.add_metric([], 1)
        yield up
        yield from self._jobs(snap.jobs, snap.etas)
        yield from self._controller(snap.controller)
        yield from self._queue(snap.queue)
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _jobs(self, rows: list[Any], etas: dict[int, float | None]) -> Iterator[Metric]:
        info = GaugeMetricFamily("backfill_job_info", "A job: its kind, table and where it runs.",
                                 labels=[*JOB_LABELS, "kind", "table", "runs_on"])
        state = GaugeMetricFamily("backfill_job_state", "1 for the job's current state.",
                                  labels=[*JOB_LABELS, "state"])
        done = CounterMetricFamily("backfill_job_rows_done", "Rows scanned (processed) so far.",
                                   labels=JOB_LABELS)
        affected = CounterMetricFamily("backfill_job_rows_affected",
                                       "Rows the job's statements changed.", labels=JOB_LABELS)
        total = GaugeMetricFamily("backfill_job_rows_estimated",
                                  "Rows in the job's range (an estimate).", labels=JOB_LABELS)
        batches = CounterMetricFamily("backfill_job_batches", "Batches committed.",
                                      labels=JOB_LABELS)
        retries = CounterMetricFamily("backfill_job_batch_retries", "Batch attempts retried.",
                                      labels=JOB_LABELS)
        failures = CounterMetricFamily("backfill_job_failures",
                                       "Times the job failed (a batch error that did not heal).",
                                       labels=JOB_LABELS)
        size = GaugeMetricFamily("backfill_job_batch_size", "Current batch size (rows).",
                                 labels=JOB_LABELS)
        throttled = GaugeMetricFamily(
            "backfill_job_throttled", "1 while the controller throttles the job; `signal` is "
            "the kind of reading that caused it.", labels=[*JOB_LABELS, "signal"])
        last = GaugeMetricFamily("backfill_job_last_progress_timestamp_seconds",
                                 "When the job last committed a batch, or started (Unix time).",
                                 labels=JOB_LABELS)
        due = GaugeMetricFamily(
            "backfill_job_next_batch_due_timestamp_seconds",
            "When the job's next batch is due (Unix time): its last batch, or its last resume, "
            "plus the interval its rate limits put between batches.", labels=JOB_LABELS)
        interval = GaugeMetricFamily(
            "backfill_job_batch_interval_seconds",
            "Seconds the job's rate limits put between its batches (0: not paced).",
            labels=JOB_LABELS)
        eta = GaugeMetricFamily("backfill_job_eta_seconds",
                                "Seconds left at the recent rate (running jobs only).",
                                labels=JOB_LABELS)
        slices = GaugeMetricFamily("backfill_job_slices", "Slices, and slices done.",
                                   labels=[*JOB_LABELS, "done"])
        duration = HistogramMetricFamily("backfill_job_batch_duration_seconds",
                                         "Batch duration (probe and write).", labels=JOB_LABELS)
        for r in rows:
            (job_id, name, kind, table, st, estimate, runs_on, options, rows_share,
             batches_share, running_since, scanned, n_affected, n_batches, batch_size, sum_ms,
             buckets, n_slices, n_done, last_at, n_retries, n_failures, signal) = r
            lab = [str(job_id), name]
            info.add_metric([*lab, kind, table, runs_on], 1)
            for s in JobState:
                state.add_metric([*lab, str(s)], 1 if s == st else 0)
            done.add_metric(lab, float(scanned))
            affected.add_metric(lab, float(n_affected))
            batches.add_metric(lab, float(n_batches))
            retries.add_metric(lab, float(n_retries))
            failures.add_metric(lab, float(n_failures))
            if estimate is not None:
                total.add_metric(lab, float(max(estimate, scanned)))
            if batch_size is not None:
                size.add_metric(lab, float(batch_size))
            if st == JobState.THROTTLED:
                throttled.add_metric([*lab, kind_of(signal) if signal else "unknown"], 1)
            if last_at is not None:
                last.add_metric(lab, float(last_at))
            if st in (JobState.RUNNING, JobState.THROTTLED):
                opts = JobOptions.from_json(options)
                every = batch_interval_s(batch_size or opts.batch_size, opts.rate_limit,
                                         opts.pause_ms / 1000.0, rows_share, batches_share)
                interval.add_metric(lab, every)
                since = max((float(t) for t in (last_at, running_since) if t is not None),
                            default=None)
                if since is not None:
                    due.add_metric(lab, since + every)
            if n_slices:
                slices.add_metric([*lab, "false"], float(n_slices - n_done))
                slices.add_metric([*lab, "true"], float(n_done))
            if buckets:
                cumulative, running = [], 0
                for bound, count in zip((*DURATION_BUCKETS_S, float("inf")), buckets,
                                        strict=True):
                    running += int(count or 0)
                    cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
                duration.add_metric(lab, cumulative, (sum_ms or 0) / 1000.0)
            if st in (JobState.RUNNING, JobState.THROTTLED):
                left = etas.get(job_id)
                if left is not None:
                    eta.add_metric(lab, left)
        yield from (info, state, done, affected, total, batches, retries, failures, size,
                    throttled, last, due, interval, eta, slices, duration)

    def _controller(self, row: Any) -> Iterator[Metric]:
        last = GaugeMetricFamily("backfill_controller_last_poll_timestamp_seconds",
                                 "When the acting controller last polled (Unix time).")
        leader = GaugeMetricFamily("backfill_controller_leader_info",
                                   "The acting controller.", labels=["leader"])
        poll = GaugeMetricFamily("backfill_controller_poll_interval_seconds",
                                 "The acting controller's poll interval.")
        unreadable = GaugeMetricFamily(
            "backfill_signal_unreadable", "1 for a signal the controller could not read (it "
            "throttles: fail closed).", labels=["kind", "source"])
        gauges = {kind: GaugeMetricFamily(name, help_, labels=labels)
                  for kind, (name, help_, labels) in SIGNAL_METRICS.items()}
        probes = GaugeMetricFamily("backfill_signal_probe_value", "An operator probe's value.",
                                   labels=["probe"])
        if row is not None:
            name, tick_at, readings, settings, age_s = row
            poll_s = float((settings or {}).get("poll_s") or 1.0)
            last.add_metric([], float(tick_at))
            leader.add_metric([name], 1)
            poll.add_metric([], poll_s)
            # Readings are the last poll's: once that controller is gone they say nothing
            # about the database now, so they expire (BackfillControllerDown says why).
            if not control.controller_alive(float(age_s), poll_s):
                readings = []
            for reading in readings or []:
                signal = str(reading.get("signal", ""))
                base, _, rest = signal.partition("[")
                source = rest.removesuffix("]") or base
                kind = kind_of(signal)
                value = reading.get("value")
                if value is None:
                    unreadable.add_metric([kind, source], 1)
                    continue
                if kind.startswith("probe:"):
                    probes.add_metric([source], float(value))
                elif kind in gauges:
                    gauges[kind].add_metric(_signal_labels(base, source), float(value))
        yield from (last, leader, poll, unreadable, probes, *gauges.values())

    def _queue(self, rows: list[Any]) -> Iterator[Metric]:
        """Queue health of jobs on the workers (see ``_QUEUE_SQL``)."""
        stale_after = GaugeMetricFamily(
            "backfill_dispatch_stale_after_seconds", "A task no worker started this long after "
            "it was sent is re-sent by the workers' reaper (BACKFILL_DISPATCH_STALE_S).")
        stale_after.add_metric([], self.dispatch_stale_s)
        waited = GaugeMetricFamily(
            "backfill_job_dispatch_oldest_unclaimed_seconds", "How long the oldest work handed "
            "to the workers (a slice's task, or the pending job itself) has waited for a worker "
            "to start it; 0 when nothing waits. Pending and running jobs on the workers.",
            labels=JOB_LABELS)
        waiting = GaugeMetricFamily(
            "backfill_job_dispatch_unclaimed_slices", "Slices whose task was sent and no worker "
            "has started yet.", labels=JOB_LABELS)
        stale = CounterMetricFamily(
            "backfill_job_stale_dispatches", "Dispatches that re-sent tasks of the job which no "
            "worker had started within the stale window.", labels=JOB_LABELS)
        for job_id, name, _st, age, n_waiting, n_stale in rows:
            lab = [str(job_id), name]
            if age is not None:
                waited.add_metric(lab, max(float(age), 0.0))
                waiting.add_metric(lab, float(n_waiting))
            stale.add_metric(lab, float(n_stale))
        yield from (stale_after, waited, waiting, stale)


def _signal_labels(base: str, source: str) -> list[str]:
    """The labels of one reading's gauge (see SIGNAL_METRICS) from its signal's name."""
    if base in ("replica_lag", "standby_replay_lag", "standby_replay_bytes"):
        return [source, "heartbeat" if base == "replica_lag" else "replay_lag"]
    if source.startswith("job "):  # per-job readings: lock_waiters[job 3]
        return [source.removeprefix("job ")]
    if base == source:  # a global reading with no source: long_transaction
        return []
    return [source]


def serve(dsn: str, *, port: int, addr: str = "0.0.0.0",
          finished_for_s: float = 3600.0, timeout_s: float = 5.0,
          dispatch_stale_s: float = 120.0) -> Any:
    """Start the HTTP exporter in a background thread; returns (server, thread). Each scrape
    reads the state store within ``timeout_s`` (keep it below Prometheus's scrape timeout)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(dsn, finished_for_s=finished_for_s, timeout_s=timeout_s,
                                     dispatch_stale_s=dispatch_stale_s))
    return start_http_server(port, addr=addr, registry=registry)
