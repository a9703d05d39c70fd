"""Which database errors heal by themselves, decided by psycopg error class (never by text)."""

from __future__ import annotations

from enum import Enum

import psycopg
from psycopg import errors as pgerrors

from backfill.core.errors import DatabaseUnavailable


class Verdict(Enum):
    RETRY = "retry"  # transient: back off (reconnecting if the connection is gone) and retry
    SHRINK = "shrink"  # statement timeout: retry the batch smaller
    FATAL = "fatal"  # will not heal: fail the job with the error and the key range


def classify(exc: BaseException) -> Verdict:
    if isinstance(exc, DatabaseUnavailable):  # reconnecting failed: the server may be restarting
        return Verdict.RETRY
    if isinstance(exc, pgerrors.QueryCanceled):
        return Verdict.SHRINK
    if isinstance(
        exc,
        pgerrors.SerializationFailure
        | pgerrors.DeadlockDetected
        | pgerrors.LockNotAvailable,
    ):
        return Verdict.RETRY
    # Lost connection, server shutdown or restart, too many connections, out of memory/disk:
    # all OperationalError subclasses, all worth retrying with backoff after reconnecting.
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Verdict.RETRY
    return Verdict.FATAL


def describe_error(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}{f' [{sqlstate}]' if sqlstate else ''}: {text}" if text else name
