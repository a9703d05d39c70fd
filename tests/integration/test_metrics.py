"""The exporter: metrics read from the state store, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from backfill import Backfill, JobState, update
from backfill.core.db import connect
from backfill.observe.metrics import serve
from backfill.state import control, store
from tests.integration.helpers import ROOT, cli_env, make_counter_table, wait_for
from tests.integration.servers import free_port

INC = {"counter": "counter + 1"}


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    matches = [v for lab, v in samples.get(name, [])
               if all(lab.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def test_exporter_reports_jobs_and_the_controller(dsn: str) -> None:
    make_counter_table(dsn, 3_000)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE other (id bigint PRIMARY KEY, val int NOT NULL)")
        c.execute("INSERT INTO other SELECT i, i % 10 FROM generate_series(1, 500) i")
        c.execute("CREATE TABLE third (id bigint PRIMARY KEY, val int NOT NULL)")
        c.execute("INSERT INTO third SELECT i, 1 FROM generate_series(1, 200) i")
    bf = Backfill(dsn)
    ok = bf.enqueue(update("items", INC, batch_size=500, parallelism=2))
    assert bf.run(ok.id).state == JobState.SUCCEEDED
    bad = bf.enqueue(update("other", {"val": "val / (val - val)"}, max_retries=0))
    assert bf.run(bad.id).state == JobState.FAILED
    slow = bf.enqueue(update("third", {"val": "val + 1"}, name="slow_one"))
    conn = connect(dsn)
    try:
        store.transition(conn, slow.id, JobState.RUNNING, actor="test", set_owner="x")
        store.transition(conn, slow.id, JobState.THROTTLED, actor="controller:test",
                         reason="replica_lag[r1] 12s >= 10s",
                         details={"readings": [{"signal": "replica_lag[r1]", "value": 12.0}]})
        control.record_controller_tick(
            conn, "controller:test",
            [{"signal": "replica_lag[r1]", "value": 12.0},
             {"signal": "standby_replay_lag[walreceiver@127.0.0.1]", "value": 11.0},
             {"signal": "replica_lag[r2]", "value": None, "error": "connection refused"},
             {"signal": "lock_waiters[job 3]", "value": 4},
             {"signal": "slot_retained[sub]", "value": 1024.0},
             {"signal": "long_transaction", "value": 7.0},
             {"signal": "probe[queue_depth]", "value": 42.0}],
            {"poll_s": 1.0})
    finally:
        conn.close()

    port = free_port()
    server, _ = serve(dsn, port=port, addr="127.0.0.1")
    try:
        m = scrape(port)
    finally:
        server.shutdown()
    assert value(m, "backfill_up") == 1
    j = {"job_id": str(ok.id)}
    assert value(m, "backfill_job_rows_done_total", **j) == 3_000
    assert value(m, "backfill_job_rows_estimated", **j) == 3_000
    assert value(m, "backfill_job_batches_total", **j) == 6
    assert value(m, "backfill_job_state", state="succeeded", **j) == 1
    assert value(m, "backfill_job_state", state="running", **j) == 0
    assert value(m, "backfill_job_slices", done="true", **j) == 2
    assert value(m, "backfill_job_batch_duration_seconds_count", **j) == 6
    assert value(m, "backfill_job_batch_duration_seconds_bucket", le="+Inf", **j) == 6
    assert value(m, "backfill_job_batch_duration_seconds_sum", **j) > 0
    assert value(m, "backfill_job_info", kind="update", table="public.items", **j) == 1
    assert value(m, "backfill_job_last_progress_timestamp_seconds", **j) > 1.7e9
    b = {"job_id": str(bad.id)}
    assert value(m, "backfill_job_state", state="failed", **b) == 1
    assert value(m, "backfill_job_failures_total", **b) == 1
    s = {"job_id": str(slow.id), "job_name": "slow_one"}
    assert value(m, "backfill_job_throttled", signal="replica_lag", **s) == 1
    # One series per replica and method: the heartbeat under the replica's configured name,
    # pg_stat_replication under the standby's (the alert keeps one of the two).
    assert value(m, "backfill_signal_replica_lag_seconds", replica="r1", method="heartbeat") == 12
    assert value(m, "backfill_signal_replica_lag_seconds", replica="walreceiver@127.0.0.1",
                 method="replay_lag") == 11
    assert value(m, "backfill_signal_unreadable", kind="replica_lag", source="r2") == 1
    assert value(m, "backfill_signal_lock_waiters", job_id="3") == 4
    assert value(m, "backfill_signal_slot_retained_bytes", slot="sub") == 1024
    assert value(m, "backfill_signal_long_transaction_seconds") == 7
    assert value(m, "backfill_signal_probe_value", probe="queue_depth") == 42
    assert value(m, "backfill_controller_leader_info", leader="controller:test") == 1
    assert value(m, "backfill_controller_last_poll_timestamp_seconds") > 1.7e9
    # Bounded labels: no key values, no SQL, no free text.
    for samples in m.values():
        for labels, _ in samples:
            assert not any("SELECT" in v or ">=" in v for v in labels.values()), labels


def test_a_rate_limited_job_is_due_when_its_pace_says(dsn: str) -> None:
    """--rate 5 --batch-size 5000: a batch every 1,000 s. Its next batch is due 1,000 s after
    the last one (or after it started), not at once: the stall alert measures against that."""
    make_counter_table(dsn, 100)
    bf = Backfill(dsn)
    slow = bf.enqueue(update("items", INC, batch_size=5000, rate_limit=5, name="slow"))
    conn = connect(dsn)
    try:
        store.transition(conn, slow.id, JobState.RUNNING, actor="test", set_owner="x")
        started = conn.execute(
            "SELECT extract(epoch FROM max(at)) FROM backfill.events WHERE job_id = %s",
            (slow.id,)).fetchone()
    finally:
        conn.close()
    assert started is not None
    port = free_port()
    server, _ = serve(dsn, port=port, addr="127.0.0.1")
    try:
        m = scrape(port)
    finally:
        server.shutdown()
    j = {"job_id": str(slow.id)}
    assert value(m, "backfill_job_batch_interval_seconds", **j) == 1000
    due = value(m, "backfill_job_next_batch_due_timestamp_seconds", **j)
    assert abs(due - (float(started[0]) + 1000)) < 1


def test_readings_expire_with_the_controller_that_made_them(dsn: str) -> None:
    """A controller that stopped polling left 1,265 s of lag behind: not served as if now."""
    conn = connect(dsn)
    try:
        control.record_controller_tick(conn, "controller:h:1",
                                     [{"signal": "replica_lag[r1]", "value": 1265.0}],
                                     {"poll_s": 1.0})
        port = free_port()
        server, _ = serve(dsn, port=port, addr="127.0.0.1")
        try:
            fresh = scrape(port)
            conn.execute("UPDATE backfill.controller SET tick_at = now() - interval '5 min'")
            stale = scrape(port)
        finally:
            server.shutdown()
    finally:
        conn.close()
    assert value(fresh, "backfill_signal_replica_lag_seconds", replica="r1") == 1265
    assert "backfill_signal_replica_lag_seconds" not in stale
    # What the alert needs to say "controller down" is still there.
    assert value(stale, "backfill_controller_last_poll_timestamp_seconds") > 1.7e9
    assert value(stale, "backfill_controller_leader_info", leader="controller:h:1") == 1


def _exporter_backend(dsn: str) -> int:
    """The pid of the backend serving the exporter's connection."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT pid FROM pg_stat_activity "
                        "WHERE application_name = 'backfill exporter'").fetchone()
    assert row is not None
    return int(row[0])


