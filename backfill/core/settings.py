"""Process settings: read once from the environment and the command line, then passed down."""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

from backfill.core.errors import InvalidOption


@dataclass(frozen=True)
class Settings:
    dsn: str
    actor: str
    jobs_module: str = "jobs"
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise InvalidOption(
                f"log level must be debug, info, warning or error, not {self.log_level!r}")
        if self.log_format not in ("auto", "json", "console"):
            raise InvalidOption(f"log format must be auto, json or console, not {self.log_format!r}")


def dsn_from_env() -> str | None:
    return os.environ.get("BACKFILL_DSN") or os.environ.get("DATABASE_URL")


def default_actor() -> str:
    """Who acts, when nobody said (``--actor``, ``$BACKFILL_ACTOR``): ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
