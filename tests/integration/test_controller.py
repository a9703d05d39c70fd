"""The controller against real servers: a primary with wal_level=logical and a streaming replica
made by pg_basebackup; real lock waiters, a real logical slot, a real long transaction."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backfill import Backfill, JobState, update
from backfill.control.controller import Controller, ControllerConfig
from backfill.control.policy import Limit, PolicyConfig
from backfill.control.signals import Replica
from backfill.state import control
from backfill_dev.localpg import LocalPostgres, find_pg_bindir
from tests.integration.helpers import (
    ROOT,
    cli,
    cli_env,
    cli_popen,
    counter_histogram,
    make_counter_table,
    wait_for,
)
from tests.integration.servers import free_port

POLL = 0.2
HOLD = 1.0
INC = {"counter": "counter + 1"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    if os.environ.get("BACKFILL_TEST_DSN"):
        pytest.skip("needs local server binaries to build a primary and a replica")
    try:
        find_pg_bindir()
    except RuntimeError as exc:
        if os.environ.get("BACKFILL_REQUIRE_PG") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    base = Path(tempfile.mkdtemp(prefix="backfill-test-repl-", dir="/tmp"))
    base.chmod(0o755)
    primary = LocalPostgres(base / "primary", settings={"wal_level": "logical"})
    replica: LocalPostgres | None = None
    try:
        primary.init()
        primary.start()
        replica = primary.make_replica(base / "replica")
        replica.start()
        yield primary, replica
    finally:
        for server in (replica, primary):
            if server is not None:
                with contextlib.suppress(RuntimeError):
                    server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dbs(cluster: tuple[LocalPostgres, LocalPostgres]) -> Iterator[tuple[str, str]]:
    """A fresh database on the primary, with the state schema; (primary DSN, replica DSN)."""
    primary, replica = cluster
    name = f"ctl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(primary.dsn(), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    dsn, rdsn = primary.dsn(name), replica.dsn(name)
    Backfill(dsn).upgrade()

    def replayed() -> bool:
        try:
            with psycopg.connect(rdsn, autocommit=True, connect_timeout=2) as c:
                return c.execute("SELECT to_regclass('backfill.heartbeat') IS NOT NULL"
                                 ).fetchone() == (True,)
        except psycopg.OperationalError:
            return False

    wait_for(replayed, timeout=30, what="the replica to replay the new database")
    yield dsn, rdsn
    with psycopg.connect(primary.dsn(), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


class Running:
    """A controller in a thread, as `backfill controller run` runs it."""

    def __init__(self, dsn: str, limits: dict[str, Limit], replicas: tuple[Replica, ...] = (),
                 **config: Any) -> None:
        self.stop = threading.Event()
        cfg = ControllerConfig(poll_s=POLL, policy=PolicyConfig(limits=limits, hold_s=HOLD),
                               replicas=replicas, **config)
        self.controller = Controller(dsn, cfg, actor="controller:test", stop=self.stop)
        self.thread = threading.Thread(target=self.controller.run_forever, daemon=True)

    def __enter__(self) -> Controller:
        self.thread.start()
        return self.controller

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _slow_job(dsn: str, rows: int = 30_000) -> int:
    make_counter_table(dsn, rows)
    job = Backfill(dsn).enqueue(update("items", INC, batch_size=100, min_batch_size=100,
                                       max_batch_size=100, pause="30ms"))
    return job.id


def _replica_lag_read(dsn: str) -> bool:
    """The controller's last tick read replica_lag[r1] (a value, not an error)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        status = control.controller_status(conn)
    readings = (status or {}).get("readings") or []
    return any(r.get("signal") == "replica_lag[r1]" and r.get("value") is not None
               for r in readings)


def _state(dsn: str, job_id: int) -> JobState:
    return Backfill(dsn).get(job_id).state


def _finish(proc: subprocess.Popen[str]) -> None:
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr


def _decisions(dsn: str, job_id: int) -> list[tuple[str | None, str | None, str | None]]:
    return [(e.from_state, e.to_state, e.reason) for e in Backfill(dsn).events(job_id)
            if e.kind == "transition" and e.actor == "controller:test"]


def test_replica_lag_throttles_within_a_poll_and_resumes_after_the_hold(
        dbs: tuple[str, str]) -> None:
    dsn, rdsn = dbs
    job_id = _slow_job(dsn)
    bf = Backfill(dsn)
    replay = psycopg.connect(rdsn, autocommit=True)
    # 2 s: a loaded replica on a small machine lags about a second by itself.
    with Running(dsn, {"replica_lag": Limit(2.0, 1.0)}, (Replica("r1", rdsn),)):
        # Until the replica has replayed a heartbeat of this controller its lag is unknown
        # and the controller fails closed (a loaded machine takes a moment): start then.
        wait_for(lambda: _replica_lag_read(dsn), timeout=30, what="a replayed heartbeat")
        proc = cli_popen(dsn, "run", str(job_id), "--no-progress")
        try:
            wait_for(lambda: bf.progress(job_id).batches >= 3, timeout=60, what="batches")
            assert _state(dsn, job_id) == JobState.RUNNING
            replay.execute("SELECT pg_wal_replay_pause()")
            paused_at = time.monotonic()
            wait_for(lambda: _state(dsn, job_id) == JobState.THROTTLED, timeout=20,
                     interval=0.02, what="throttled")
            # The lag passes 2 s two seconds after the pause; a poll later it is throttled.
            assert time.monotonic() - paused_at <= 2.0 + 4 * POLL + 0.5
            shown = cli(dsn, "show", str(job_id))
            assert "throttled" in shown.stdout
            # The reason names the first reading over its limit: the heartbeat through r1, or
            # pg_stat_replication's replay lag of the same standby, which can cross 2 s in the
            # same poll (both read the one paused replica).
            assert ("replica_lag[r1]" in shown.stdout
                    or "standby_replay_lag[walreceiver@" in shown.stdout), shown.stdout
            # Throttled inline: the runner waits outside any transaction, and writes nothing.
            scanned = bf.progress(job_id).rows_scanned
            time.sleep(0.5)
            assert bf.progress(job_id).rows_scanned == scanned
            with psycopg.connect(dsn, autocommit=True) as c:
                states = [r[0] for r in c.execute(
                    "SELECT state FROM pg_stat_activity WHERE application_name = %s",
                    (f"backfill job {job_id}",)).fetchall()]
            assert states
            assert "idle in transaction" not in states
            replay.execute("SELECT pg_wal_replay_resume()")
            resumed_replay = time.monotonic()
            wait_for(lambda: _state(dsn, job_id) != JobState.THROTTLED, timeout=30,
                     interval=0.02, what="resumed")
            assert time.monotonic() - resumed_replay >= HOLD  # hysteresis: the hold time
            _finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            replay.execute("SELECT pg_wal_replay_resume()")
            replay.close()
    assert counter_histogram(dsn) == {1: 30_000}
    decisions = _decisions(dsn, job_id)
    assert decisions[0][:2] == ("running", "throttled")
    reason = decisions[0][2] or ""
    assert "replica_lag[r1]" in reason or "standby_replay_lag[walreceiver@" in reason, reason
    assert decisions[1][:2] == ("throttled", "running")
    throttle = next(e for e in bf.events(job_id) if e.to_state == "throttled")
    assert throttle.details is not None
    # The readings over their limit: the heartbeat through r1, or the standby's own replay
    # lag (pg_stat_replication), which may cross first: both read the one paused replica.
    signals = {r["signal"] for r in throttle.details["readings"]}
    assert "replica_lag[r1]" in signals or any(
        s.startswith("standby_replay_lag[walreceiver@") for s in signals), signals


