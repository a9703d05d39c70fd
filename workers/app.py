"""The Celery application: Redis broker, settings for long, exactly-once-by-checkpoint work.

Redis holds nothing that cannot be rebuilt from PostgreSQL: a lost task is replaced by the
reaper (a thread in every worker) or by dispatching the job again (``backfill dispatch JOB``);
slice leases keep two workers off one slice, dispatch tokens drop leftover tasks, and the
checkpoint's compare-and-set refuses a late duplicate.

Configuration: the ``BACKFILL_*`` environment variables below, then (overriding them and
the project's settings in :data:`DEFAULTS`) any Celery setting in the module named by
``BACKFILL_CELERY_CONFIG`` (e.g. ``myconf`` for a ``myconf.py`` on the path, holding
``broker_url = ...``, ``task_time_limit = ...``), and Celery's own environment variables
(``CELERY_BROKER_URL``). A setting given in the module replaces the project's whole (a
``broker_transport_options`` dict is not merged); use Celery's lowercase setting names.
"""

from __future__ import annotations

import importlib
import os
import types

from celery import Celery

#: Seconds a task works on its slice before it re-dispatches itself and gives the slot back.
SLICE_BUDGET_S = float(os.environ.get("BACKFILL_SLICE_BUDGET_S", "30"))
#: Seconds between reaper passes in each worker (0: no reaper thread).
REAP_EVERY_S = float(os.environ.get("BACKFILL_REAP_EVERY_S", "10"))
#: A task sent this long ago that has not taken its slice's lease is taken as lost.
DISPATCH_STALE_S = float(os.environ.get("BACKFILL_DISPATCH_STALE_S", "120"))
#: Least lease lifetime (it is also at least twice the statement timeout plus 10 s): how long a
#: killed worker's slice waits before the reaper sends it to another worker.
LEASE_TTL_FLOOR_S = float(os.environ.get("BACKFILL_LEASE_TTL_S", "60"))

#: The project's Celery settings: the module named by ``BACKFILL_CELERY_CONFIG`` and Celery's
#: environment variables override any of them.
DEFAULTS: dict[str, object] = {
    "broker_url": os.environ.get("BACKFILL_BROKER_URL", "redis://127.0.0.1:6379/0"),
    "broker_connection_retry_on_startup": True,
    # Visibility timeout far above one task's budget: an unacked task is redelivered only
    # after its worker is really gone.
    "broker_transport_options": {"visibility_timeout": 3600, "socket_connect_timeout": 5},
    "broker_connection_timeout": 5,
    # Sending a task gives up after a few seconds: the caller parks the slice and the reaper
    # sends it once the broker is back.
    "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 1,
                                  "interval_max": 2},
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_serializer": "json",
    "accept_content": ["json"],
    "result_serializer": "json",
    "task_ignore_result": True,
    "task_default_queue": "backfill",
    # A task stops itself after SLICE_BUDGET_S plus one batch; these limits catch a hang.
    "task_soft_time_limit": SLICE_BUDGET_S + 600,
    "task_time_limit": SLICE_BUDGET_S + 660,
    "worker_send_task_events": True,
    "task_send_sent_event": True,
}


def celery_settings(module_name: str | None) -> dict[str, object]:
    """:data:`DEFAULTS` with the settings of the module ``module_name`` on top.

    Merged here rather than with ``app.conf.update`` (which Celery applies above
    ``config_from_object``) or ``app.add_defaults`` (also above it): either would make the
    project's values beat the user's."""
    settings = dict(DEFAULTS)
    if module_name:
        module = importlib.import_module(module_name)
        settings.update({k: v for k, v in vars(module).items()
                         if not k.startswith("_") and not isinstance(v, types.ModuleType)})
    return settings


# ``include`` (not the ``imports`` setting): a config module that sets ``imports`` for its own
# tasks does not drop ours.
app = Celery("backfill", include=["workers.tasks"])
app.config_from_object(celery_settings(os.environ.get("BACKFILL_CELERY_CONFIG")))
