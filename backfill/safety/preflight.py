"""The pre-flight gate: can the database take this job now? Each check passes, warns or fails
with a reason; any failure blocks the job's first write (``backfill run`` and ``enqueue
--workers`` run it; ``--skip-preflight`` skips it, and the skip is an event).

Checks: the table's size and the WAL the job will write (sampled from one batch, rolled back),
free disk for it, WAL archiving, the standbys' replay lag, long transactions, invalid indexes
on the table, a recent backup (through the operator's command) and the job's timeouts.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import shlex
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from backfill.core.catalog import Conn, table_oid
from backfill.core.durations import format_duration, parse_duration_ms, parse_size
from backfill.core.errors import BackfillError, InvalidOption, PreflightFailed
from backfill.engine.prepare import prepare_stored
from backfill.job.spec import source_engine
from backfill.job.states import JobState
from backfill.state import store

CONFIG_ENV = "BACKFILL_PREFLIGHT_CONFIG"


@dataclass(frozen=True)
class Check:
    name: str
    status: str            # pass | warn | fail
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreflightConfig:
    """Limits and the operator's commands (a TOML file, section ``[preflight]``)."""

    backup_command: str | None = None          # prints the last backup's time (ISO or epoch)
    backup_max_age_s: float = 24 * 3600.0
    disk_free_command: str | None = None       # prints free bytes where the WAL goes
    wal_headroom: float = 3.0                  # free disk >= this x the estimated WAL
    max_replica_lag_s: float = 30.0
    max_transaction_age_s: float = 300.0
    max_archive_age_s: float = 900.0
    command_timeout_s: float = 30.0

    @classmethod
    def load(cls, path: str | Path | None = None) -> PreflightConfig:
        path = path or os.environ.get(CONFIG_ENV)
        if not path:
            return cls()
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidOption(f"cannot read pre-flight config {path}: {exc}") from None
        return cls.from_mapping(data.get("preflight", data))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PreflightConfig:
        durations = {"backup_max_age": "backup_max_age_s", "max_replica_lag": "max_replica_lag_s",
                     "max_transaction_age": "max_transaction_age_s",
                     "max_archive_age": "max_archive_age_s", "command_timeout": "command_timeout_s"}
        known = {*durations, "backup_command", "disk_free_command", "wal_headroom"}
        unknown = set(data) - known
        if unknown:
            raise InvalidOption(f"unknown pre-flight setting(s) {', '.join(sorted(unknown))} "
                                f"(settings: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key, attr in durations.items():
            if key in data:
                values[attr] = parse_duration_ms(data[key], option=key) / 1000.0
        for key in ("backup_command", "disk_free_command"):
            if key in data:
                if not isinstance(data[key], str) or not data[key].strip():
                    raise InvalidOption(f"{key} must be a command line")
                values[key] = data[key]
        if "wal_headroom" in data:
            h = data["wal_headroom"]
            if not isinstance(h, int | float) or isinstance(h, bool) or not h >= 1:
                raise InvalidOption(f"wal_headroom must be a number >= 1, got {h!r}")
            values["wal_headroom"] = float(h)
        return cls(**values)


def blocked(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


def gate(conn: Conn, job: store.JobRecord, config: PreflightConfig, dsn: str, *,
         actor: str) -> list[Check]:
    """Before a job's first write (pending, or paused before it ever started): the checks,
    recorded as an event. A failure pauses the job with the reasons (``show`` and ``list``
    say why; a second job on the same table is refused while it waits; ``resume`` or ``run``
    checks again) and raises :class:`PreflightFailed`; nothing was written."""
    checks = run_checks(conn, job, config, dsn)
    failed = blocked(checks)
    reason = "; ".join(f"{c.name}: {c.reason}" for c in failed)
    with conn.transaction():
        store.add_event(conn, job.id, "preflight", actor=actor,
                        reason=f"blocked: {reason}" if failed else "all checks passed or warned",
                        details={"checks": [c.to_json() for c in checks]})
        if failed and job.state == JobState.PENDING:
            store.transition(conn, job.id, JobState.PAUSED, actor=actor,
                             reason=f"pre-flight failed: {reason}",
                             expect=frozenset({JobState.PENDING}))
    if failed:
        raise PreflightFailed(
            f"job {job.id} did not pass pre-flight (paused, nothing was written):\n  "
            + "\n  ".join(f"{c.name}: {c.reason}" for c in failed)
            + f"\n  (`backfill preflight {job.id}` shows every check; `backfill run "
            f"{job.id}` checks again; --skip-preflight overrides, and is recorded)")
    return checks


def first_write_gate(dsn: str, actor: str) -> Callable[[Conn, store.JobRecord], None]:
    """The gate a job on the workers passes before its first write: :func:`gate` with the
    configured thresholds, unless an operator's ``--skip-preflight`` is recorded. A failure
    pauses the job with the reasons, so the reaper does not retry it every pass; ``resume``
    runs the checks again."""

    def check(conn: Conn, job: store.JobRecord) -> None:
        skipped = conn.execute(
            "SELECT 1 FROM backfill.events WHERE job_id = %s AND kind = 'preflight_skipped'",
            (job.id,)).fetchone()
        if not skipped:
            gate(conn, job, PreflightConfig.load(), dsn, actor=actor)

    return check


def run_checks(conn: Conn, job: store.JobRecord, config: PreflightConfig,
               dsn: str) -> list[Check]:
    """Every check, in order; each one's failure to run is itself a failed check."""
    checks: list[Check] = []

    def attempt(name: str, fn: Callable[[], Check]) -> Check:
        try:
            check = fn()
        except (psycopg.Error, OSError, ValueError, BackfillError) as exc:
            check = Check(name, "fail", f"could not check: {exc}")
        checks.append(check)
        return check

    size = attempt("table and WAL", lambda: _size_and_wal(conn, job))
    wal = size.details.get("wal_bytes_estimate")
    attempt("free disk", lambda: _disk(conn, dsn, config, wal))
    for name, fn in (("WAL archiving", _archiving), ("replicas", _replicas),
                     ("long transactions", _long_transactions),
                     ("invalid indexes", _invalid_indexes), ("backup", _backup),
                     ("timeouts", _timeouts)):
        attempt(name, functools.partial(fn, conn, job, config))
    return checks


def _size_and_wal(conn: Conn, job: store.JobRecord) -> Check:
    """The table's size, and the WAL the job will write: one batch is run in a transaction
    that is rolled back, measuring the WAL it inserted (the undo log's included)."""
    if job.spec.source_dsn is None:
        return _measure(conn, conn, job)
    if source_engine(job.spec.source_dsn) == "mysql":
        return Check("table and WAL", "pass", "a copy from MySQL/MariaDB: the source's size is "
                     f"not measured (~{job.rows_estimate or 0:,} rows); the WAL is the "
                     "destination's rows")
    from backfill.core.db import connect

    if job.kind == "delete":
        return Check("table and WAL", "pass", "a move's second phase deletes on the source: "
                     "its figures are the copy's")
    with connect(job.spec.source_dsn, application_name="backfill preflight source") as src:
        return _measure(conn, src, job)


def _measure(conn: Conn, read: Conn, job: store.JobRecord) -> Check:
    row = read.execute(
        """SELECT pg_total_relation_size(c.oid), greatest(c.reltuples, 0)::bigint
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s""",
        (job.source_schema, job.source_table)).fetchone()
    size, rows = (int(row[0]), int(row[1])) if row else (0, 0)
    from backfill.safety.rehearsal import latest

    base = {"rows_estimate": rows, "table_bytes": size}
    what = f"{rows:,} rows, {size / 2**20:,.1f} MB"
    rehearsed = latest(conn, job.id)
    rehearsed_per_row = float(rehearsed.get("wal_bytes_per_row") or 0) if rehearsed else 0.0
    sample = _sample_wal(conn, read, job, what, base)
    if isinstance(sample, Check) and not rehearsed_per_row:
        return sample   # no sample (started, sql/transform, or it failed) and no rehearsal
    sampled = sample if isinstance(sample, float) else None
    # Both, when both exist: the larger. A rehearsal on a clone may miss the full-page images
    # production writes (see rehearsal.rehearse); a one-batch sample may miss what later
    # batches meet. Neither is preferred blindly, and both are shown.
    measured = {name: value for name, value in (
        ("a rolled-back sample batch", sampled),
        (f"the rehearsal on {rehearsed.get('clone') if rehearsed else ''}", rehearsed_per_row))
        if value}
    source, per_row = max(measured.items(), key=lambda m: m[1]) if measured else (
        "a rolled-back sample batch", 0.0)
    how = (f"the larger of {' and '.join(f'{n} ({v:,.0f})' for n, v in measured.items())}"
           if len(measured) > 1 else source)
    estimate = per_row * rows
    return Check("table and WAL", "pass",
                 f"{what}; about {estimate / 2**20:,.1f} MB of WAL ({per_row:,.0f} bytes per "
                 f"changed row: {how})",
                 {**base, "wal_bytes_per_row": per_row, "wal_bytes_estimate": estimate,
                  "source": "sample" if source.startswith("a rolled-back") else "rehearsal",
                  "sampled_wal_bytes_per_row": sampled,
                  "rehearsed_wal_bytes_per_row": rehearsed_per_row or None})


def _sample_wal(conn: Conn, read: Conn, job: store.JobRecord, what: str,
                base: dict[str, Any]) -> float | Check:
    """WAL bytes per changed row of the job's first batch, run in a transaction that is
    rolled back; or the check to report when no sample can be taken."""
    if job.started_at is not None:
        return Check("table and WAL", "pass", f"{what} (the job has started: no sample batch)",
                     base)
    if job.kind in ("sql", "transform"):
        # A sql statement or a transform's Python may have effects a rollback does not undo
        # (sequences, calls out): no sample; a rehearsal measures them.
        return Check("table and WAL", "warn", f"{what}; WAL not sampled for a {job.kind} job "
                     "(`backfill rehearse` measures it)", base)
    prepared = prepare_stored(conn, job, explain=False,
                              source=read if read is not conn else None)
    bounds = prepared.first_batch(read)
    if bounds is None:
        return 0.0
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('statement_timeout', '30s', true), "
                         "set_config('lock_timeout', %s, true)",
                         (f"{max(1, int(job.options.lock_timeout_ms))}ms",))
            before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            first, upper = bounds
            changed = (prepared.copy_remote(read, conn, None, upper) if prepared.remote
                       else prepared.write_batch(conn, None, upper, first))
            after = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                                 (before[0] if before else None,)).fetchone()
            sampled = float(after[0]) if after and after[0] is not None else 0.0
            return sampled / changed if changed else 0.0
    except psycopg.Error as exc:
        # The job's own first batch will meet this too; that is the job's business (its
        # retries, its failure with the range), not a reason to refuse the start.
        msg = (exc.diag.message_primary or str(exc)).strip()
        return Check("table and WAL", "warn", f"{what}; the sample batch failed ({msg}): the "
                     "job's first batch may too", base)


