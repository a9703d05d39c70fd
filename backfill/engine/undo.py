"""The undo logs on disk: which exist, how big, and whether a revert still reads one."""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from backfill.core.catalog import Conn
from backfill.engine.kinds import undo_table
from backfill.job.states import ACTIVE


@dataclass(frozen=True)
class UndoLog:
    job_id: int
    table: str
    rows: int
    bytes: int
    job_state: str
    ended_s_ago: float | None
    reverting: bool      # a revert job that reads it is still active


def undo_log_exists(conn: Conn, job_id: int) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                       (undo_table(job_id).as_string(conn),)).fetchone()
    return bool(row and row[0])


def list_undo_logs(conn: Conn) -> builtins.list[UndoLog]:
    rows = conn.execute(
        """SELECT j.id, 'backfill.' || c.relname, greatest(c.reltuples, 0)::bigint,
                  pg_total_relation_size(c.oid), j.state,
                  extract(epoch FROM now() - j.finished_at)::float8,
                  EXISTS (SELECT 1 FROM backfill.jobs r WHERE r.kind = 'revert'
                          AND (r.spec ->> 'reverts')::bigint = j.id
                          AND r.state IN ('pending', 'running', 'throttled', 'paused',
                                          'awaiting_approval'))
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN backfill.jobs j ON c.relname = 'undo_' || j.id
           WHERE n.nspname = 'backfill' AND c.relkind = 'r' ORDER BY j.id""").fetchall()
    return [UndoLog(int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]),
                    float(r[5]) if r[5] is not None and r[4] not in ACTIVE else None,
                    bool(r[6])) for r in rows]
