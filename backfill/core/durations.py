"""Parsing of human durations and sizes used in options (``500ms``, ``2s``, ``1m30s``)."""

from __future__ import annotations

import math
import re

from backfill.core.errors import InvalidOption

_UNITS_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0, "h": 3_600_000.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)")


def parse_duration_ms(text: str | float | int, *, option: str = "duration") -> float:
    """Return milliseconds for ``text``: a bare number is seconds; ``250ms``, ``2s``, ``1m30s``."""
    if isinstance(text, bool):
        raise InvalidOption(f"{option}: expected a duration, got {text!r}")
    if isinstance(text, int | float):
        value = float(text) * 1000.0
    else:
        s = text.strip().lower()
        if not s:
            raise InvalidOption(f"{option}: empty duration")
        try:
            value = float(s) * 1000.0
        except ValueError:
            pos = 0
            value = 0.0
            for m in _PART.finditer(s):
                if m.start() != pos and s[pos : m.start()].strip():
                    break
                value += float(m.group(1)) * _UNITS_MS[m.group(2)]
                pos = m.end()
            if pos == 0 or s[pos:].strip():
                raise InvalidOption(
                    f"{option}: cannot parse duration {text!r} (use e.g. 500ms, 2s, 1m30s)"
                ) from None
    if not math.isfinite(value):
        raise InvalidOption(f"{option}: duration must be finite, got {text!r}")
    if value < 0:
        raise InvalidOption(f"{option}: duration must not be negative, got {text!r}")
    return value


def format_duration(seconds: float | None) -> str:
    """Render seconds compactly for humans: ``1h02m``, ``3m05s``, ``12s``, ``-`` for unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?$")
_SIZE_UNITS = {None: 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20,
               "gb": 2**30, "gib": 2**30, "tb": 2**40, "tib": 2**40}


def parse_size(text: str | int | float, *, option: str = "size") -> float:
    """Bytes for ``text``: a bare number is bytes; ``512MB``, ``1GB`` (as in PostgreSQL,
    kB/MB/GB/TB are powers of 1024; KiB/MiB/GiB/TiB are accepted too)."""
    if isinstance(text, bool):
        raise InvalidOption(f"{option}: expected a size, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _SIZE.match(text.strip().lower())
        if not m:
            raise InvalidOption(f"{option}: cannot parse size {text!r} (use e.g. 512MB, 1GB)")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if not math.isfinite(value) or value < 0:
        raise InvalidOption(f"{option}: size must be a finite, non-negative number of bytes")
    return value