def test_a_hung_database_gives_backfill_up_0_within_the_timeout(dsn: str) -> None:
    """The exporter's backend stopped (SIGSTOP): every scrape answers within its timeout with
    backfill_up 0, and threads do not pile up, concurrent scrapes included."""
    port = free_port()
    server, _ = serve(dsn, port=port, addr="127.0.0.1", timeout_s=1.0)
    pid = None
    try:
        assert value(scrape(port), "backfill_up") == 1
        pid = _exporter_backend(dsn)
        threads = threading.active_count()
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        m = scrape(port)
        assert time.monotonic() - started < 3
        assert value(m, "backfill_up") == 0
        # Later scrapes read on a new connection (the stopped backend is abandoned), and a
        # burst of them at once shares one read.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: scrape(port), range(8)))
        assert time.monotonic() - started < 8
        assert all(value(r, "backfill_up") in (0, 1) for r in results)
        assert threading.active_count() <= threads + 2
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        server.shutdown()


def test_a_stopped_server_gives_backfill_up_0_and_threads_stay_put(dsn: str) -> None:
    """The whole server stopped (postmaster and the exporter's backend): new connections hang
    too. Each scrape answers 0 within its timeout; no thread is left behind per scrape."""
    port = free_port()
    server, _ = serve(dsn, port=port, addr="127.0.0.1", timeout_s=1.0)
    stopped: list[int] = []
    try:
        assert value(scrape(port), "backfill_up") == 1
        backend = _exporter_backend(dsn)
        threads = threading.active_count()
        try:
            for p in (_ppid(backend), backend):  # the postmaster first: no new backends
                os.kill(p, signal.SIGSTOP)
                stopped.append(p)
            for _ in range(6):
                started = time.monotonic()
                assert value(scrape(port), "backfill_up") == 0
                assert time.monotonic() - started < 3
            assert threading.active_count() <= threads + 2
        finally:
            for p in stopped:
                os.kill(p, signal.SIGCONT)
        wait_for(lambda: value(scrape(port), "backfill_up") == 1, timeout=30, interval=0.5,
                 what="backfill_up 1 once the server runs again")
    finally:
        server.shutdown()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_the_exporter_starts_and_serves_0_when_the_database_is_down() -> None:
    port = free_port()
    dead = f"host=127.0.0.1 port={free_port()} dbname=x user=postgres connect_timeout=1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backfill.cli.main", "--dsn", dead, "exporter", "--port", str(port),
         "--addr", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=ROOT)
    try:
        m = wait_for(lambda: _try_scrape(port, proc), timeout=30, what="the exporter to answer")
        assert value(m, "backfill_up") == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving backfill_up 0" in out, out


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _try_scrape(port: int, proc: subprocess.Popen[str]) -> Samples | None:
    assert proc.poll() is None, "the exporter exited"
    try:
        return scrape(port)
    except OSError:
        return None


