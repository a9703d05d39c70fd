"""The canary: its rows verified before anyone may approve the rest, and its approval, by an
operator or after a quiet ``auto_approve_after``."""

from __future__ import annotations

import dataclasses

from backfill.core.catalog import Conn
from backfill.core.errors import InvalidInput
from backfill.core.logs import get_logger
from backfill.engine.verify import verify
from backfill.job.states import JobState
from backfill.state import checkpoints, store

S = JobState


def approve(conn: Conn, job: store.JobRecord, *, actor: str, reason: str) -> store.JobRecord:
    if job.state == S.AWAITING_APPROVAL:
        report = checkpoints.canary_report(conn, job.id) or {}
        if report.get("verified") is None:
            # Its verifier died before the verdict: verify it here, now.
            verify_canary(conn, job.id, actor=actor)
            report = checkpoints.canary_report(conn, job.id) or {}
        if report.get("verified") is not True:
            raise InvalidInput(f"job {job.id}'s canary did not verify "
                               f"({report.get('verify_detail')}): it cannot be approved")
    with conn.transaction():
        rec = store.transition(conn, job.id, S.PENDING, actor=actor, reason=reason,
                               expect=frozenset({S.AWAITING_APPROVAL}), action="approve")
        conn.execute("UPDATE backfill.jobs SET approved_at = now(), approved_by = %s "
                     "WHERE id = %s", (actor, job.id))
    return dataclasses.replace(rec, approved_by=actor)


def auto_approval_due(conn: Conn, job: store.JobRecord) -> bool | None:
    """For a job awaiting approval with ``auto_approve_after``: True once the quiet period
    has passed with no retry, failure or throttling since the job started; False when there
    was one (an operator decides, and an event says why); None: not yet."""
    wait_ms = job.spec.auto_approve_after_ms
    if wait_ms is None or job.state != S.AWAITING_APPROVAL:
        return None
    row = conn.execute(
        """SELECT
             (SELECT count(*) FROM backfill.events WHERE job_id = %(id)s
                AND (kind IN ('retry', 'canary_failed') OR to_state IN ('throttled', 'failed'))),
             (SELECT extract(epoch FROM now() - max(at)) * 1000 FROM backfill.events
                WHERE job_id = %(id)s AND to_state = 'awaiting_approval'),
             (SELECT count(*) FROM backfill.events WHERE job_id = %(id)s
                AND kind = 'auto_approve_withheld')""", {"id": job.id}).fetchone()
    assert row is not None
    troubles, waited_ms, withheld = int(row[0]), float(row[1] or 0), int(row[2])
    if troubles:
        if not withheld:
            store.add_event(conn, job.id, "auto_approve_withheld", actor="auto-approve",
                            reason=f"{troubles} retries, throttles or failures during the "
                            "canary: an operator must approve")
        return False
    return True if waited_ms >= wait_ms else None


def verify_canary(conn: Conn, job_id: int, *, actor: str) -> bool:
    """Check every row the canary did; a difference fails the job before anyone can approve
    the rest. Records the verdict (the event approve looks for) and returns it."""
    report = verify(conn, job_id)
    if report.ok or report.unverifiable:
        reason = (f"canary verified: {report.checked_rows:,} rows, no differences"
                  if report.ok else f"canary not re-checkable: {report.unverifiable}")
        store.add_event(conn, job_id, "canary_verified", actor=actor, reason=reason,
                        details=report.to_json())
        get_logger(job_id=job_id).info("job.canary_verified", job_id=job_id, rows=report.checked_rows)
        return True
    detail = "; ".join(d.detail for d in report.diffs[:3])
    with conn.transaction():
        store.add_event(conn, job_id, "canary_failed", actor=actor, reason=detail,
                        details=report.to_json())
        store.transition(conn, job_id, S.FAILED, actor=actor,
                         reason=f"canary verification failed: {detail}",
                         expect=frozenset({S.AWAITING_APPROVAL}))
    return False
