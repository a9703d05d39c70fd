"""The documented entry points work as written: the README's API example and CLI flows."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg

from tests.integration.helpers import ROOT, cli, cli_env, counter_histogram, make_counter_table


def test_readme_api_example_runs(dsn: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_example.py")],
        capture_output=True, text=True, timeout=120, env=cli_env(BACKFILL_DSN=dsn), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "50000 rows changed, verified ok=True" in proc.stdout
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT count(*) FROM users WHERE email_lower = lower(email)").fetchone()
        assert row == (50_000,)


def test_cli_flow_enqueue_run_list_show_tune_verify(dsn: str) -> None:
    make_counter_table(dsn, 3_000)
    enq = cli(dsn, "enqueue", "-t", "items", "--set", "note = 'n' || (val % 7)",
              "--batch-size", "500", "--target-duration", "200ms", "--quiet")
    assert enq.returncode == 0, enq.stderr
    job_id = enq.stdout.strip()
    assert job_id.isdigit()
    tuned = cli(dsn, "tune", job_id, "--rate", "100000", "--pause", "1ms")
    assert tuned.returncode == 0, tuned.stderr
    listed = cli(dsn, "list", "--json")
    assert listed.returncode == 0
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["state"], row["options"]["rate_limit"]) == (int(job_id), "pending", 100000.0)
    dry = cli(dsn, "run", job_id, "--dry-run", "--json")
    plan = json.loads(dry.stdout)
    assert plan["first_batch"] == ["1", "500"]
    assert "Index" in plan["explain"]
    ran = cli(dsn, "run", job_id)
    assert ran.returncode == 0, ran.stderr
    assert "succeeded" in ran.stdout
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM items WHERE note = 'n' || (val % 7)").fetchone() == (3_000,)
    shown = cli(dsn, "show", job_id, "--json")
    data = json.loads(shown.stdout)
    assert data["state"] == "succeeded"
    assert [e["kind"] for e in data["events"]][:2] == ["created", "tuned"]
    assert data["events"][1]["actor"] == "tester"
    assert data["slices"][0]["done"] is True
    verified = cli(dsn, "verify", job_id)
    assert verified.returncode == 0
    assert "no differences" in verified.stdout
    text = cli(dsn, "show", job_id)
    assert "succeeded" in text.stdout
    assert "events" in text.stdout
    watch = cli(dsn, "watch", "--all", "--count", "1")
    assert watch.returncode == 0
    assert job_id in watch.stdout


def test_run_a_defined_job_by_name_and_list_defined(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("""CREATE TABLE demo_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     quantity int NOT NULL, unit_price_cents int NOT NULL, total_cents bigint)""")
        c.execute("""INSERT INTO demo_orders (quantity, unit_price_cents)
                     SELECT 1 + i % 7, 100 + i % 1000 FROM generate_series(1, 5000) i""")
    defined = cli(dsn, "list", "--defined", "--json")
    names = {d["name"]: d["description"] for d in json.loads(defined.stdout)}
    assert "quantity * unit_price_cents" in names["demo_fill_total"]
    ran = cli(dsn, "run", "demo_fill_total")
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(cli(dsn, "show", "demo_fill_total", "--json").stdout)
    assert shown["state"] == "succeeded"
    assert cli(dsn, "verify", "demo_fill_total").returncode == 0


def test_pause_resume_cancel_retry_from_cli_record_the_actor(dsn: str) -> None:
    make_counter_table(dsn, 100)
    job_id = cli(dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1", "-q").stdout.strip()
    assert cli(dsn, "pause", job_id, "--reason", "deploy freeze").returncode == 0
    ran = cli(dsn, "run", job_id)  # run resumes a paused job
    assert ran.returncode == 0, ran.stderr
    assert counter_histogram(dsn) == {1: 100}
    events = json.loads(cli(dsn, "show", job_id, "--json").stdout)["events"]
    pause = next(e for e in events if e["to"] == "paused")
    assert (pause["actor"], pause["reason"]) == ("tester", "deploy freeze")
    again = cli(dsn, "cancel", job_id)
    assert again.returncode == 2
    assert "already succeeded" in again.stderr


def test_a_password_in_the_dsn_never_reaches_output_or_logs(dsn: str) -> None:
    """Trust authentication ignores the password, so the run succeeds while carrying one."""
    make_counter_table(dsn, 2_000)
    secret_dsn = f"{dsn} password=hunter2-secret"
    job_id = cli(secret_dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1",
                 "-q").stdout.strip()
    outputs = [cli(secret_dsn, "--log-level", "debug", "run", job_id)]
    outputs += [cli(secret_dsn, *args) for args in (["show", job_id], ["list", "--all"],
                                                     ["db", "status"], ["verify", job_id])]
    for proc in outputs:
        assert proc.returncode in (0, 1), proc.stderr
        assert "hunter2" not in proc.stdout
        assert "hunter2" not in proc.stderr
    assert counter_histogram(dsn) == {1: 2_000}
    assert "batch.done" in outputs[0].stderr  # the debug log really ran


def test_logs_are_json_lines_with_ids_and_one_line_per_state_change(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    job_id = cli(dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1",
                 "--batch-size", "250", "--min-batch-size", "250", "--max-batch-size", "250",
                 "-q").stdout.strip()
    run = cli(dsn, "--log-level", "debug", "run", job_id)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(ln) for ln in run.stderr.splitlines() if ln.startswith("{")]
    changes = [ln for ln in lines if ln["event"] == "job.transition"]
    assert [(c["from_state"], c["to_state"]) for c in changes] == [
        ("pending", "running"), ("running", "succeeded")]
    assert all(c["job_id"] == int(job_id) and c["actor"] for c in changes)
    batches = [ln for ln in lines if ln["event"] == "batch.done"]
    assert len(batches) == 4
    assert all({"job_id", "slice", "batch_id", "rows", "ms"} <= set(b) for b in batches)


def test_watch_once_prints_the_jobs_for_scripts(dsn: str) -> None:
    make_counter_table(dsn, 1_000)
    job_id = cli(dsn, "enqueue", "-t", "items", "--set", "counter = counter + 1",
                 "-q").stdout.strip()
    assert cli(dsn, "run", job_id).returncode == 0
    res = cli(dsn, "watch", "--once", "--all")
    assert res.returncode == 0, res.stderr
    assert "succeeded" in res.stdout
    assert "############" in res.stdout  # the progress bar, full
    assert "(100.0%)" in res.stdout