def _local_host(dsn: str) -> bool:
    host = str(conninfo_to_dict(dsn).get("host") or "")
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def _disk(conn: Conn, dsn: str, config: PreflightConfig, wal: float | None) -> Check:
    free: float | None = None
    how = ""
    if config.disk_free_command:
        out = _run(config.disk_free_command, config.command_timeout_s)
        free, how = float(parse_size(out.strip().splitlines()[-1])), "disk_free_command"
    elif _local_host(dsn):
        try:
            row = conn.execute("SELECT current_setting('data_directory', true)").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            row = None   # not superuser nor pg_read_all_settings: cannot see it
        path = row[0] if row else None
        if path and os.path.isdir(path):
            st = os.statvfs(path)
            free, how = float(st.f_bavail * st.f_frsize), f"statvfs({path})"
    if free is None:
        return Check("free disk", "warn", "cannot see the server's disk from here: set "
                     "disk_free_command in the pre-flight config")
    need = (wal or 0.0) * config.wal_headroom
    details = {"free_bytes": free, "needed_bytes": need, "source": how}
    if free < need:
        return Check("free disk", "fail", f"{free / 2**30:,.2f} GiB free, the job needs about "
                     f"{need / 2**30:,.2f} GiB ({config.wal_headroom:g}x its WAL)", details)
    return Check("free disk", "pass", f"{free / 2**30:,.2f} GiB free ({how}); the job's WAL "
                 f"x{config.wal_headroom:g} is {need / 2**30:,.2f} GiB", details)