def test_lock_waiters_throttle_and_their_release_resumes(dbs: tuple[str, str]) -> None:
    dsn, _ = dbs
    job_id = _slow_job(dsn, 20_000)
    bf = Backfill(dsn)
    holder = psycopg.connect(dsn)
    waiters: list[threading.Thread] = []

    def wait_on_lock() -> None:
        with psycopg.connect(dsn, autocommit=True, application_name="app") as c:
            c.execute("UPDATE items SET val = val WHERE id = 1")

    with Running(dsn, {"lock_waiters": Limit(2, 1)}):
        proc = cli_popen(dsn, "run", str(job_id), "--no-progress")
        try:
            wait_for(lambda: bf.progress(job_id).batches >= 3, timeout=60, what="batches")
            holder.execute("LOCK TABLE items IN SHARE MODE")  # row writers queue behind it
            for _ in range(3):
                t = threading.Thread(target=wait_on_lock, daemon=True)
                t.start()
                waiters.append(t)
            wait_for(lambda: _state(dsn, job_id) == JobState.THROTTLED, timeout=20,
                     what="throttled")
            reason = bf.get(job_id).state_reason or ""
            assert "lock_waiters[job" in reason
            assert "app (pid" in reason
            holder.commit()
            for t in waiters:
                t.join(timeout=30)
            wait_for(lambda: _state(dsn, job_id) != JobState.THROTTLED, timeout=30,
                     what="resumed")
            _finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            holder.close()
    assert counter_histogram(dsn) == {1: 20_000}


def test_a_logical_slot_left_behind_throttles(dbs: tuple[str, str]) -> None:
    dsn, _ = dbs
    job_id = _slow_job(dsn, 20_000)
    bf = Backfill(dsn)
    slot = f"gone_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    try:
        with Running(dsn, {"slot_retained": Limit(512 * 1024, 256 * 1024)}):
            proc = cli_popen(dsn, "run", str(job_id), "--no-progress")
            try:
                # The job's own writes are WAL the abandoned slot holds on to.
                wait_for(lambda: _state(dsn, job_id) == JobState.THROTTLED, timeout=60,
                         what="throttled")
                reason = bf.get(job_id).state_reason or ""
                assert f"slot_retained[{slot}]" in reason
                assert "inactive" in reason
                with psycopg.connect(dsn, autocommit=True) as c:
                    c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                slot = ""
                wait_for(lambda: _state(dsn, job_id) != JobState.THROTTLED, timeout=30,
                         what="resumed")
                _finish(proc)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        if slot:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert counter_histogram(dsn) == {1: 20_000}


def test_a_long_transaction_throttles_and_an_operator_pause_wins(dbs: tuple[str, str]) -> None:
    dsn, _ = dbs
    job_id = _slow_job(dsn, 20_000)
    bf = Backfill(dsn)
    with Running(dsn, {"long_transaction": Limit(1.0, 0.5)}):
        proc = cli_popen(dsn, "run", str(job_id), "--no-progress")
        try:
            wait_for(lambda: bf.progress(job_id).batches >= 3, timeout=60, what="batches")
            with psycopg.connect(dsn, application_name="reporting") as long_tx:
                long_tx.execute("SELECT txid_current()")  # opens a transaction, then idles
                wait_for(lambda: _state(dsn, job_id) == JobState.THROTTLED, timeout=20,
                         what="throttled")
                reason = bf.get(job_id).state_reason or ""
                assert "long_transaction" in reason
                assert "(reporting), idle in transaction" in reason
                bf.pause(job_id, reason="operator looks into it")
                long_tx.rollback()
            # Healthy again for far longer than the hold time: the pause stays.
            time.sleep(HOLD + 6 * POLL)
            assert _state(dsn, job_id) == JobState.PAUSED
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 3, stderr  # the runner exits: paused
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [d[:2] for d in _decisions(dsn, job_id)] == [("running", "throttled")]


