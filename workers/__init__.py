"""The Celery layer: thin adapters from tasks to the core in :mod:`backfill`.

Distributed execution (the Celery app, batch tasks, leases and the reaper) lands with the
distributed-execution issue; until then jobs run inline with ``backfill run``.
"""
