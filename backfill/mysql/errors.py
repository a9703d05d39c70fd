"""Errors of the MySQL/MariaDB source. Each derives from the project's root, ``BackfillError``
(input the user must fix from ``InvalidInput``), so the CLI's exit codes hold for them too.
"""

from __future__ import annotations

from backfill.core.errors import BackfillError, InvalidInput


class UnsupportedType(InvalidInput):
    """Raised by the schema conversion when a column's MySQL type has no default cast rule, or
    a ``--cast`` names a PostgreSQL type the copy cannot produce; the message names the column
    and the ``--cast`` that would fix it. Nothing was created."""


class ValueRefused(BackfillError):
    """Raised by the copy or the catch-up when one value cannot be written exactly (invalid
    UTF-8, a NUL in text, an out-of-range number or time, a tinyint(1) that is not 0 or 1):
    the message names the table, the row's key, the column and the cast rule that would fix
    it. The batch holding the row committed nothing; earlier batches stand."""

    exit_code = 2


class SourceNotReady(InvalidInput):
    """Raised before the first write when the source server cannot feed an online move:
    binary log off, not in ROW format, row images not FULL, or row metadata not FULL."""


class CheckpointConflict(BackfillError):
    """Raised when the checkpoint row moved under a batch (another runner works on the same
    table, or the table was reset): the batch commits nothing."""


class SourceError(BackfillError):
    """Raised when the source server refuses a statement of a job with an error of its own
    (not a lost connection, which is retried): a lock wait timeout, a statement time limit, a
    privilege. The message names the MySQL error number; ``code`` holds it."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
