"""The cutover: a gate that opens when the catch-up has stayed close behind the source for a
while, and the final steps once the application stopped writing to the source (drain,
verify, move the identity sequences). The runbook is in docs/mysql.md.

The gate's decision is a pure function of lag readings (:func:`gate_decision`); a reading
that could not be taken closes it (fail-closed, as the throttle does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backfill.core.db import connect as pg_connect
from backfill.core.errors import BackfillError, InvalidOption
from backfill.mysql.binlog import CatchUpResult, Lag, catch_up, measure_lag
from backfill.mysql.errors import CheckpointConflict
from backfill.mysql.model import TablePlan
from backfill.mysql.schema import sequence_statements
from backfill.mysql.source import MySQLSource, connect, query
from backfill.mysql.verify import VerifyReport, verify_table


class CutoverRefused(BackfillError):
    """Raised when the cutover cannot complete: the source is still written to, or verify
    found differences. Nothing was switched; the sequences were not moved."""


@dataclass(frozen=True)
class GatePolicy:
    max_lag_seconds: float = 5.0
    max_lag_events: int = 10_000
    hold_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_lag_seconds < 0 or self.max_lag_events < 0 or self.hold_seconds < 0:
            raise InvalidOption("the gate's bounds must not be negative")


@dataclass(frozen=True)
class LagReading:
    at: float                 # monotonic seconds
    lag: Lag | None           # None: could not be read


@dataclass(frozen=True)
class GateDecision:
    open: bool
    reason: str


def gate_decision(readings: Sequence[LagReading], now: float, policy: GatePolicy
                  ) -> GateDecision:
    """Open when readings span the last ``hold_seconds`` and each of them is within bounds."""
    if not readings:
        return GateDecision(False, "no lag reading yet")
    since = now - policy.hold_seconds
    window = [r for r in readings if r.at >= since]
    older = [r for r in readings if r.at < since]
    for r in window:
        if r.lag is None:
            return GateDecision(False, "a lag reading failed in the hold window")
        if r.lag.seconds > policy.max_lag_seconds or r.lag.events > policy.max_lag_events:
            return GateDecision(False, f"lag {r.lag.seconds:.1f}s / {r.lag.events} events "
                                       f"above {policy.max_lag_seconds:g}s / "
                                       f"{policy.max_lag_events} within the last "
                                       f"{policy.hold_seconds:g}s")
    if not older and (readings[0].at > since):
        return GateDecision(False, f"lag within bounds for {now - readings[0].at:.1f}s of "
                                   f"{policy.hold_seconds:g}s")
    return GateDecision(True, f"lag within bounds for {policy.hold_seconds:g}s")


def wait_for_gate(source: MySQLSource, dest_dsn: str, plans: Sequence[TablePlan],
                  policy: GatePolicy, *, timeout: float, interval: float = 1.0,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> GateDecision:
    """Poll the lag (a follower applies meanwhile: ``backfill mysql catch-up --follow``)
    until the gate opens or ``timeout`` passes; returns the last decision."""
    readings: list[LagReading] = []
    deadline = clock() + timeout
    while True:
        try:
            lag: Lag | None = measure_lag(source, dest_dsn, plans)
        except BackfillError:
            lag = None
        now = clock()
        readings.append(LagReading(now, lag))
        readings = [r for r in readings if r.at >= now - policy.hold_seconds - interval * 2]
        decision = gate_decision(readings, now, policy)
        if decision.open or now >= deadline:
            return decision
        sleep(interval)


@dataclass
class CutoverReport:
    drained: CatchUpResult | None = None
    verify: list[VerifyReport] = field(default_factory=list)
    sequences: dict[str, int] = field(default_factory=dict)


def source_auto_increments(source: MySQLSource, plans: Sequence[TablePlan]
                           ) -> dict[str, int]:
    """The source's next AUTO_INCREMENT per table (it can be above max(id) after deletes)."""
    conn = connect(source, raw=False)
    try:
        out = {}
        for plan in plans:
            rows = query(conn, "SELECT auto_increment FROM information_schema.tables "
                               "WHERE table_schema = %s AND table_name = %s",
                         (plan.source.database, plan.source.name))
            if rows and rows[0][0] is not None:
                out[plan.source.name] = int(rows[0][0])
        return out
    finally:
        conn.close()


def move_sequences(source: MySQLSource, dest_dsn: str, plans: Sequence[TablePlan]
                   ) -> dict[str, int]:
    """Each identity sequence past both max(column) and the source's AUTO_INCREMENT;
    returns the next value per ``table.column``."""
    nexts = source_auto_increments(source, plans)
    moved = {}
    with pg_connect(dest_dsn, application_name="backfill-mysql-cutover") as pg:
        for plan in plans:
            ident = [c for c in plan.columns if c.identity]
            floor = {c.source.name: nexts.get(plan.source.name, 1) for c in ident}
            for c, stmt in zip(ident, sequence_statements(plan, floor), strict=True):
                row = pg.execute(stmt).fetchone()
                moved[f"{plan.name}.{c.name}"] = int(row[0]) if row else 0
    return moved


def cutover(source: MySQLSource, dest_dsn: str, plans: Sequence[TablePlan], *,
            range_size: int = 10_000, attempts: int = 3) -> CutoverReport:
    """With the source's writes stopped: drain the binlog, verify every table, then move the
    sequences. :class:`CutoverRefused` (nothing moved) when the source still changes or a
    table does not verify."""
    report = CutoverReport()
    for attempt in range(attempts):
        try:
            report.drained = catch_up(source, dest_dsn, plans)
            break
        except CheckpointConflict:
            if attempt == attempts - 1:
                raise CutoverRefused("another catch-up keeps moving the position: stop the "
                                     "follower before the cutover") from None
    for plan in plans:
        checked = verify_table(source, dest_dsn, plan, range_size=range_size)
        report.verify.append(checked)
        if not checked.ok:
            first = next((r.differences[0] for r in checked.mismatched if r.differences), None)
            raise CutoverRefused(
                f"{plan.name} does not verify: {len(checked.mismatched)} range(s) differ "
                f"(first key {first}), {checked.source_rows} source rows, "
                f"{checked.dest_rows} destination rows")
    after = measure_lag(source, dest_dsn, plans)
    if after.events:
        raise CutoverRefused(f"the source was written during the cutover ({after.events} "
                             "changes since the drain): stop the application's writes first")
    report.sequences = move_sequences(source, dest_dsn, plans)
    return report
