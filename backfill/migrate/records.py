"""A migration's rows in the state schema: the migration, its steps and its events, as the
executor records them and ``migrate status`` reads them."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row

from backfill.core.catalog import Conn
from backfill.core.errors import (
    InvalidInput,
)
from backfill.migrate.file import Settings
from backfill.migrate.steps import Step
from backfill.state import checkpoints, store

STATES = ("starting", "started", "completing", "completed", "rolling_back", "rolled_back")


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    description: str
    checksum: str
    definition: dict[str, Any]
    state: str
    last_error: str | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def settings(self) -> Settings:
        s = self.definition.get("settings") or {}
        return Settings(**{f.name: s[f.name] for f in dataclasses.fields(Settings)
                           if f.name in s})


@dataclass(frozen=True)
class StepRecord:
    phase: str
    step_no: int
    step: Step
    state: str
    attempts: int
    job_id: int | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    last_error: str | None


@dataclass(frozen=True)
class MigrationEvent:
    id: int
    at: dt.datetime
    actor: str
    kind: str
    phase: str | None
    step_no: int | None
    message: str
    details: dict[str, Any] | None


@dataclass(frozen=True)
class Status:
    migration: MigrationRecord
    steps: list[StepRecord]
    events: list[MigrationEvent]
    jobs: dict[int, tuple[store.JobRecord, checkpoints.Progress]]


# -- helpers ----------------------------------------------------------------------------------


def record_of(r: dict[str, Any]) -> MigrationRecord:
    return MigrationRecord(**r)


def find_migration(conn: Conn, ref: str) -> MigrationRecord | None:
    row = conn.cursor(row_factory=dict_row).execute(
        "SELECT * FROM backfill.migrations WHERE id = %s", (ref,)).fetchone()
    return record_of(row) if row else None


def require_migration(conn: Conn, ref: str) -> MigrationRecord:
    rec = find_migration(conn, ref)
    if rec is None:
        raise InvalidInput(f"no migration {ref!r} on this database (`backfill migrate status` "
                           "lists them; `backfill migrate start FILE` begins one)")
    return rec


def steps_of(conn: Conn, mid: str, phase: str | None = None) -> list[StepRecord]:
    rows = conn.cursor(row_factory=dict_row).execute(
        """SELECT phase, step_no, step, state, attempts, job_id, started_at, finished_at,
                  last_error
           FROM backfill.migration_steps WHERE migration_id = %s AND (%s::text IS NULL OR phase = %s)
           ORDER BY array_position(ARRAY['start', 'complete', 'rollback'], phase), step_no""",
        (mid, phase, phase)).fetchall()
    return [StepRecord(**{**r, "step": Step.from_json(r["step"])}) for r in rows]