def test_exporter_says_when_it_cannot_read_the_state_store() -> None:
    port = free_port()
    dead = f"host=127.0.0.1 port={free_port()} dbname=x user=postgres connect_timeout=1"
    server, _ = serve(dead, port=port, addr="127.0.0.1")
    try:
        m = scrape(port)
    finally:
        server.shutdown()
    assert value(m, "backfill_up") == 0


def exported_names() -> set[str]:
    """Every metric name the exporter can emit (from its source: families and suffixes)."""
    text = (ROOT / "backfill" / "observe" / "metrics.py").read_text()
    names = set(re.findall(r'"(backfill_[a-z_]+)"', text))
    counters = set(re.findall(r'CounterMetricFamily\(\s*"(backfill_[a-z_]+)"', text))
    histograms = set(re.findall(r'HistogramMetricFamily\(\s*"(backfill_[a-z_]+)"', text))
    names |= {f"{n}_total" for n in counters}
    names |= {f"{n}{s}" for n in histograms for s in ("_bucket", "_sum", "_count")}
    return names


def test_every_metric_in_rules_and_dashboards_is_exported() -> None:
    names = exported_names()
    used: dict[str, set[str]] = {}
    for path in [*Path(ROOT, "deploy").rglob("*.yml"), *Path(ROOT, "deploy").rglob("*.json")]:
        for name in re.findall(r"\b(backfill_[a-z_]+)", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert used, "no rules or dashboards found under deploy/"
    missing = {n: sorted(p) for n, p in used.items() if n not in names}
    assert not missing, f"used but never exported: {missing}"
