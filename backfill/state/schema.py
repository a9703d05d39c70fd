"""Versioned migrations of the ``backfill`` state schema.

Each migration is applied once, in order, inside one transaction that holds an advisory lock, so
``backfill db upgrade`` is idempotent and two processes running it at once do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from backfill.core.errors import SchemaError

SCHEMA = "backfill"
#: Key of the advisory lock held while migrating (any constant unlikely to collide).
_MIGRATION_LOCK = 0x6266_696C_6C00  # "bfill"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "jobs, slices, events, batches",
        """
CREATE TABLE backfill.jobs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,
    kind            text NOT NULL
                    CHECK (kind IN ('update', 'sql', 'copy', 'move', 'transform', 'delete')),
    source_schema   text NOT NULL,
    source_table    text NOT NULL,
    source_oid      oid NOT NULL,    -- a dropped and recreated table is not the same table
    key_columns     text[] NOT NULL,
    key_types       text[] NOT NULL,
    spec            jsonb NOT NULL,
    options         jsonb NOT NULL,
    options_version integer NOT NULL DEFAULT 1,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'throttled', 'paused',
                                     'succeeded', 'failed', 'cancelled')),
    state_reason    text,
    conflict_key    text NOT NULL,
    rows_estimate   bigint,
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    owner           text,
    heartbeat_at    timestamptz,
    last_error      text,
    error_range     jsonb
);
-- One active job per table and set of written columns (see backfill.engine.kinds.conflict_key).
CREATE UNIQUE INDEX jobs_one_active_per_target ON backfill.jobs (conflict_key)
    WHERE state IN ('pending', 'running', 'throttled', 'paused');
CREATE INDEX jobs_state ON backfill.jobs (state);

CREATE TABLE backfill.slices (
    job_id        bigint NOT NULL REFERENCES backfill.jobs (id),
    slice_no      integer NOT NULL,
    lower_bound   jsonb,           -- exclusive; NULL: from the first key
    upper_bound   jsonb NOT NULL,  -- inclusive; snapshotted when the job starts
    cursor        jsonb,           -- last key processed; NULL: nothing yet
    done          boolean NOT NULL DEFAULT false,
    rows_scanned  bigint NOT NULL DEFAULT 0,
    rows_affected bigint NOT NULL DEFAULT 0,
    batches       bigint NOT NULL DEFAULT 0,
    batch_size    bigint,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, slice_no)
);

CREATE TABLE backfill.events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint NOT NULL REFERENCES backfill.jobs (id),
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind       text NOT NULL,
    from_state text,
    to_state   text,
    actor      text NOT NULL,
    reason     text,
    details    jsonb
);
CREATE INDEX events_job ON backfill.events (job_id, id);

-- Events are append-only: nothing an operator did may be rewritten or lost.
CREATE FUNCTION backfill.events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'backfill.events is append-only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON backfill.events
    FOR EACH ROW EXECUTE FUNCTION backfill.events_append_only();

-- Per-batch statistics, bounded: the runner prunes all but the most recent rows of each job
-- (totals live in backfill.slices).
CREATE TABLE backfill.batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        bigint NOT NULL REFERENCES backfill.jobs (id),
    slice_no      integer NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms   real NOT NULL,
    batch_size    bigint NOT NULL,
    rows_scanned  bigint NOT NULL,
    rows_affected bigint NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    lower_bound   jsonb,
    upper_bound   jsonb
);
CREATE INDEX batches_job ON backfill.batches (job_id, id);
""",
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "slice leases with fencing tokens",
        """
-- A slice is worked on by one runner or worker at a time: the lease holder. Taking a lease
-- bumps lease_token; a checkpoint must present the current token, so a late task of a previous
-- holder commits nothing (the cursor compare-and-set stays the last line of defence).
ALTER TABLE backfill.slices
    ADD COLUMN lease_owner      text,
    ADD COLUMN lease_token      bigint NOT NULL DEFAULT 0,
    ADD COLUMN lease_expires_at timestamptz;
""",
    ),
)

MIGRATIONS += (
    Migration(
        3,
        "dispatch tokens and worker mode",
        """
-- Where a job runs: 'inline' (backfill run) or 'workers' (Celery tasks). The reaper starts and
-- re-dispatches worker jobs; it never touches inline ones.
ALTER TABLE backfill.jobs
    ADD COLUMN runs_on text NOT NULL DEFAULT 'inline' CHECK (runs_on IN ('inline', 'workers'));
