"""The migration file format (TOML): parsed and checked for shape, before any database is read."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backfill.core.durations import parse_duration_ms
from backfill.core.errors import InvalidInput, InvalidOption

#: The operations a file may name; ``operations.OPERATIONS`` maps each to its class (the
#: operations read this module, so the names are listed here rather than imported).
OPERATION_NAMES = (
    "create_table", "drop_table", "add_column", "drop_column", "rename_column", "change_type",
    "add_foreign_key", "add_check", "add_unique", "create_index", "drop_index", "split_table",
    "merge_tables", "backfill", "copy_from", "sql",
)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


@dataclass(frozen=True)
class Settings:
    """How the executor treats locks and time (``[settings]`` in the file)."""

    lock_timeout_ms: float = 2_000.0
    statement_timeout_ms: float = 60_000.0
    #: CONCURRENTLY builds and VALIDATE scan the table under a weak lock: no timeout by default.
    long_statement_timeout_ms: float = 0.0
    lock_retries: int = 30
    retry_backoff_ms: float = 500.0
    retry_backoff_max_ms: float = 30_000.0

    @classmethod
    def from_toml(cls, data: Mapping[str, Any]) -> Settings:
        known = {"lock_timeout", "statement_timeout", "long_statement_timeout", "lock_retries",
                 "retry_backoff", "retry_backoff_max"}
        unknown = set(data) - known
        if unknown:
            raise InvalidOption(f"unknown setting(s) {', '.join(sorted(unknown))} "
                                f"(settings: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name in ("lock_timeout", "statement_timeout", "long_statement_timeout",
                     "retry_backoff", "retry_backoff_max"):
            if name in data:
                values[name + "_ms"] = parse_duration_ms(data[name], option=name)
        if "lock_retries" in data:
            n = data["lock_retries"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise InvalidOption(f"lock_retries must be a whole number >= 0, got {n!r}")
            values["lock_retries"] = n
        s = cls(**values)
        if s.lock_timeout_ms <= 0:
            raise InvalidOption("lock_timeout must be > 0: a DDL step must never wait in the "
                                "lock queue without limit (it blocks every query behind it)")
        return s

    def to_json(self) -> dict[str, Any]:
        return {"lock_timeout_ms": self.lock_timeout_ms,
                "statement_timeout_ms": self.statement_timeout_ms,
                "long_statement_timeout_ms": self.long_statement_timeout_ms,
                "lock_retries": self.lock_retries, "retry_backoff_ms": self.retry_backoff_ms,
                "retry_backoff_max_ms": self.retry_backoff_max_ms}


@dataclass(frozen=True)
class MigrationFile:
    """A parsed migration file: checked for shape, not yet against a database."""

    id: str
    description: str
    operations: tuple[dict[str, Any], ...]
    settings: Settings
    depends_on: tuple[str, ...] = ()
    backfill: dict[str, Any] = field(default_factory=dict)   # job options for its backfills
    checksum: str = ""
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "description": self.description,
                "operations": list(self.operations), "settings": self.settings.to_json(),
                "depends_on": list(self.depends_on), "backfill": self.backfill}


def load_file(path: str | Path) -> MigrationFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot read migration file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"migration file {p} is not UTF-8 text (byte {exc.start}: "
                           f"{exc.reason})") from None
    return parse(text, str(p))


def parse(text: str, name: str = "<migration>") -> MigrationFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{name}: not valid TOML: {exc}") from None
    known = {"id", "description", "operations", "settings", "depends_on", "backfill"}
    unknown = set(data) - known
    if unknown:
        raise InvalidInput(f"{name}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(a migration has: {', '.join(sorted(known))})")
    mid = data.get("id")
    if not isinstance(mid, str) or not _ID_RE.match(mid):
        raise InvalidInput(f"{name}: `id` must be a string of letters, digits, '_', '-' or '.' "
                           f"(at most 100), got {mid!r}")
    ops = data.get("operations")
    if not isinstance(ops, list) or not ops or not all(isinstance(o, dict) for o in ops):
        raise InvalidInput(f"{name}: a migration needs at least one [[operations]] table")
    for i, o in enumerate(ops):
        if o.get("op") not in OPERATION_NAMES:
            raise InvalidInput(f"{name}: operation {i + 1}: unknown op {o.get('op')!r} "
                               f"(ops: {', '.join(OPERATION_NAMES)})")
    deps = data.get("depends_on", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise InvalidInput(f"{name}: depends_on must be a list of migration ids")
    backfill = data.get("backfill", {})
    if not isinstance(backfill, dict):
        raise InvalidInput(f"{name}: [backfill] must be a table of job options")
    if not isinstance(data.get("settings", {}), dict):
        raise InvalidInput(f"{name}: [settings] must be a table")
    settings = Settings.from_toml(data.get("settings", {}))
    canonical = json.dumps({"id": mid, "description": data.get("description", ""),
                            "operations": ops, "settings": settings.to_json(),
                            "depends_on": deps, "backfill": backfill},
                           sort_keys=True, default=str)
    return MigrationFile(
        id=mid, description=str(data.get("description", "")), operations=tuple(ops),
        settings=settings, depends_on=tuple(deps), backfill=dict(backfill),
        checksum=hashlib.sha256(canonical.encode()).hexdigest()[:16], path=name)
