"""Connections: one place that connects, redacts DSNs and turns failures into one-line errors."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from backfill.core.errors import DatabaseUnavailable, InvalidDsn

if TYPE_CHECKING:   # the catalog loads the SQL gate (pglast), which connecting does not need
    from backfill.core.catalog import Conn

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``; safe to log and show."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return redact_text(dsn)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def redact_text(text: str) -> str:
    """Mask passwords in free text (URL-style and ``password=`` pairs)."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def describe(dsn: str) -> str:
    """``host:port/dbname`` for messages."""
    try:
        p: dict[str, Any] = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<malformed DSN>"
    host = p.get("host") or "localhost"
    port = p.get("port") or "5432"
    return f"{host}:{port}/{p.get('dbname') or p.get('user') or ''}"


def connect(dsn: str, *, application_name: str = "backfill", connect_timeout: int = 10) -> Conn:
    """An autocommit connection (transactions are explicit), or :class:`DatabaseUnavailable`."""
    try:
        # Keepalives: a host that dies mid-batch must not leave its transaction (and the
        # locks it holds) open for the kernel's two-hour default.
        conn = psycopg.connect(
            dsn, autocommit=True, application_name=application_name,
            connect_timeout=connect_timeout, keepalives=1, keepalives_idle=30,
            keepalives_interval=10, keepalives_count=3,
        )
    except psycopg.ProgrammingError as exc:
        detail = " ".join(redact_text(str(exc)).split())
        raise InvalidDsn(f"malformed database DSN: {detail}") from None
    except psycopg.OperationalError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = redact_text(lines[0]) if lines else type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to {describe(dsn)}: {first}") from None
    # The SQL gate (backfill.core.sqltext) reads strings as the parser does with this on (the
    # default since 9.1): the server must lex user fragments exactly as the gate did.
    conn.execute("SET standard_conforming_strings = on")
    return conn


def canonical_text(conn: Conn) -> None:
    """Settings under which two databases write and read the same text for the same value:
    a cross-database copy streams COPY's text form, and its checksums hash it."""
    conn.execute("SET client_encoding = 'UTF8'; SET DateStyle = 'ISO, YMD'; "
                 "SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; "
                 "SET TimeZone = 'UTC'; SET bytea_output = 'hex'")


def hold_lock_briefly_after_death(conn: Conn) -> None:
    """For a connection holding a session advisory lock (a leader): if this host vanishes,
    the server ends the session, freeing the lock, within about 30 s rather than after the
    operating system's two-hour keepalive, so a standby takes over."""
    for setting, value in (("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"),
                           ("tcp_keepalives_count", "3"), ("tcp_user_timeout", "30000")):
        conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