-- Each task sent for a slice carries dispatch_seq; sending a replacement bumps it, so a task
-- left over in the broker (redelivered late, or duplicated) is dropped before it takes the
-- lease. dispatched_at: when the current task was sent; NULL when none is queued (parked).
-- rows_estimate: rows the slice held when cut, for rebalancing (split the largest remaining).
ALTER TABLE backfill.slices
    ADD COLUMN dispatch_seq  bigint NOT NULL DEFAULT 0,
    ADD COLUMN dispatched_at timestamptz,
    ADD COLUMN rows_estimate bigint;
-- Jobs dispatched before this migration: their owner says where they run.
UPDATE backfill.jobs SET runs_on = 'workers' WHERE owner = 'workers';
""",
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "controller: heartbeat, status, shared rate limits",
        """
-- Written by the controller on the primary every tick; its age on a replica is the replica's
-- true lag, even when the primary is otherwise idle.
CREATE TABLE backfill.heartbeat (
    id smallint PRIMARY KEY CHECK (id = 1),
    at timestamptz NOT NULL
);
-- The acting controller and what it saw last (for `backfill controller status`).
CREATE TABLE backfill.controller (
    id           smallint PRIMARY KEY CHECK (id = 1),
    leader       text NOT NULL,
    leader_since timestamptz NOT NULL,
    tick_at      timestamptz NOT NULL,
    readings     jsonb NOT NULL DEFAULT '[]',
    settings     jsonb
);
-- A job's share of the controller's global budgets (rows/s, batches/s); NULL: no budget.
ALTER TABLE backfill.jobs
    ADD COLUMN rate_share double precision,
    ADD COLUMN batch_rate_share double precision;
""",
    ),
)

MIGRATIONS += (
    Migration(
        5,
        "batch duration histogram per slice",
        """
-- Cumulative counts of batch durations per bucket (see backfill.observe.metrics.BUCKETS_S; the last
-- is +Inf) and their sum, kept by each checkpoint in the same UPDATE: a Prometheus histogram
-- that is right whichever process ran the batches, and survives restarts and pruning.
ALTER TABLE backfill.slices
    ADD COLUMN duration_buckets bigint[] NOT NULL DEFAULT array_fill(0::bigint, ARRAY[12]),
    ADD COLUMN duration_sum_ms  double precision NOT NULL DEFAULT 0;
""",
    ),
)

MIGRATIONS += (
    Migration(
        6,
        "schema migrations: their steps and events",
        """
-- One row per migration file run on this database (backfill migrate start|complete|rollback).
CREATE TABLE backfill.migrations (
    id          text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    checksum    text NOT NULL,    -- of the file's content: a file edited after start is refused
    definition  jsonb NOT NULL,
    state       text NOT NULL CHECK (state IN ('starting', 'started', 'completing', 'completed',
                                               'rolling_back', 'rolled_back')),
    last_error  text,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- The steps planned at start, per phase; `done` commits with a transactional step's DDL.
CREATE TABLE backfill.migration_steps (
    migration_id text NOT NULL REFERENCES backfill.migrations (id),
    phase        text NOT NULL CHECK (phase IN ('start', 'complete', 'rollback')),
    step_no      integer NOT NULL,
    step         jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    job_id       bigint REFERENCES backfill.jobs (id),
    started_at   timestamptz,
    finished_at  timestamptz,
    last_error   text,
    PRIMARY KEY (migration_id, phase, step_no)
);
-- Everything that happened to a migration, and who or what did it.
CREATE TABLE backfill.migration_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration_id text NOT NULL REFERENCES backfill.migrations (id),
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor        text NOT NULL,
    kind         text NOT NULL,
    phase        text,
    step_no      integer,
    message      text NOT NULL,
    details      jsonb
);
CREATE INDEX migration_events_by_migration ON backfill.migration_events (migration_id, id);
""",
    ),
)

MIGRATIONS += (
    Migration(
        7,
        "revert jobs (undo logs live in backfill.undo_<job id>)",
        """
ALTER TABLE backfill.jobs DROP CONSTRAINT jobs_kind_check,
    ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('update', 'sql', 'copy', 'move', 'transform',
                                                   'delete', 'revert'));
""",
    ),
)

MIGRATIONS += (
    Migration(
        8,
        "canary rollout: awaiting_approval, the canary's size and its approval",
        """
ALTER TABLE backfill.jobs DROP CONSTRAINT jobs_state_check,
    ADD CONSTRAINT jobs_state_check CHECK (state IN ('pending', 'running', 'throttled',
        'paused', 'succeeded', 'failed', 'cancelled', 'awaiting_approval')),
    ADD COLUMN canary_rows bigint,     -- stop for approval once this many rows are done
    ADD COLUMN approved_at timestamptz,
    ADD COLUMN approved_by text;
DROP INDEX backfill.jobs_one_active_per_target;
CREATE UNIQUE INDEX jobs_one_active_per_target ON backfill.jobs (conflict_key)
    WHERE state IN ('pending', 'running', 'throttled', 'paused', 'awaiting_approval');
