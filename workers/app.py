"""The Celery application: Redis broker, settings for long, exactly-once-by-checkpoint work.

Redis holds nothing that cannot be rebuilt from PostgreSQL: a lost task is replaced by
dispatching the job again (``backfill dispatch JOB``); slice leases keep two workers off one
slice, and the checkpoint's compare-and-set refuses a late duplicate.
"""

from __future__ import annotations

import os

from celery import Celery

#: Seconds a task works on its slice before it re-dispatches itself and gives the slot back.
SLICE_BUDGET_S = float(os.environ.get("BACKFILL_SLICE_BUDGET_S", "30"))

app = Celery("backfill")
app.conf.update(
    broker_url=os.environ.get("BACKFILL_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    # Visibility timeout far above one task's budget: an unacked task is redelivered only
    # after its worker is really gone.
    broker_transport_options={"visibility_timeout": 3600},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_default_queue="backfill",
    # A task stops itself after SLICE_BUDGET_S plus one batch; these limits catch a hang.
    task_soft_time_limit=SLICE_BUDGET_S + 600,
    task_time_limit=SLICE_BUDGET_S + 660,
    worker_send_task_events=True,
    task_send_sent_event=True,
    imports=("workers.tasks",),
)
