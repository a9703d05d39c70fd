"""The controller's rows: the jobs it steers, their rate shares, its tick and leadership, and
the throttles nobody is watching any more."""

from __future__ import annotations

import dataclasses
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backfill.core.catalog import Conn
from backfill.job.states import JobState
from backfill.state.store import JOB_COLUMNS, JobRecord, job_from_row

# -- the controller ----------------------------------------------------------------------------


def controlled_jobs(conn: Conn) -> list[JobRecord]:
    """Jobs the controller decides on: running and throttled."""
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {JOB_COLUMNS} FROM backfill.jobs WHERE state IN ('running', 'throttled') "  # noqa: S608 - constant column list
        "ORDER BY id").fetchall()
    return [job_from_row(r) for r in rows]


def set_shares(conn: Conn, job_id: int, rows_per_s: float | None,
               batches_per_s: float | None) -> bool:
    """Set a job's share of the global budgets; bumps ``options_version`` when it changed, so
    runners pick it up with their next batch. Returns whether it changed."""
    cur = conn.execute(
        """UPDATE backfill.jobs SET rate_share = %(r)s, batch_rate_share = %(b)s,
               options_version = options_version + 1
           WHERE id = %(id)s AND (rate_share IS DISTINCT FROM %(r)s
                                  OR batch_rate_share IS DISTINCT FROM %(b)s)""",
        {"id": job_id, "r": rows_per_s, "b": batches_per_s},
    )
    return cur.rowcount == 1


def record_controller_tick(conn: Conn, leader: str, readings: list[dict[str, Any]],
                           settings: dict[str, Any], *, took_over: bool = False) -> None:
    """The acting controller's poll; ``took_over``: its first since it took the lead (a
    leader that lost its lock and won it back leads anew)."""
    conn.execute(
        """INSERT INTO backfill.controller (id, leader, leader_since, tick_at, readings, settings)
           VALUES (1, %(leader)s, now(), now(), %(readings)s, %(settings)s)
           ON CONFLICT (id) DO UPDATE SET
               leader_since = CASE WHEN backfill.controller.leader = excluded.leader
                                        AND NOT %(took_over)s
                                   THEN backfill.controller.leader_since ELSE now() END,
               leader = excluded.leader, tick_at = now(), readings = excluded.readings,
               settings = excluded.settings""",
        {"leader": leader, "readings": Jsonb(readings), "settings": Jsonb(settings),
         "took_over": took_over},
    )


def job_names(conn: Conn, job_ids: list[int]) -> dict[int, str]:
    return dict(conn.execute("SELECT id, name FROM backfill.jobs WHERE id = ANY(%s)",
                             (job_ids,)).fetchall())


def controller_status(conn: Conn) -> dict[str, Any] | None:
    row = conn.cursor(row_factory=dict_row).execute(
        """SELECT leader, leader_since, tick_at, extract(epoch FROM now() - tick_at) AS age_s,
                  readings, settings FROM backfill.controller WHERE id = 1""").fetchone()
    return dict(row) if row else None


def controller_alive(age_s: float, poll_s: float | None) -> bool:
    """Whether a controller that last polled ``age_s`` ago (polling every ``poll_s``) is
    still acting: five missed polls, and at least 10 s, say it is gone. Its readings expire
    then (the exporter stops serving them) and the jobs it throttled say so."""
    return age_s <= max(10.0, 5 * (poll_s or 1.0))


def unwatched_throttles(conn: Conn, job_ids: list[int]) -> dict[int, str]:
    """For each of ``job_ids`` that is throttled while no controller acts: "throttled by
    controller X, last poll N s ago: is it running?". Fail-closed keeps such a job
    throttled, but only a live controller resumes it, so it must not wait silently."""
    if not job_ids:
        return {}
    status = controller_status(conn)
    if status is not None and controller_alive(
            float(status["age_s"]), (status.get("settings") or {}).get("poll_s")):
        return {}
    rows = conn.execute(
        """SELECT j.id, (SELECT e.actor FROM backfill.events e
                         WHERE e.job_id = j.id AND e.kind = 'transition'
                           AND e.to_state = 'throttled' ORDER BY e.id DESC LIMIT 1)
           FROM backfill.jobs j WHERE j.id = ANY(%s) AND j.state = 'throttled'""",
        (job_ids,)).fetchall()
    notes = {}
    for job_id, actor in rows:
        by = actor or "a controller"
        if status is None:
            notes[job_id] = f"throttled by {by}; no controller polls: is one running?"
            continue
        last = "" if status["leader"] == actor else f" (by {status['leader']})"
        notes[job_id] = (f"throttled by {by}, last poll {float(status['age_s']):,.0f} s ago"
                         f"{last}: is it running?")
    return notes


def with_unwatched_notes(conn: Conn, jobs: list[JobRecord]) -> list[JobRecord]:
    """``jobs`` with the reason of each one throttled by a controller that is gone replaced
    by :func:`unwatched_throttles`' note (the throttle's own reason follows it): what
    ``show``, ``list`` and ``watch`` display."""
    notes = unwatched_throttles(conn, [j.id for j in jobs if j.state == JobState.THROTTLED])
    return [dataclasses.replace(j, state_reason=f"{notes[j.id]} (throttled for: "
                                                f"{j.state_reason or 'no reason recorded'})")
            if j.id in notes else j for j in jobs]
