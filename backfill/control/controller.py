"""The controller: reads health signals every poll, decides with the pure policy, and moves
jobs between ``running`` and ``throttled`` with the readings that caused it.

One controller acts at a time: it holds a session advisory lock on the connection it works on,
so a second one stands by and takes over within a poll of the first one's death (its session,
and so its lock, ends with it). Every state change is an event whose details carry the readings;
the current throttle reason is the job's ``state_reason``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from backfill.control import signals
from backfill.control.policy import Decision, JobView, Limit, PolicyConfig, Reading, decide, rate_shares
from backfill.core import sqltext
from backfill.core.catalog import Conn, table_oid
from backfill.core.db import connect, hold_lock_briefly_after_death, redact_dsn, redact_text
from backfill.core.durations import parse_duration_ms, parse_size
from backfill.core.errors import BackfillError, IllegalTransition, InvalidOption
from backfill.core.logs import get_logger
from backfill.job.states import JobState
from backfill.state import control, store
from backfill.state.schema import require_current

#: Session advisory lock held by the acting controller.
CONTROLLER_LOCK = 0x6266_696C_6C03

log = get_logger(component="controller")

#: Limits when the operator sets none; each resumes below half its throttle threshold.
DEFAULT_LIMITS: dict[str, Limit] = {
    "lock_waiters": Limit(5, 1),
    "lock_wait": Limit.at(5.0),
    "replica_lag": Limit.at(10.0),
    "slot_retained": Limit.at(10 * 2**30),
    "long_transaction": Limit.at(600.0),
}
#: How each limit is written in a config file: a duration, a size, or a plain number.
_PARSERS: dict[str, Callable[[Any], float]] = {
    "lock_waiters": lambda v: _number(v, "lock_waiters"),
    "lock_wait": lambda v: parse_duration_ms(v, option="lock_wait") / 1000,
    "replica_lag": lambda v: parse_duration_ms(v, option="replica_lag") / 1000,
    "replica_lag_bytes": lambda v: parse_size(v, option="replica_lag_bytes"),
    "slot_retained": lambda v: parse_size(v, option="slot_retained"),
    "long_transaction": lambda v: parse_duration_ms(v, option="long_transaction") / 1000,
    "autovacuum": float,  # handled apart: true or false
}


def default_actor() -> str:
    """A controller's identity: each process its own, so two on one host are told apart."""
    return f"controller:{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ControllerConfig:
    poll_s: float = 1.0
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(limits=DEFAULT_LIMITS))
    replicas: tuple[signals.Replica, ...] = ()
    probes: tuple[signals.Probe, ...] = ()
    rows_per_s: float | None = None
    batches_per_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        def lim(v: Limit) -> list[float | None]:  # JSON has no infinity (a limit turned off)
            return [x if math.isfinite(x) else None for x in (v.throttle_at, v.resume_below)]

        return {
            "poll_s": self.poll_s, "hold_s": self.policy.hold_s,
            "lookahead_s": self.policy.lookahead_s,
            "limits": {k: lim(v) for k, v in self.policy.limits.items()},
            "per_job": {name: {k: lim(v) for k, v in limits.items()}
                        for name, limits in self.policy.per_job.items()},
            "replicas": {r.name: redact_dsn(r.dsn) for r in self.replicas},
            "probes": [p.name for p in self.probes],
            "rows_per_s": self.rows_per_s, "batches_per_s": self.batches_per_s,
        }

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> ControllerConfig:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidOption(f"cannot read the controller config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidOption(f"{path} is not valid TOML: {exc}") from exc
        return cls.from_mapping(data, **overrides)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> ControllerConfig:
        """Build from a parsed config file (see ``deploy/controller.example.toml``), then
        command-line ``overrides``: ``poll``, ``hold``, ``limits`` (kind -> value),
        ``replicas`` (name -> DSN), ``rows_per_s``, ``batches_per_s``."""
        known = {"poll", "hold", "lookahead", "resume_ratio", "limits", "jobs", "replicas",
                 "probes", "budget"}
        unknown = set(data) - known
        if unknown:
            raise InvalidOption(f"unknown controller settings: {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(known))})")
        ratio = _number(data.get("resume_ratio", 0.5), "resume_ratio")
        if not 0 < ratio <= 1:
            raise InvalidOption("resume_ratio must be more than 0 and at most 1 (healthy "
                                "signals read 0: a resume threshold of 0 never resumes)")
        limits = dict(DEFAULT_LIMITS)
        limits.update(_limits(data.get("limits", {}), ratio, "limits"))
        limits.update(_limits(overrides.get("limits") or {}, ratio, "option"))
        per_job = {str(name): _limits(v, ratio, f"jobs.{name}")
                   for name, v in _table(data.get("jobs", {}), "jobs").items()}
        replicas = {str(k): str(v) for k, v in _table(data.get("replicas", {}), "replicas").items()}
        replicas.update(overrides.get("replicas") or {})
        for name, dsn in replicas.items():
            try:
                conninfo_to_dict(dsn)
            except psycopg.ProgrammingError as exc:
                raise InvalidOption(f"replica {name}: malformed DSN: {redact_text(str(exc))}") from None
        probes = []
        for name, raw in _table(data.get("probes", {}), "probes").items():
            p = _table(raw, f"probes.{name}")
            if "sql" not in p or "max" not in p:
                raise InvalidOption(f"probe {name} needs `sql` and `max`")
            top = _number(p["max"], f"probes.{name}.max")
            below = _number(p.get("resume_below", top * ratio), f"probes.{name}.resume_below")
            if not isinstance(p["sql"], str):
                raise InvalidOption(f"probe {name}: `sql` must be a string")
            # One SELECT, nothing else: checked here, at load, and again before each run.
            query = sqltext.statement(p["sql"], allowed=sqltext.PROBE_STATEMENTS,
                                      slot=f"probe {name}")
            probes.append(signals.Probe(str(name), query, _limit(top, below, name)))
            limits[f"probe:{name}"] = probes[-1].limit
        budget = _table(data.get("budget", {}), "budget")
        rows = overrides.get("rows_per_s") or budget.get("rows_per_s")
        batches = overrides.get("batches_per_s") or budget.get("batches_per_s")
        poll = overrides.get("poll") or data.get("poll", "1s")
        hold = overrides.get("hold") or data.get("hold", "10s")
        poll_s = parse_duration_ms(poll, option="poll") / 1000
        if poll_s <= 0:
            raise InvalidOption("poll must be more than 0s")
        lookahead = data.get("lookahead")
        lookahead_s = (parse_duration_ms(lookahead, option="lookahead") / 1000
                       if lookahead is not None else 2 * poll_s)
        return cls(
            poll_s=poll_s,
            policy=PolicyConfig(limits=limits, per_job=per_job,
                                hold_s=parse_duration_ms(hold, option="hold") / 1000,
                                lookahead_s=lookahead_s),
            replicas=tuple(signals.Replica(k, v) for k, v in replicas.items()),
            probes=tuple(probes),
            rows_per_s=_number(rows, "budget.rows_per_s") if rows else None,
            batches_per_s=_number(batches, "budget.batches_per_s") if batches else None,
        )


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidOption(f"{where} must be a table of settings")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidOption(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidOption(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidOption(f"{where}: must be a finite number, not negative (got {value!r})")
    return number


def _limit(top: float, below: float, where: str) -> Limit:
    if below <= 0:
        raise InvalidOption(f"{where}: the resume threshold must be more than 0 (healthy "
                            "signals read 0, and a job resumes only below the threshold)")
    try:
        return Limit(top, below)
    except ValueError as exc:
        raise InvalidOption(f"{where}: {exc}") from None


def _limits(section: Any, ratio: float, where: str) -> dict[str, Limit]:
    """``kind = value`` or ``kind = {throttle = value, resume = value}``."""
    out: dict[str, Limit] = {}
    for kind, value in _table(section, where).items():
        if kind == "autovacuum":  # true: throttle while autovacuum works on the job's table
            if not isinstance(value, bool):
                raise InvalidOption(f"{where}.autovacuum must be true or false")
            out[kind] = Limit(1.0, 1.0) if value else Limit(float("inf"), float("inf"))
            continue
        parse = _PARSERS.get(kind)
        if parse is None:
            raise InvalidOption(f"{where}: unknown signal {kind!r} "
                                f"(known: {', '.join(sorted(_PARSERS))})")
        if isinstance(value, dict):
            if "throttle" not in value:
                raise InvalidOption(f"{where}.{kind} needs `throttle`")
            top = parse(value["throttle"])
            below = parse(value["resume"]) if "resume" in value else top * ratio
        else:
            top = parse(value)
            below = top * ratio
        out[kind] = _limit(top, below, f"{where}.{kind}")
    return out


@dataclass(frozen=True)
class TickResult:
    readings: list[Reading]
    decisions: list[Decision]
    applied: list[Decision]


class Controller:
    """Poll, decide, act: ``run_forever`` until ``stop``; ``tick`` once (``act=False`` only
    reads and decides, for ``backfill controller check``)."""

    def __init__(self, dsn: str, config: ControllerConfig, *, actor: str | None = None,
                 stop: threading.Event | None = None,
                 on_resume: Callable[[store.JobRecord], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dsn = dsn
        self.config = config
        self.actor = actor or default_actor()
        self.stop = stop or threading.Event()
        self.on_resume = on_resume
        self.clock = clock
        self._conn: Conn | None = None
        self._leading = False
        self._took_over = False
        self._clear: dict[int, float] = {}
        self._beats = signals.Heartbeats()
        self._previous: dict[str, tuple[float, float]] = {}

    # -- leadership ---------------------------------------------------------------------

    def _leader_conn(self) -> Conn | None:
        """The connection holding the controller lock, or ``None`` while another leads."""
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            conn.close()
            conn = self._conn = None
            if self._leading:
                log.warning("controller.lost_leadership", actor=self.actor)
            self._leading = False
        if conn is None:
            conn = connect(self.dsn, application_name="backfill controller")
            require_current(conn)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (CONTROLLER_LOCK,)).fetchone()
            if not (row and row[0]):
                conn.close()
                return None
            # If this host vanishes, the server must end the session (and free the lock) in
            # seconds, not after the OS's two-hour keepalive: a standby then takes over.
            hold_lock_briefly_after_death(conn)
            self._conn = conn
            self._leading = True
            self._took_over = True
            self._clear = {}  # a new leader starts its hold clocks afresh
            self._beats = signals.Heartbeats()  # another leader may have written meanwhile
            log.info("controller.leader", actor=self.actor)
        return conn

    @property
    def leading(self) -> bool:
        return self._leading

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._leading = False

    # -- one poll -----------------------------------------------------------------------

    def tick(self, *, act: bool = True) -> TickResult | None:
        """One poll; ``None`` when another controller is acting (this one stands by)."""
        if act:
            conn = self._leader_conn()
            if conn is None:
                return None
        else:
            conn = connect(self.dsn, application_name="backfill controller check")
        try:
            return self._tick(conn, act=act)
        finally:
            if not act:
                conn.close()

    def _tick(self, conn: Conn, *, act: bool) -> TickResult:
        jobs = control.controlled_jobs(conn)
        watched = [signals.WatchedJob(j.id, _tables(conn, j)) for j in jobs]
        if not self._beats.written:
            self._beats.seed(conn)
            if act and not self._beats.written:
                self._beats.write(conn)  # a first heartbeat to measure replicas against
        readings = self._with_trends(signals.collect(
            conn, watched, list(self.config.replicas), list(self.config.probes), self._beats))
        views = [JobView(j.id, j.name, j.state) for j in jobs]
        decisions, clear = decide(self.config.policy, views, readings, self._clear, self.clock())
        applied: list[Decision] = []
        if act:
            self._clear = clear
            by_id = {j.id: j for j in jobs}
            for d in decisions:
                if self._apply(conn, d, by_id[d.job_id]):
                    applied.append(d)
            # The heartbeat goes out whatever happens to the bookkeeping below, and after this
            # poll's reads, so the next poll's replicas have long replayed it.
            self._beats.write(conn)
            self._share_budgets(conn)
            control.record_controller_tick(conn, self.actor, [r.to_json() for r in readings],
                                         self.config.to_json(), took_over=self._took_over)
            self._took_over = False
        return TickResult(readings, decisions, applied)

    def _with_trends(self, readings: list[Reading]) -> list[Reading]:
        """Each reading with its change per second since the previous poll."""
        now = self.clock()
        out = []
        for r in readings:
            prev = self._previous.get(r.signal)
            trend = None
            if r.value is not None and prev is not None and now > prev[0]:
                trend = (r.value - prev[1]) / (now - prev[0])
            out.append(dataclasses.replace(r, trend=trend))
        self._previous = {r.signal: (now, r.value) for r in readings if r.value is not None}
        return out

    def _apply(self, conn: Conn, d: Decision, job: store.JobRecord) -> bool:
        to, expect = ((JobState.THROTTLED, JobState.RUNNING) if d.action == "throttle"
                      else (JobState.RUNNING, JobState.THROTTLED))
        try:
            store.transition(conn, d.job_id, to, actor=self.actor, reason=d.reason,
                             expect=frozenset({expect}),
                             details={"readings": [r.to_json() for r in d.readings]})
        except IllegalTransition:  # an operator (or the job) moved it meanwhile: theirs wins
            return False
        log.info(f"controller.{d.action}", job_id=d.job_id, reason=d.reason)
        if d.action == "resume" and self.on_resume is not None:
            try:
                self.on_resume(job)
            except BackfillError as exc:  # the workers' reaper re-sends it anyway
                log.warning("controller.resume_dispatch_failed", job_id=d.job_id, error=str(exc))
        return True

    def _share_budgets(self, conn: Conn) -> None:
        running = [j.id for j in control.controlled_jobs(conn) if j.state == JobState.RUNNING]
        rows = rate_shares(self.config.rows_per_s, running)
        batches = rate_shares(self.config.batches_per_s, running)
        for job_id in running:
            control.set_shares(conn, job_id, rows[job_id], batches[job_id])

    # -- the loop -----------------------------------------------------------------------

    def run_forever(self) -> None:
        while not self.stop.is_set():
            started = self.clock()
            try:
                self.tick()
            except (psycopg.Error, BackfillError, OSError) as exc:
                # The primary is away or restarting: no decisions until it is back (nothing
                # can run without it either); leadership is re-checked on the next poll.
                log.warning("controller.tick_failed", error=redact_text(str(exc)))
                if self._conn is not None and (self._conn.broken or self._conn.closed):
                    self.close()
            self.stop.wait(max(0.0, self.config.poll_s - (self.clock() - started)))
        self.close()


def _tables(conn: Conn, job: store.JobRecord) -> tuple[int, ...]:
    """The oids of the tables a job reads and writes (its source, and a copy's destination)."""
    # A cross-database job's source oid belongs to the other database: only its
    # destination here can have waiters.
    oids = [] if job.spec.source_dsn else [job.source_oid]
    dest = job.spec.dest
    if dest:
        oid = table_oid(conn, dest)   # the name as SQL reads it, quoted: not the raw text
        if oid is not None:
            oids.append(oid)
    return tuple(oids)
