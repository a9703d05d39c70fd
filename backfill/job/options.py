"""Job options: how big, how fast and how patient a job's batches are. Validated in one place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from backfill.core.durations import parse_duration_ms
from backfill.core.errors import InvalidOption

#: The largest batch allowed, whatever the options say.
MAX_BATCH_SIZE = 10_000_000

#: The most slices a job may be split into.
MAX_PARALLELISM = 64

#: The longest duration an option takes: PostgreSQL's timeouts are int milliseconds (~24 days).
MAX_DURATION_MS = 2_147_483_647.0

#: The most retries per batch (a larger value is a typo, and never ends).
MAX_RETRIES = 10_000

#: Options that ``tune`` may change on a live job (``parallelism`` only before it starts).
TUNABLE = (
    "parallelism",
    "batch_size",
    "min_batch_size",
    "max_batch_size",
    "target_duration_ms",
    "rate_limit",
    "pause_ms",
    "statement_timeout_ms",
    "lock_timeout_ms",
    "max_retries",
    "lock_wait_budget_ms",
)


@dataclass(frozen=True)
class JobOptions:
    """Batch sizing, pacing, timeouts and the number of slices of one job.

    ``batch_size`` is the starting size; the optimizer moves it between ``min_batch_size`` and
    ``max_batch_size`` so a batch takes about ``target_duration_ms``. ``rate_limit`` caps rows
    per second (``None``: no cap). ``pause_ms`` is slept between batches.
    ``lock_wait_budget_ms`` bounds how long an application session may wait behind a batch's
    row locks: batches that make one wait longer get smaller (0: no bound).
    """

    batch_size: int = 1000
    min_batch_size: int = 10
    max_batch_size: int = 100_000
    target_duration_ms: float = 500.0
    rate_limit: float | None = None
    pause_ms: float = 0.0
    statement_timeout_ms: float = 30_000.0
    lock_timeout_ms: float = 2_000.0
    max_retries: int = 10
    parallelism: int = 1
    lock_wait_budget_ms: float = 30.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_batch_size", "max_batch_size", "max_retries",
                     "parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidOption(f"{name}: expected an integer, got {value!r}")
        for name in ("target_duration_ms", "pause_ms", "statement_timeout_ms", "lock_timeout_ms",
                     "rate_limit", "lock_wait_budget_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
                raise InvalidOption(f"{name}: expected a finite number, got {value!r}")
        for name in ("batch_size", "min_batch_size", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise InvalidOption(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise InvalidOption(
                f"parallelism must be between 1 and {MAX_PARALLELISM}, got {self.parallelism}")
        if not 0 <= self.max_retries <= MAX_RETRIES:
            raise InvalidOption(
                f"max_retries must be between 0 and {MAX_RETRIES:,}, got {self.max_retries}")
        for name in ("target_duration_ms", "pause_ms", "statement_timeout_ms", "lock_timeout_ms"):
            if getattr(self, name) > MAX_DURATION_MS:
                raise InvalidOption(f"{name.removesuffix('_ms')} must be at most "
                                    f"{MAX_DURATION_MS / 86_400_000:.0f} days")
        if self.max_batch_size > MAX_BATCH_SIZE:
            raise InvalidOption(
                f"max_batch_size ({self.max_batch_size}) is over the limit of {MAX_BATCH_SIZE:,} "
                "rows: a batch that large holds locks and bloats one transaction"
            )
        if self.min_batch_size > self.max_batch_size:
            raise InvalidOption(
                f"min_batch_size ({self.min_batch_size}) is larger than "
                f"max_batch_size ({self.max_batch_size})"
            )
        if not self.min_batch_size <= self.batch_size <= self.max_batch_size:
            raise InvalidOption(
                f"batch_size ({self.batch_size}) must lie between min_batch_size "
                f"({self.min_batch_size}) and max_batch_size ({self.max_batch_size})"
            )
        if self.target_duration_ms <= 0:
            raise InvalidOption("target_duration must be positive")
        if self.statement_timeout_ms <= 0 or self.lock_timeout_ms <= 0:
            raise InvalidOption("statement_timeout and lock_timeout must be positive")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise InvalidOption(f"rate_limit must be positive rows/s, got {self.rate_limit}")
        if self.pause_ms < 0:
            raise InvalidOption("pause must not be negative")
        if self.lock_wait_budget_ms < 0:
            raise InvalidOption("lock_wait_budget must not be negative (0: no bound)")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def merged(self, changes: dict[str, Any]) -> JobOptions:
        """Return a copy with ``changes`` applied (raw user values are parsed), validated."""
        current = self.to_json()
        parsed = parse_changes(changes)
        # Widen the bounds when the user moves batch_size outside them explicitly.
        if "batch_size" in parsed:
            bs = parsed["batch_size"]
            if "min_batch_size" not in parsed and bs < current["min_batch_size"]:
                parsed["min_batch_size"] = bs
            if "max_batch_size" not in parsed and bs > current["max_batch_size"]:
                parsed["max_batch_size"] = bs
        current.update(parsed)
        return JobOptions.from_json(current)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidOption(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).replace("_", ""))
    except ValueError:
        raise InvalidOption(f"{name}: expected an integer, got {value!r}") from None


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidOption(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidOption(f"{name}: expected a number, got {value!r}") from None


def parse_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Parse user-facing option values (``"2s"``, ``"1000"``) into :class:`JobOptions` fields.

    Accepts both field names and the CLI spellings (``target_duration``, ``rate``, ``pause``,
    ``statement_timeout``, ``lock_timeout``). ``rate_limit`` of 0 or ``"none"`` removes the cap.
    """
    aliases = {
        "target_duration": "target_duration_ms",
        "rate": "rate_limit",
        "pause": "pause_ms",
        "statement_timeout": "statement_timeout_ms",
        "lock_timeout": "lock_timeout_ms",
        "lock_wait_budget": "lock_wait_budget_ms",
    }
    out: dict[str, Any] = {}
    for raw_name, value in changes.items():
        if value is None:
            continue
        name = aliases.get(raw_name, raw_name)
        if name not in TUNABLE:
            raise InvalidOption(f"unknown option {raw_name!r} (known: {', '.join(TUNABLE)})")
        if name in ("batch_size", "min_batch_size", "max_batch_size", "max_retries",
                    "parallelism"):
            out[name] = _int(raw_name, value)
        elif name.endswith("_ms"):
            if name == raw_name and isinstance(value, int | float):
                out[name] = float(value)
            else:
                out[name] = parse_duration_ms(value, option=raw_name)
        elif name == "rate_limit":
            if isinstance(value, str) and value.strip().lower() in ("none", "off", "0"):
                out[name] = None
            else:
                rate = _float(raw_name, value)
                out[name] = None if rate == 0 else rate
    return out


def build_options(**changes: Any) -> JobOptions:
    """Options from user values on top of the defaults (see :func:`parse_changes`)."""
    return JobOptions().merged(changes)
