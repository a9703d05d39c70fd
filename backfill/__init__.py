"""backfill: safe, resumable, keyset-batched PostgreSQL backfills and data moves.

The public names are loaded on first use (PEP 562), so importing a submodule (the CLI, the
errors) does not pay for the whole API, psycopg and pglast: ``backfill --help`` starts in a
fraction of the time (fixed costs, issue 16). ``from backfill import Backfill, update`` works
as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each public name lives (the module is imported when the name is first asked for).
_HOMES = {
    "Backfill": "backfill.api", "Plan": "backfill.api",
    **dict.fromkeys(
        ("BackfillError", "ColumnNotFound", "DatabaseUnavailable", "IllegalTransition",
         "InvalidFragment", "InvalidInput", "InvalidKey", "InvalidOption", "InvalidStatement",
         "JobConflict", "JobFailed", "JobNotFound", "SchemaError", "TableNotFound"),
        "backfill.core.errors"),
    "JobOptions": "backfill.job.options",
    "Registry": "backfill.job.registry",
    **dict.fromkeys(("JobSpec", "copy", "delete", "move", "sql_job", "transform", "update"),
                    "backfill.job.spec"),
    "JobState": "backfill.job.states",
    "Event": "backfill.state.store", "JobRecord": "backfill.state.store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'backfill' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
