"""Example definitions; ``demo_fill_total`` is the job the README demo runs."""

from __future__ import annotations

import re
from typing import Any

from backfill import JobSpec, transform, update
from jobs import registry


@registry.job
def demo_fill_total() -> JobSpec:
    """Fill demo_orders.total_cents = quantity * unit_price_cents (the README demo)."""
    return update(
        "demo_orders",
        {"total_cents": "quantity::bigint * unit_price_cents"},
        target_duration="300ms",
    )


_NON_DIGITS = re.compile(r"\D+")


def normalise_phone(row: dict[str, Any]) -> dict[str, Any] | None:
    """``"(555) 010-0199"`` -> ``"+15550100199"``; leaves unparseable numbers alone."""
    raw = row.get("phone")
    if raw is None:
        return None
    digits = _NON_DIGITS.sub("", str(raw))
    if len(digits) == 10:
        digits = "1" + digits
    if len(digits) != 11:
        return None
    return {"phone": "+" + digits}


@registry.job
def normalise_customer_phones() -> JobSpec:
    """Rewrite customers.phone to E.164 (+1XXXXXXXXXX) with a Python transform."""
    return transform("customers", normalise_phone, columns=["phone"])
