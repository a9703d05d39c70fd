"""A MySQL copy job's catch-up, as ``backfill show JOB`` reports it: the binlog position the
job recorded before its first batch (:func:`backfill.mysql.copy.record_job_start`), the
catch-up's applied position, and its lag (:func:`backfill.mysql.binlog.measure_lag`).

The job store answers the positions; the lag needs the source, which may be down or hang: it
is read in a thread bounded by ``timeout`` (and short connect timeouts), and a failure is a
state ``unknown`` with its reason, never an exception.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from backfill.core.db import connect as pg_connect

#: Seconds ``show`` waits for the source's lag at most.
LAG_TIMEOUT = 5.0


def catch_up_status(dest_dsn: str, job: Any, *, timeout: float = LAG_TIMEOUT) -> dict[str, Any]:
    """``job`` (a :class:`backfill.state.store.JobRecord` of a MySQL copy): its catch-up as
    a JSON-able dict, ``state`` one of ``not started`` (no position recorded yet),
    ``not recorded`` (the job started without one: see its warning events), ``waiting for the
    copy``, ``catch-up not run``, ``behind``, ``caught up`` or
    ``unknown`` (with ``reason``)."""
    from backfill.mysql.copy import read_job_state

    try:
        with pg_connect(dest_dsn, application_name="backfill-show") as pg:
            found = read_job_state(pg, job.id)
    except Exception as exc:   # shown, not raised: show must not fail on the catch-up
        return {"state": "unknown", "reason": _reason(exc)}
    if found is None:
        if job.started_at is None:
            return {"state": "not started",
                    "reason": "the binlog position is recorded when the job starts"}
        return {"state": "not recorded", "reason": "the job started without a binlog "
                "position (see its warning events): no catch-up for this copy"}
    schema, name, state = found
    out: dict[str, Any] = {
        "table": f"{schema}.{name}", "binlog_start": str(state.start),
        "binlog_applied": str(state.applied), "events_applied": state.events_applied,
        "last_event_at": state.applied_event_at}
    if not state.copy_done:
        out["state"] = "waiting for the copy"
        return out
    box: dict[str, Any] = {}

    def measure() -> None:
        try:
            box["lag"] = _lag(dest_dsn, job, schema, name, timeout)
        except BaseException as exc:   # reported as the reason
            box["error"] = exc

    worker = threading.Thread(target=measure, name=f"lag-{job.id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        out.update(state="unknown", reason=f"the source did not answer within {timeout:g}s")
    elif "error" in box:
        out.update(state="unknown", reason=_reason(box["error"]))
    else:
        lag = box["lag"]
        if state.applied == state.start and not state.events_applied and lag.events:
            status = "catch-up not run"
        else:
            status = "behind" if lag.events else "caught up"
        out.update(state=status, lag_seconds=round(lag.seconds, 1), lag_events=lag.events,
                   binlog_source=str(lag.source))
    return out


def _lag(dest_dsn: str, job: Any, schema: str, name: str, timeout: float) -> Any:
    from backfill.mysql.binlog import measure_lag
    from backfill.mysql.job import open_job_source
    from backfill.mysql.source import MySQLSource

    source = MySQLSource.parse(job.spec.source_dsn)
    bound = max(1, int(timeout))
    source = dataclasses.replace(source, connect_timeout=min(source.connect_timeout, bound),
                                 read_timeout=bound)
    columns = [c["name"] for c in (job.spec.source_plan or {}).get("columns", [])]
    src, _ = open_job_source(job.spec, dest_schema=schema, dest_name=name,
                             dest_columns=columns, source=source)
    return measure_lag(source, dest_dsn, [src.plan])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
