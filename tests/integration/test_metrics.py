"""The exporter: metrics read from the state store, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from backfill import Backfill, JobState, store, update
from backfill.db import connect
from backfill.metrics import serve
from tests.integration.helpers import ROOT, make_counter_table
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
        store.record_controller_tick(
            conn, "controller:test",
            [{"signal": "replica_lag[r1]", "value": 12.0},
             {"signal": "replica_lag[r2]", "value": None, "error": "connection refused"},
             {"signal": "lock_waiters[job 3]", "value": 4},
             {"signal": "slot_retained[sub]", "value": 1024.0}],
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
    assert value(m, "backfill_signal_replica_lag_seconds", source="r1") == 12
    assert value(m, "backfill_signal_unreadable", kind="replica_lag", source="r2") == 1
    assert value(m, "backfill_signal_lock_waiters", source="job 3") == 4
    assert value(m, "backfill_signal_slot_retained_bytes", source="sub") == 1024
    assert value(m, "backfill_controller_leader_info", leader="controller:test") == 1
    assert value(m, "backfill_controller_last_poll_timestamp_seconds") > 1.7e9
    # Bounded labels: no key values, no SQL, no free text.
    for samples in m.values():
        for labels, _ in samples:
            assert not any("SELECT" in v or ">=" in v for v in labels.values()), labels


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
    text = (ROOT / "backfill" / "metrics.py").read_text()
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
