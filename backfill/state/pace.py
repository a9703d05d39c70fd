"""How fast a job really goes, when it will finish, and whether it has stalled. Pure: no I/O.

The rate is measured over a recent window of batches by their wall-clock end times, up to
*now*: time the job spent sleeping (``--rate``, ``--pause``, the controller's budgets) or
stuck counts against it, so a job that stopped committing batches does not keep the rate of its
last busy minute. The ETA divides the rows left by that rate, capped by what the job's limits
allow at all (a ``--rate 5`` job with 288k rows left needs 16 h, whatever its first batch took).
A running job with no batch for longer than ``max(3 x expected interval, 60 s)`` is stalled.
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
from dataclasses import dataclass

#: The window the rate is measured over (at least MIN_BATCHES batches, however old).
WINDOW_S = 60.0
MIN_BATCHES = 3
#: Batches whose cadence sets the expected interval between two batches.
CADENCE_BATCHES = 20
#: A running job is stalled after this many expected intervals without a batch (and at least
#: STALL_MIN_S: a checkpoint, a lock wait or a retry may hold one batch that long).
STALL_FACTOR = 3.0
STALL_MIN_S = 60.0


@dataclass(frozen=True)
class BatchSample:
    """One committed batch: when it ended (database clock), how long it took, its rows."""

    finished_at: dt.datetime
    duration_s: float
    rows: int


@dataclass(frozen=True)
class Limits:
    """What caps a job's pace: its own ``--rate`` and ``--pause``, the controller's shares of
    the global budgets, and how many chains of batches run at once (its parallelism on the
    workers; one inline, where slices run one after another)."""

    rate_limit: float | None = None
    rows_share: float | None = None
    batches_share: float | None = None
    pause_s: float = 0.0
    chains: int = 1
    batch_size: int | None = None


@dataclass(frozen=True)
class Pace:
    rows_per_s: float | None
    eta_s: float | None
    expected_interval_s: float | None
    stalled_since: dt.datetime | None


def ceiling(limits: Limits, batch_rows: float | None, batch_s: float) -> tuple[float | None,
                                                                             float | None]:
    """The most rows/s the limits allow, and the interval between two batches of the job they
    imply (``None`` when nothing limits it)."""
    chains = max(1, limits.chains)
    rows = batch_rows if batch_rows and batch_rows > 0 else limits.batch_size
    if not rows:
        return None, None
    per_chain: list[float] = [batch_s]  # one chain's interval between its batches
    rate = min((r for r in (limits.rate_limit, limits.rows_share) if r), default=None)
    if rate:
        per_chain.append(rows * chains / rate)
    if limits.batches_share:
        per_chain.append(chains / limits.batches_share)
    interval = max(per_chain) + max(0.0, limits.pause_s)
    if interval <= 0 or (len(per_chain) == 1 and limits.pause_s <= 0):
        return None, None  # only the batch's own duration: no limit to speak of
    return rows * chains / interval, interval / chains


def measure(samples: list[BatchSample], *, now: dt.datetime, running_since: dt.datetime | None,
            running: bool, rows_left: int | None, limits: Limits) -> Pace:
    """Rate, ETA and stall of a job from its most recent batches (newest first)."""
    recent = [s for s in samples if running_since is None or s.finished_at > running_since]
    cadence = recent[:CADENCE_BATCHES]
    gaps = [(a.finished_at - b.finished_at).total_seconds()
            for a, b in itertools.pairwise(cadence)]
    batch_s = statistics.fmean(s.duration_s for s in cadence) if cadence else 0.0
    batch_rows = statistics.fmean(s.rows for s in cadence) if cadence else None
    cap, limit_interval = ceiling(limits, batch_rows, batch_s)
    expected = max(statistics.median(gaps) if gaps else 0.0, limit_interval or 0.0, batch_s)
    expected_s = expected if expected > 0 else None

    rate = _window_rate(recent, now, expected)
    if rate is not None and cap is not None:
        rate = min(rate, cap)

    stalled_since = None
    if running:
        last = recent[0].finished_at if recent else running_since
        if last is not None and (now - last).total_seconds() > max(
                STALL_FACTOR * expected, STALL_MIN_S):
            stalled_since = last
    eta = None
    if running and stalled_since is None and rows_left is not None:
        pace = rate if rate is not None else cap
        if pace:
            eta = rows_left / pace
    return Pace(rows_per_s=rate, eta_s=eta, expected_interval_s=expected_s,
                stalled_since=stalled_since)


def _window_rate(recent: list[BatchSample], now: dt.datetime, expected: float) -> float | None:
    """Rows/s over the batches of the last WINDOW_S (at least MIN_BATCHES), from the end of the
    batch before them to now, less the time the next batch is not yet due."""
    if not recent:
        return None
    horizon = now - dt.timedelta(seconds=WINDOW_S)
    window = [s for s in recent if s.finished_at >= horizon] or recent[:MIN_BATCHES]
    if len(window) < MIN_BATCHES:
        window = recent[:MIN_BATCHES]
    before = recent[len(window)] if len(recent) > len(window) else None
    if before is not None:  # n batches after `before`'s end: n intervals, sleeps included
        start, rows = before.finished_at, sum(s.rows for s in window)
    elif len(window) >= 2:  # the oldest batch had no interval before it: count from its end
        start, rows = window[-1].finished_at, sum(s.rows for s in window[:-1])
    else:  # one batch so far: its own speed (the limits cap it)
        only = window[0]
        start, rows = only.finished_at - dt.timedelta(seconds=only.duration_s), only.rows
    # Up to now, but the next batch is not late before an expected interval has passed.
    end = max(window[0].finished_at, now - dt.timedelta(seconds=expected))
    span = (end - start).total_seconds()
    return rows / span if span > 0 else None
