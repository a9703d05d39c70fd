"""The exception hierarchy. Every error a user can meet derives from :class:`BackfillError`.

Each class says when it is raised. ``exit_code`` is what the CLI exits with: 2 for input the user
must fix, 1 for operational failures, so scripts can tell the two apart.
"""

from __future__ import annotations


class BackfillError(Exception):
    """Root of every error raised by backfill."""

    exit_code = 1


class InvalidInput(BackfillError):
    """Raised when user input (a job spec, an option, a name) is wrong; nothing was written."""

    exit_code = 2


class InvalidOption(InvalidInput):
    """Raised when an option is malformed or out of range (``batch_size=0``, ``"5 parsecs"``)."""


class TableNotFound(InvalidInput):
    """Raised when the source or destination table does not exist."""


class ColumnNotFound(InvalidInput):
    """Raised when a column named in a job (SET target, key, copy column) does not exist."""


class InvalidDsn(InvalidInput):
    """Raised when the database DSN cannot be parsed."""


class InvalidKey(InvalidInput):
    """Raised when the key is not usable: not unique, nullable, or of an unsupported type."""


class InvalidStatement(InvalidInput):
    """Raised when a job's SQL does not parse or type-check (found by a dry EXPLAIN)."""


class InvalidFragment(InvalidStatement):
    """Raised when a piece of user text that becomes SQL (a name, an expression, a type, a
    statement) is not exactly what its slot accepts: more than one statement, transaction
    control, a comment, or text that does not parse on its own. Nothing was run."""


class JobNotFound(InvalidInput):
    """Raised when no job has the given id and no defined job has the given name."""


class JobConflict(InvalidInput):
    """Raised when another active job already works on the same table and columns."""


class IllegalTransition(InvalidInput):
    """Raised when a state change is not allowed from the job's current state."""


class SchemaError(BackfillError):
    """Raised when the ``backfill`` state schema is missing, outdated or newer than this code."""


class DatabaseUnavailable(BackfillError):
    """Raised when the database cannot be reached."""


class JobFailed(BackfillError):
    """Raised by the runner when a job ends in the ``failed`` state."""


class LeaseLost(BackfillError):
    """Raised when a batch's checkpoint compare-and-set fails: someone else advanced the slice."""


class TableChanged(BackfillError):
    """Raised inside a batch's transaction when a table the job is bound to (its source, the
    destination of a copy or move, its undo log) is no longer the relation, or its key no
    longer the columns, the job was bound to: dropped and recreated, renamed, or altered.
    The batch commits nothing and the job fails, naming the change."""


class BrokerUnavailable(BackfillError):
    """The task broker (Redis) cannot be reached; nothing was sent, the job is unchanged."""


class BrokerMisconfigured(BackfillError):
    """The broker client cannot be set up here, whatever the network does: a transport module
    is missing from the install, or the broker URL is malformed. Nothing was sent."""


class TasksNotSent(BackfillError):
    """The job was started on the workers but some tasks could not be sent; the reaper
    sends them once the broker is back."""


class MigrationError(BackfillError):
    """Raised when a migration step fails, or a migration cannot go where it was asked to
    (unknown id, rollback after complete began, a file edited since start)."""


class MigrationBusy(MigrationError):
    """Raised when another process is running the same migration."""


class GateClosed(MigrationError):
    """Raised when ``migrate complete`` is refused: a backfill is not done, or does not verify,
    or a validation of start no longer holds."""


class MigrationWaiting(MigrationError):
    """Raised when start stops before its end without failing: a backfill is paused, or runs
    on the workers and was not waited for. Re-running ``migrate start`` continues."""

    exit_code = 3


class PreflightFailed(BackfillError):
    """Raised when a pre-flight check fails before a job's first write; nothing was written.
    ``--skip-preflight`` overrides it (and the skip is recorded)."""
