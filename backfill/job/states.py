"""The job state machine: one table of legal transitions, checked in one place."""

from __future__ import annotations

from enum import StrEnum

from backfill.core.errors import IllegalTransition


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    THROTTLED = "throttled"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: A canary ran and verified; the rest waits for `backfill approve` (or auto-approval).
    AWAITING_APPROVAL = "awaiting_approval"


S = JobState

#: from-state -> states it may move to. ``paused -> pending`` is resume (a runner or a worker
#: then moves it to running); ``failed -> pending`` is retry from the checkpoint.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.RUNNING, S.PAUSED, S.CANCELLED}),
    S.RUNNING: frozenset({S.THROTTLED, S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED,
                          S.AWAITING_APPROVAL}),
    S.THROTTLED: frozenset({S.RUNNING, S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED,
                            S.AWAITING_APPROVAL}),
    # approve -> pending (a runner or a worker goes on); a canary that does not verify fails.
    S.AWAITING_APPROVAL: frozenset({S.PENDING, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.PENDING, S.CANCELLED}),
    S.FAILED: frozenset({S.PENDING, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL = frozenset({S.SUCCEEDED, S.CANCELLED})
#: States in which a job holds its table: a second job on the same columns is refused.
ACTIVE = frozenset({S.PENDING, S.RUNNING, S.THROTTLED, S.PAUSED, S.AWAITING_APPROVAL})

_HINTS = {
    S.SUCCEEDED: "it has already succeeded",
    S.CANCELLED: "it was cancelled",
    S.FAILED: "it failed; `backfill retry` moves it back to pending",
    S.PAUSED: "it is paused; `backfill resume` moves it back to pending",
    S.AWAITING_APPROVAL: "its canary is awaiting approval; `backfill approve` lets the rest "
                         "run",
}


def check_transition(job_id: int, current: JobState, target: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is in :data:`TRANSITIONS`."""
    if target not in TRANSITIONS[current]:
        hint = _HINTS.get(current, f"allowed from {current}: "
                          + (", ".join(sorted(TRANSITIONS[current])) or "nothing"))
        raise IllegalTransition(
            f"job {job_id} cannot go from {current} to {target}: {hint}"
        )
