"""Enqueue and run a backfill from a script (the README's Python API example).

    BACKFILL_DSN=postgresql://... python examples/api_example.py
"""

import os

import psycopg

from backfill import Backfill, JobState, update

dsn = os.environ["BACKFILL_DSN"]
with psycopg.connect(dsn, autocommit=True) as conn:  # a small table to work on
    conn.execute("""CREATE TABLE IF NOT EXISTS users (
                        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        email text NOT NULL, email_lower text)""")
    conn.execute("""INSERT INTO users (email)
                    SELECT 'User' || i || '@Example.COM' FROM generate_series(1, 50000) i""")

bf = Backfill(dsn, actor="example-script")
bf.upgrade()  # idempotent: creates or upgrades the `backfill` state schema

# Validated before anything is written: table, column, key, and a dry EXPLAIN of the SET.
job = bf.enqueue(
    update("users", {"email_lower": "lower(email)"}, where="email_lower IS NULL",
           batch_size=2_000, target_duration="200ms"),
)
print(bf.plan(job.id).statement)

finished = bf.run(job.id)  # inline, in this process; returns when done, paused or failed
assert finished.state == JobState.SUCCEEDED, finished.state_reason

report = bf.verify(job.id)  # re-checks every completed range
print(f"job {job.id}: {bf.progress(job.id).rows_affected} rows changed, verified ok={report.ok}")
for event in bf.events(job.id):
    print(event.at.strftime("%H:%M:%S"), event.kind, event.from_state, "->", event.to_state,
          "by", event.actor, "-", event.reason)