def test_an_unreachable_replica_throttles_fail_closed(dbs: tuple[str, str]) -> None:
    dsn, _ = dbs
    job_id = _slow_job(dsn, 20_000)
    dead = f"host=127.0.0.1 port={free_port()} dbname=x user=postgres connect_timeout=1"
    bf = Backfill(dsn)
    with Running(dsn, {"replica_lag": Limit(5, 2)}, (Replica("gone", dead),)):
        proc = cli_popen(dsn, "run", str(job_id), "--no-progress")
        try:
            wait_for(lambda: _state(dsn, job_id) == JobState.THROTTLED, timeout=30,
                     what="throttled")
            reason = bf.get(job_id).state_reason or ""
            assert "cannot read replica_lag[gone]" in reason
            assert "fail closed" in reason
            bf.cancel(job_id)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_global_budget_is_shared_by_running_jobs(dbs: tuple[str, str]) -> None:
    dsn, _ = dbs
    make_counter_table(dsn, 8_000)
    bf = Backfill(dsn)
    # Slow enough (pause) that the first poll's share reaches it well before the end.
    job = bf.enqueue(update("items", INC, batch_size=250, min_batch_size=250,
                            max_batch_size=250, pause="50ms"))
    with Running(dsn, {}, rows_per_s=2_000.0):
        proc = cli_popen(dsn, "run", str(job.id), "--no-progress")
        _finish(proc)
    assert bf.get(job.id).rate_share == 2_000.0
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            """SELECT sum(rows_scanned), extract(epoch FROM max(finished_at) - min(finished_at))
               FROM (SELECT * FROM backfill.batches WHERE job_id = %s ORDER BY id OFFSET 8) b""",
            (job.id,)).fetchone()
    assert row is not None
    rate = float(row[0]) / float(row[1])
    assert rate <= 2_000 * 1.15, rate  # the budget, not the database, set the pace


def test_a_standby_controller_takes_over_when_the_leader_dies(dbs: tuple[str, str]) -> None:
    """Two controllers on one host are told apart (controller:host:pid, whatever --actor
    says), a failover shows as a new leader since a new time, and `controller status` shows
    the thresholds in force."""
    dsn, _ = dbs
    env = cli_env()

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "backfill.cli.main", "--dsn", dsn, "--actor", "an operator",
             "controller", "run", "--poll", "0.2s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def status() -> dict[str, Any] | None:
        res = cli(dsn, "controller", "status", "--json")
        if res.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def leader() -> str | None:
        st = status()
        return str(st["leader"]) if st else None

    host = socket.gethostname()
    first = start()
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: leader() == f"controller:{host}:{first.pid}", timeout=30,
                 what="the first controller to lead")
        before = status()
        assert before is not None
        second = start()
        time.sleep(1.0)  # the second is up and polling: it must stand by
        assert leader() == f"controller:{host}:{first.pid}"
        shown = cli(dsn, "controller", "status")
        assert shown.returncode == 0, shown.stderr
        # long_transaction's default limit: throttle at 10m, resume below 5m.
        line = next(ln for ln in shown.stdout.splitlines() if "long_transaction" in ln)
        assert "10m" in line, shown.stdout
        assert "5m" in line, shown.stdout
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        wait_for(lambda: leader() == f"controller:{host}:{second.pid}", timeout=30,
                 what="the second controller to take over")
        after = status()
        assert after is not None
        assert after["leader_since"] > before["leader_since"]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)