""",
    ),
)

MIGRATIONS += (
    Migration(
        9,
        "jobs bind their destination table by oid, like their source; conflict keys by oid",
        """
ALTER TABLE backfill.jobs ADD COLUMN dest_oid oid;  -- copy, move, revert: the table written
-- Conflict keys name tables by oid now (JSON: [["oid:N", [cols] | null], ...]); rewrite the
-- old ones (schema.table(a,b);schema.u(*)) so jobs enqueued before the upgrade still conflict
-- with new ones, and give old copies and moves their destination's oid (the first target).
DO $upgrade$
DECLARE
    j record; part text; tbl text; cols text; nsp text; target text; first_oid oid;
    found_oid oid; targets text[];
BEGIN
    FOR j IN SELECT id, kind, conflict_key FROM backfill.jobs
             WHERE conflict_key NOT LIKE '[%' LOOP
        targets := '{}';
        first_oid := NULL;
        FOREACH part IN ARRAY string_to_array(j.conflict_key, ';') LOOP
            tbl := split_part(part, '(', 1);
            cols := rtrim(substr(part, length(tbl) + 2), ')');
            IF tbl LIKE 'remote:%' THEN
                target := tbl;
            ELSE
                nsp := split_part(tbl, '.', 1);
                found_oid := NULL;
                SELECT c.oid INTO found_oid FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = nsp AND c.relname = substr(tbl, length(nsp) + 2);
                target := coalesce('oid:' || found_oid, 'gone:' || tbl);
                first_oid := coalesce(first_oid, found_oid);
            END IF;
            targets := targets || ('[' || to_json(target)::text || ',' ||
                CASE WHEN cols = '*' THEN 'null' ELSE
                    (SELECT '[' || string_agg(to_json(c)::text, ',' ORDER BY c COLLATE "C")
                            || ']' FROM unnest(string_to_array(cols, ',')) AS c) END || ']');
        END LOOP;
        UPDATE backfill.jobs SET conflict_key = '[' || array_to_string(targets, ',') || ']',
               dest_oid = CASE WHEN j.kind IN ('copy', 'move') THEN first_oid END
         WHERE id = j.id;
    END LOOP;
END
$upgrade$;
""",
    ),
)

LATEST = MIGRATIONS[-1].version


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The applied version, or ``None`` when the state schema does not exist."""
    exists = conn.execute(
        "SELECT to_regclass('backfill.schema_version') IS NOT NULL"
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM backfill.schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def upgrade_conn(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Apply pending migrations on ``conn``; return (version before, version after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS backfill")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS backfill.schema_version (
                   version     integer PRIMARY KEY,
                   description text NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        before = current_version(conn) or 0
        if before > LATEST:
            raise SchemaError(
                f"the backfill state schema is at version {before}, newer than this "
                f"backfill ({LATEST}): upgrade the backfill package"
            )
        for m in MIGRATIONS:
            if m.version > before:
                try:
                    conn.execute(m.sql.encode())
                except psycopg.Error as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise SchemaError(
                        f"migration {m.version} ({m.description}) failed: {first}; the schema "
                        f"records version {before} but its tables disagree. Inspect "
                        "backfill.schema_version; nothing was changed"
                    ) from exc
                conn.execute(
                    "INSERT INTO backfill.schema_version (version, description) VALUES (%s, %s)",
                    (m.version, m.description),
                )
    return before, LATEST


def upgrade(dsn: str) -> int:
    """Connect to ``dsn``, apply pending migrations, return the resulting version."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return upgrade_conn(conn)[1]


def require_current(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaError` naming the fix unless the state schema is at :data:`LATEST`."""
    try:
        version = current_version(conn)
    except pgerrors.InsufficientPrivilege as exc:
        raise SchemaError(f"cannot read the backfill state schema: {exc}") from exc
    if version is None:
        raise SchemaError(
            "the backfill state schema is missing in this database: "
            "run `backfill db upgrade` first"
        )
    if version < LATEST:
        raise SchemaError(
            f"the backfill state schema is outdated (version {version}, this backfill needs "
            f"{LATEST}): run `backfill db upgrade`"
        )
    if version > LATEST:
        raise SchemaError(
            f"the backfill state schema (version {version}) is newer than this backfill "
            f"({LATEST}): upgrade the backfill package"
        )


def check_schema(dsn: str) -> None:
    """Connect to ``dsn`` and :func:`require_current`: what a long-running process (worker,
    controller, exporter) checks once before it starts."""
    from backfill.core.db import connect  # db sits above schema in the import order

    conn = connect(dsn)
    try:
        require_current(conn)
    finally:
        conn.close()
