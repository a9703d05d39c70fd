"""structlog configuration: human output on a terminal, JSON lines otherwise; no secrets."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from backfill.core.db import redact_text

_SECRET_KEYS = {"password", "dsn", "conninfo"}


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if key in _SECRET_KEYS and isinstance(value, str):
            event[key] = redact_text(value) if key != "password" else "***"
        elif isinstance(value, str) and ("password" in value or "://" in value):
            event[key] = redact_text(value)
    return event


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog once per process. ``json=None``: JSON unless stderr is a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bindings: Any) -> Any:
    # Scripts using the API without configuring logging get info-level lines on stderr, not
    # structlog's default of every debug line on stdout.
    if not structlog.is_configured():
        configure()
    # A lazy proxy, not .bind(): module-level loggers are made at import, before the CLI
    # applies --log-level; a bound logger would keep the configuration of that moment.
    return structlog.get_logger("backfill", **bindings)