def test_every_session_queued_on_the_jobs_rows_is_counted(dsn: str) -> None:
    """Four sessions queued on one row of the job's table are four waiters. The head of the
    queue waits on the holder's transactionid lock (relation NULL), the others on the tuple:
    each is blocked by a session holding locks on the table, and that is what counts."""
    from backfill.control.signals import WatchedJob, lock_waiters
    from backfill.core.db import connect

    make_counter_table(dsn, 10)
    holder = psycopg.connect(dsn, application_name="app holder")
    waiters: list[threading.Thread] = []

    def update_row() -> None:
        with psycopg.connect(dsn, autocommit=True, application_name="app") as c:
            c.execute("UPDATE items SET val = val + 1 WHERE id = 1")

    conn = connect(dsn)
    try:
        holder.execute("UPDATE items SET val = val + 1 WHERE id = 1")  # holds the row
        oid = conn.execute("SELECT 'items'::regclass::oid").fetchone()
        assert oid is not None
        for _ in range(4):
            t = threading.Thread(target=update_row, daemon=True)
            t.start()
            waiters.append(t)
        wait_for(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'app' "
            "AND wait_event_type = 'Lock'").fetchone() == (4,), timeout=20, what="4 waiters")
        count, wait = lock_waiters(conn, WatchedJob(99, (int(oid[0]),)))
        assert count.value == 4, count
        assert wait.value is not None
        assert wait.value > 0
        # A session waiting on another table's rows is not the job's.
        other = lock_waiters(conn, WatchedJob(98, (int(oid[0]) + 100_000,)))
        assert other[0].value == 0
    finally:
        holder.rollback()
        holder.close()
        for t in waiters:
            t.join(timeout=30)
        conn.close()


def test_a_job_throttled_by_a_controller_that_is_gone_says_so(dsn: str) -> None:
    """Fail closed: the job stays throttled when its controller dies, but show, list and
    watch say who throttled it, when that controller last polled, and to check on it."""
    from backfill.core.db import connect
    from backfill.state import control, store

    make_counter_table(dsn, 10)
    job = Backfill(dsn).enqueue(update("items", INC, name="held"))
    conn = connect(dsn)
    wide = {"COLUMNS": "400"}
    try:
        store.transition(conn, job.id, JobState.RUNNING, actor="test", set_owner="x")
        store.transition(conn, job.id, JobState.THROTTLED, actor="controller:h:7",
                         reason="replica_lag[r1] 12s >= 10s")
        # No controller has ever polled (the row is missing): say so.
        res = cli(dsn, "show", str(job.id), env=wide)
        assert "throttled by controller:h:7; no controller polls: is one running?" in res.stdout
        control.record_controller_tick(conn, "controller:h:7", [], {"poll_s": 1.0})
        # Alive: the throttle's own reason, nothing else.
        res = cli(dsn, "show", str(job.id), env=wide)
        assert "(replica_lag[r1] 12s >= 10s)" in res.stdout, res.stdout
        assert "is it running?" not in res.stdout
        conn.execute("UPDATE backfill.controller SET tick_at = now() - interval '300 s'")
        want = re.compile(r"throttled by controller:h:7, last poll 30\d s ago: is it running\?")
        for args in (("show", str(job.id)), ("watch", "--once"), ("list",)):
            res = cli(dsn, *args, env=wide)
            assert res.returncode == 0, res.stderr
            assert want.search(res.stdout), (args, res.stdout)
            assert "replica_lag[r1] 12s >= 10s" in res.stdout, (args, res.stdout)
        listed = json.loads(cli(dsn, "list", "--json").stdout)
        assert listed[0]["state"] == "throttled"
        assert want.match(listed[0]["state_reason"])
        # The operator's way out: an override, recorded with their name and what it lifted.
        res = cli(dsn, "resume", str(job.id), "-r", "its controller host is gone")
        assert res.returncode == 0, res.stderr
        assert "throttle overridden" in res.stdout
        last = store.events(conn, job.id)[-1]
        assert (last.from_state, last.to_state, last.actor) == ("throttled", "running", "tester")
        assert last.reason == ("operator override of the controller's throttle: its "
                               "controller host is gone")
        assert last.details is not None
        assert last.details["throttled_for"] == "replica_lag[r1] 12s >= 10s"
    finally:
        conn.close()
