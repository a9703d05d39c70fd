"""The source: a MySQL/MariaDB DSN without a password, and connections to it.

``mysql://user@host:port/database`` (or ``mariadb://``); the password lives in an option file,
``~/.my.cnf`` when it exists, or the one named by ``?read_default_file=PATH`` (the ``[client]``
group, as the ``mysql`` client reads it). A socket: ``mysql://user@/db?unix_socket=/path``.
A password in the DSN is refused: DSNs end up in job specs, logs and process lists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg

from backfill.core.errors import DatabaseUnavailable, InvalidDsn, InvalidInput

SCHEMES = ("mysql", "mariadb")
DEFAULT_OPTION_FILE = "~/.my.cnf"
#: Query parameters a DSN may carry (the rest are refused, so a typo does not pass silently).
PARAMS = ("read_default_file", "read_default_group", "unix_socket", "ssl_ca", "ssl_cert",
          "ssl_key", "connect_timeout")
_NO_PASSWORD = ("the source DSN must not carry a password: put it in an option file "
                "(~/.my.cnf, or the file named by ?read_default_file=PATH, with "
                "[client] password=...)")


def quote_name(name: str) -> str:
    """A MySQL identifier in backquotes, a backquote inside doubled; refuses NUL, which no
    MySQL name may hold."""
    if not name or "\x00" in name:
        raise InvalidDsn(f"not a MySQL identifier: {name!r}")
    return "`" + name.replace("`", "``") + "`"


@dataclass(frozen=True)
class MySQLSource:
    """A parsed source DSN: where to connect and which option file holds the secrets."""

    database: str
    user: str | None = None
    host: str | None = None
    port: int | None = None
    unix_socket: str | None = None
    option_file: str | None = None
    option_group: str | None = None
    ssl: dict[str, str] = field(default_factory=dict)
    connect_timeout: int = 10
    #: Seconds a read may wait for the server (None: each use's own, long, default); set
    #: short by callers that must answer quickly (``show``'s lag).
    read_timeout: int | None = None

    @classmethod
    def parse(cls, dsn: str) -> MySQLSource:
        """Parse ``mysql://user@host:port/db?...``; :class:`InvalidDsn` names what is wrong."""
        try:
            parts = urlsplit(dsn)
            port = parts.port
        except ValueError as exc:
            raise InvalidDsn(f"malformed source DSN: {exc}") from None
        if parts.scheme not in SCHEMES:
            raise InvalidDsn("a MySQL source DSN starts with mysql:// or mariadb://")
        if parts.password is not None:
            raise InvalidDsn(_NO_PASSWORD)
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise InvalidDsn("the source DSN must name one database: mysql://user@host/db")
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if key == "password":
                raise InvalidDsn(_NO_PASSWORD)
            if key not in PARAMS:
                raise InvalidDsn(f"unknown source DSN parameter {key!r} "
                                 f"(known: {', '.join(PARAMS)})")
            params[key] = value
        option_file = params.get("read_default_file")
        if option_file is not None:
            if not Path(option_file).expanduser().is_file():
                raise InvalidDsn(f"the option file {option_file} does not exist")
        elif Path(DEFAULT_OPTION_FILE).expanduser().is_file():
            option_file = DEFAULT_OPTION_FILE
        try:
            timeout = int(params.get("connect_timeout", "10"))
        except ValueError:
            raise InvalidDsn("connect_timeout must be a number of seconds") from None
        return cls(
            database=database, user=unquote(parts.username) if parts.username else None,
            host=parts.hostname or None, port=port, unix_socket=params.get("unix_socket"),
            option_file=option_file, option_group=params.get("read_default_group"),
            ssl={k[4:]: v for k, v in params.items() if k.startswith("ssl_")},
            connect_timeout=timeout,
        )

    def describe(self) -> str:
        """``host:port/database`` for messages (never a secret)."""
        where = self.unix_socket or f"{self.host or 'localhost'}:{self.port or 3306}"
        return f"{where}/{self.database}"

    def connection_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` (and the binlog reader's
        ``connection_settings``): the password, if any, comes from the option file."""
        settings: dict[str, Any] = {"connect_timeout": self.connect_timeout}
        if self.host:
            settings["host"] = self.host
        if self.port:
            settings["port"] = self.port
        if self.user:
            settings["user"] = self.user
        if self.unix_socket:
            settings["unix_socket"] = self.unix_socket
        if self.option_file:
            settings["read_default_file"] = os.path.expanduser(self.option_file)
            if self.option_group:
                settings["read_default_group"] = self.option_group
        if self.ssl:
            settings["ssl"] = dict(self.ssl)
        if self.read_timeout is not None:
            settings["read_timeout"] = self.read_timeout
        return settings


#: Session settings every source connection runs with: TIMESTAMP values in UTC, UTF-8 text,
#: and long reads allowed (a batch's SELECT must not be cut by a small net timeout).
SESSION_INIT = ("SET time_zone = '+00:00', NAMES utf8mb4, SESSION net_read_timeout = 600, "
                "SESSION net_write_timeout = 600")


def connect(source: MySQLSource, *, raw: bool = True, read_timeout: int = 600) -> Any:
    """An autocommit PyMySQL connection, or :class:`DatabaseUnavailable` (one line, no secret).

    ``raw``: values come back undecoded (bytes), as :mod:`backfill.mysql.values` reads them,
    so invalid UTF-8 is refused with the row's key instead of failing the whole fetch."""
    pymysql = driver()
    from backfill.mysql.values import RAW_CONVERSIONS

    kwargs = source.connection_settings()
    kwargs.update(database=source.database, autocommit=True, charset="utf8mb4",
                  init_command=SESSION_INIT, write_timeout=600)
    kwargs.setdefault("read_timeout", read_timeout)
    if raw:
        kwargs.update(use_unicode=False, conv=RAW_CONVERSIONS)
    try:
        return pymysql.connect(**kwargs)
    except pymysql.err.MySQLError as exc:
        raise DatabaseUnavailable(f"cannot connect to MySQL {source.describe()}: "
                                  f"{_first_line(exc)}") from None


#: The modules the ``mysql`` extra brings, and what a user without them is told.
EXTRA_MODULES = frozenset({"pymysql", "pymysqlreplication"})
MISSING_EXTRA = ("a MySQL source needs PyMySQL and mysql-replication: "
                 "pip install 'backfill[mysql]'")


def driver() -> Any:
    """The PyMySQL module, or :class:`InvalidInput` saying which extra brings it."""
    try:
        import pymysql  # type: ignore[import-untyped]
    except ImportError:
        raise InvalidInput(MISSING_EXTRA) from None
    return pymysql


def _first_line(exc: BaseException) -> str:
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    text = str(args[1]) if len(args) > 1 else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def connection(source: MySQLSource, *, raw: bool = True) -> Iterator[Any]:
    conn = connect(source, raw=raw)
    try:
        yield conn
    finally:
        conn.close()


def query(conn: Any, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """All rows of one statement (text values decoded: for catalog queries, on a connection
    opened with ``raw=False``)."""
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return list(cur.fetchall())


#: Server error numbers that mean the connection is gone, not that a statement was refused:
#: 1053 the server shutting down, 1152 the connection aborted, 1927 the connection killed
#: (MariaDB), 4031 the client disconnected for inactivity (MySQL 8.0.24+). Client-side errors
#: (2000-2999: 2003 cannot connect, 2006 gone away, 2013 lost during a query, 2055 ...) too.
CONNECTION_LOST_CODES = frozenset({1053, 1152, 1927, 4031})


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number a PyMySQL error carries (its first argument), or None."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    return args[0] if args and isinstance(args[0], int) else None


def error_text(exc: BaseException) -> str:
    """One line: ``MySQL error 1054: Unknown column 'x' in 'field list'``."""
    code = error_code(exc)
    return f"MySQL error {code}: {_first_line(exc)}" if code else _first_line(exc)


def is_connection_error(exc: BaseException) -> bool:
    """A lost or refused connection (the server restarting), worth a reconnect and a retry.

    Decided by the error number, not PyMySQL's class: PyMySQL raises ``OperationalError`` for
    most of the server's own answers too (1054 unknown column, 1205 lock wait timeout, 1969
    ``max_statement_time`` exceeded), which a retry would only repeat."""
    import pymysql  # type: ignore[import-untyped]

    if isinstance(exc, pymysql.err.InterfaceError | OSError):
        return True
    if not isinstance(exc, pymysql.err.MySQLError):
        return False
    code = error_code(exc)
    if code is None or code == 0:   # no number: PyMySQL's own "connection broken"
        return isinstance(exc, pymysql.err.OperationalError)
    return 2000 <= code <= 2999 or code in CONNECTION_LOST_CODES


def is_server_error(exc: BaseException) -> bool:
    """The server's answer to a statement (an error number, not a lost connection)."""
    import pymysql  # type: ignore[import-untyped]

    return isinstance(exc, pymysql.err.MySQLError) and not is_connection_error(exc)


def connection_lost(exc: BaseException) -> bool:
    """Either server went away (PostgreSQL's connection errors, or MySQL's by number): the
    copy and the catch-up reconnect and go on from their committed position."""
    return (isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError
                       | DatabaseUnavailable) or is_connection_error(exc))


class Outage:
    """How long the servers have failed in a row, and the backoff before the next attempt."""

    def __init__(self, retry_for: float) -> None:
        self.retry_for = retry_for
        self.since: float | None = None

    def over(self) -> None:
        """An attempt succeeded: the next failure starts a new outage."""
        self.since = None

    def wait(self) -> bool:
        """Sleep before the next attempt; False (no sleep) once it has lasted ``retry_for``."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > self.retry_for:
            return False
        time.sleep(min(2.0, 0.1 * 2 ** min(5, int(now - self.since))))
        return True