def _archiving(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    row = conn.execute(
        """SELECT current_setting('archive_mode'), archived_count, failed_count,
                  extract(epoch FROM now() - last_archived_time)::float8,
                  last_failed_time > coalesce(last_archived_time, '-infinity'),
                  last_archived_wal,
                  CASE WHEN pg_is_in_recovery() THEN NULL
                       ELSE pg_walfile_name(pg_current_wal_lsn()) END,
                  current_setting('wal_segment_size')
           FROM pg_stat_archiver""").fetchone()
    assert row is not None
    mode, archived, failed, age, failing, last_wal, current_wal, seg_size = row
    # A quiet server archives nothing for hours, rightly: what matters is a backlog, the
    # segments finished since the last one archived.
    backlog = _segments_between(last_wal, current_wal, str(seg_size)) if last_wal else None
    if backlog is not None and backlog <= 1:
        age = None
    if mode == "off":
        return Check("WAL archiving", "warn", "archive_mode is off: no point-in-time recovery "
                     "covers this change (keep the undo log, or take a backup first)")
    if failing:
        return Check("WAL archiving", "fail", f"archiving is failing ({failed} failures, the "
                     "last after the last success): WAL piles up on the primary")
    if archived and age is not None and age > config.max_archive_age_s:
        return Check("WAL archiving", "fail", f"{backlog} finished WAL segment(s) wait to be "
                     f"archived; the last was archived {format_duration(age)} ago (limit "
                     f"{format_duration(config.max_archive_age_s)})")
    return Check("WAL archiving", "pass", f"archive_mode {mode}, {archived} archived, "
                 + ("up to date" if backlog is not None and backlog <= 1 else
                    f"last {format_duration(age)} ago" if age is not None else "none yet"))


def _segments_between(last: str, current: str | None, seg_size: str) -> int | None:
    """Finished segments after ``last`` and before ``current`` (WAL file names)."""
    if not current or len(last) < 24 or len(current) < 24:
        return None
    size = int(parse_size(seg_size.replace("MB", "MiB").replace("GB", "GiB")))
    per_log = 0x100000000 // max(size, 1)

    def number(name: str) -> int:
        return int(name[8:16], 16) * per_log + int(name[16:24], 16)

    try:
        return number(current) - number(last) - 1
    except ValueError:
        return None


def _replicas(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    rows = conn.execute(
        """SELECT application_name, client_addr::text, state,
                  extract(epoch FROM coalesce(replay_lag, interval '0'))::float8
           FROM pg_stat_replication""").fetchall()
    if not rows:
        return Check("replicas", "pass", "no standby streams from this server")
    if any(r[2] is None for r in rows):
        return Check("replicas", "warn", "cannot see the standbys' state: the role needs "
                     "pg_read_all_stats (or pg_monitor)")
    bad = [f"{r[0] or r[1]}: {r[2]}" for r in rows if r[2] != "streaming"]
    slow = [f"{r[0] or r[1]}: replay lag {r[3]:.1f}s" for r in rows
            if r[3] > config.max_replica_lag_s]
    details = {"standbys": [{"name": r[0], "addr": r[1], "state": r[2], "lag_s": r[3]}
                            for r in rows]}
    if bad or slow:
        return Check("replicas", "fail", "; ".join(bad + slow), details)
    return Check("replicas", "pass", f"{len(rows)} standby(s) streaming, replay lag at most "
                 f"{max(r[3] for r in rows):.1f}s", details)


def _long_transactions(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    sees = conn.execute("SELECT pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') OR "
                        "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
    if not (sees and sees[0]):
        return Check("long transactions", "warn", "cannot see other roles' transactions: the "
                     "role needs pg_read_all_stats (or pg_monitor)")
    row = conn.execute(
        """SELECT pid, state, extract(epoch FROM now() - xact_start)::float8,
                  left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
           FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL
             AND backend_type = 'client backend'
           ORDER BY xact_start LIMIT 1""").fetchone()
    if row is None or row[2] < config.max_transaction_age_s:
        age = f"{row[2]:.0f}s" if row else "none"
        return Check("long transactions", "pass", f"oldest open transaction: {age}")
    return Check("long transactions", "fail",
                 f"pid {row[0]} ({row[1]}) has had a transaction open for "
                 f"{format_duration(row[2])}: it holds back vacuum, so every row the job "
                 f"rewrites stays as a dead version until it ends ({row[3]})",
                 {"pid": row[0], "age_s": row[2]})


def _invalid_indexes(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    # The table the job writes: its own, or a copy's destination here.
    # By oid, or by the name read as SQL reads it and quoted: never the raw text.
    if job.kind in ("copy", "move", "revert") and job.spec.dest:
        written, oid = job.spec.dest, table_oid(conn, job.spec.dest)
    else:
        written, oid = job.table, job.source_oid
    rows = conn.execute(
        """SELECT i.indexrelid::regclass::text FROM pg_index i
           WHERE i.indrelid = %s AND NOT i.indisvalid""",
        (oid,)).fetchall()
    if rows:
        names = ", ".join(r[0] for r in rows)
        return Check("invalid indexes", "fail", f"{names}: left by a failed CREATE INDEX "
                     "CONCURRENTLY; every write maintains it and no query uses it (drop it, or "
                     "rebuild it concurrently)")
    return Check("invalid indexes", "pass", f"no invalid index on {written}")


def _backup(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    if not config.backup_command:
        return Check("backup", "warn", "no backup_command configured: the last backup's age "
                     "is unknown")
    out = _run(config.backup_command, config.command_timeout_s)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not lines:
        return Check("backup", "fail", "backup_command printed nothing")
    last = lines[-1]
    try:
        when = dt.datetime.fromtimestamp(float(last), dt.UTC)
    except ValueError:
        when = dt.datetime.fromisoformat(last.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    age = (dt.datetime.now(dt.UTC) - when).total_seconds()
    details = {"last_backup": when.isoformat(), "age_s": age}
    if age > config.backup_max_age_s:
        return Check("backup", "fail", f"the last backup is {format_duration(age)} old "
                     f"(limit {format_duration(config.backup_max_age_s)})", details)
    return Check("backup", "pass", f"last backup {format_duration(age)} ago", details)


def _timeouts(conn: Conn, job: store.JobRecord, config: PreflightConfig) -> Check:
    o = job.options
    if not (o.lock_timeout_ms > 0 and o.statement_timeout_ms > 0
            and math.isfinite(o.statement_timeout_ms)):
        return Check("timeouts", "fail", "the job needs a lock_timeout and a statement_timeout")
    return Check("timeouts", "pass", f"lock_timeout {o.lock_timeout_ms:.0f}ms, "
                 f"statement_timeout {o.statement_timeout_ms:.0f}ms per batch")


def _run(command: str, timeout_s: float) -> str:
    started = time.monotonic()
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{command!r} did not finish in {timeout_s:g}s") from None
    except OSError as exc:
        raise ValueError(f"cannot run {command!r}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise ValueError(f"{command!r} exited {done.returncode} after "
                         f"{time.monotonic() - started:.1f}s: {done.stderr.strip()[:200]}")
    return done.stdout
