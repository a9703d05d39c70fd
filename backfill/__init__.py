"""backfill: safe, resumable, keyset-batched PostgreSQL backfills and data moves."""

from backfill.api import Backfill, Plan
from backfill.core.errors import (
    BackfillError,
    ColumnNotFound,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidFragment,
    InvalidInput,
    InvalidKey,
    InvalidOption,
    InvalidStatement,
    JobConflict,
    JobFailed,
    JobNotFound,
    SchemaError,
    TableNotFound,
)
from backfill.job.options import JobOptions
from backfill.job.registry import Registry
from backfill.job.spec import JobSpec, copy, delete, move, sql_job, transform, update
from backfill.job.states import JobState
from backfill.state.store import Event, JobRecord

__all__ = [
    "Backfill", "BackfillError", "ColumnNotFound", "DatabaseUnavailable", "Event",
    "IllegalTransition", "InvalidFragment", "InvalidInput", "InvalidKey", "InvalidOption", "InvalidStatement",
    "JobConflict", "JobFailed", "JobNotFound", "JobOptions", "JobRecord", "JobSpec", "JobState",
    "Plan", "Registry", "SchemaError", "TableNotFound", "copy", "delete", "move", "sql_job",
    "transform", "update",
]
