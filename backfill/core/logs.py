"""structlog configuration: human output on a terminal, JSON lines otherwise; no secrets.

structlog (about 35 ms with its console renderer) is imported by the first line logged, not
by :func:`configure` or :func:`get_logger`: a command that never logs (``--help``,
``enqueue``, ``show``) never loads it (fixed costs, issue 16)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

_SECRET_KEYS = {"password", "dsn", "conninfo"}

#: The configuration the process asked for (``configure``), applied when structlog is loaded.
_wanted: dict[str, Any] = {}
#: Two threads logging their first line at once import structlog once.
_import_lock = threading.Lock()


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    from backfill.core.db import redact_text

    for key, value in list(event.items()):
        if key in _SECRET_KEYS and isinstance(value, str):
            event[key] = redact_text(value) if key != "password" else "***"
        elif isinstance(value, str) and ("password" in value or "://" in value):
            event[key] = redact_text(value)
    return event


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog for this process. ``json=None``: JSON unless stderr is a terminal.
    Applied at once when structlog is already loaded, else by the first :func:`get_logger`."""
    _wanted.clear()
    _wanted.update(json=json, level=level)
    if "structlog" in sys.modules:
        _apply(json=json, level=level)


def _import_structlog(json: bool | None) -> Any:
    """structlog, imported without rich when this process (our CLI or worker: it called
    :func:`configure`) renders JSON lines: structlog.dev loads rich's console and traceback
    (~25 ms) for its console renderer, which JSON lines never use; a command that prints plain
    lines then runs without rich at all (fixed costs, issue 16). A program that uses the API
    without :func:`configure` imports structlog as it is."""
    with _import_lock:
        if "structlog" not in sys.modules and "rich" not in sys.modules and _wanted and (
                json if json is not None else not sys.stderr.isatty()):
            sys.modules["rich"] = None  # type: ignore[assignment]  # structlog.dev: rich = None
            try:
                import structlog
            finally:
                sys.modules.pop("rich", None)
            return structlog
    import structlog

    return structlog


def _apply(*, json: bool | None, level: str) -> None:
    structlog = _import_structlog(json)
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
    """A logger for ``backfill``: structlog's lazy proxy, made (and structlog imported) at the
    first line logged, so a module-level logger costs nothing to a process that never logs."""
    return _Logger(bindings)


class _Logger:
    def __init__(self, bindings: dict[str, Any]) -> None:
        self._bindings = bindings
        self._proxy: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._proxy is None:
            structlog = _import_structlog(_wanted.get("json"))

            # Scripts using the API without configuring logging get info-level lines on
            # stderr, not structlog's default of every debug line on stdout; the CLI's
            # --log-level/--log-format (given before structlog was loaded) apply here.
            if not structlog.is_configured():
                _apply(json=_wanted.get("json"), level=_wanted.get("level", "info"))
            # A lazy proxy, not .bind(): module-level loggers are made at import, before the
            # CLI applies --log-level; a bound logger would keep the configuration of that moment.
            self._proxy = structlog.get_logger("backfill", **self._bindings)
        return getattr(self._proxy, name)
