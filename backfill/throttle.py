"""Pure pacing decisions: the adaptive batch size and the rate limit. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.options import JobOptions

#: Weight of the newest per-row time in the moving average (lower: smoother, slower to react).
SMOOTHING = 0.3
#: Keep the size when the ideal one is within this fraction of it (no oscillation around target).
DEAD_BAND = 0.15
#: Largest growth factor per batch; shrinking is faster so an overload is left quickly.
MAX_GROWTH = 1.5
MAX_SHRINK = 0.5


@dataclass
class BatchSizer:
    """Moves the batch size toward ``target_duration_ms`` from observed per-row time.

    Uses an exponentially weighted moving average of milliseconds per row so one slow batch
    (a checkpoint, an autovacuum pass) does not halve throughput, a dead band so the size settles
    instead of oscillating, and bounded steps.
    """

    size: int
    ms_per_row: float | None = None
    #: Rows/s this batch chain may do (the job's --rate, or its share of a controller budget,
    #: per slot); None: no cap. Under a cap a batch holds at most ``rate * target duration``
    #: rows, below ``min_batch_size`` if need be: a low rate gives small, frequent batches
    #: (locks held briefly, the cap true over any minute), not one huge batch and a long sleep.
    rate: float | None = None

    def observe(self, rows: int, duration_ms: float, options: JobOptions) -> int:
        """Record a finished batch and return the size of the next one."""
        if rows > 0 and duration_ms >= 0:
            sample = max(duration_ms, 0.01) / rows
            if self.ms_per_row is None:
                self.ms_per_row = sample
            else:
                self.ms_per_row = SMOOTHING * sample + (1 - SMOOTHING) * self.ms_per_row
        if self.ms_per_row is None or rows < self.size // 2:
            # A short last batch says little about the per-row cost at full size.
            return self.clamp(options)
        ideal = options.target_duration_ms / self.ms_per_row
        ratio = ideal / self.size
        if abs(ratio - 1.0) > DEAD_BAND:
            ratio = min(max(ratio, MAX_SHRINK), MAX_GROWTH)
            self.size = int(self.size * ratio)
        return self.clamp(options)

    def shrink(self, options: JobOptions) -> int:
        """After a statement timeout: halve the size (and forget the per-row estimate)."""
        capped = rate_cap(self.rate, options) < options.min_batch_size
        self.size = max(1 if capped else options.min_batch_size, self.size // 2)
        self.ms_per_row = None
        return self.size

    def clamp(self, options: JobOptions) -> int:
        self.size = min(max(self.size, options.min_batch_size), options.max_batch_size,
                        rate_cap(self.rate, options))
        return self.size


def rate_cap(rate: float | None, options: JobOptions) -> int:
    """The largest batch under a rate limit: ``rate * target duration`` rows (at least 1)."""
    if not rate or rate <= 0:
        return options.max_batch_size
    return max(1, int(rate * options.target_duration_ms / 1000.0))


def rate_delay(rows: int, batch_seconds: float, rate_limit: float | None) -> float:
    """Seconds to wait after a batch of ``rows`` that took ``batch_seconds`` to stay at
    ``rate_limit`` rows/s on average (0 when there is no limit or the batch was slow enough)."""
    if not rate_limit or rows <= 0:
        return 0.0
    return max(0.0, rows / rate_limit - batch_seconds)


def eta_seconds(done: int, total: int | None, rows_per_s: float | None) -> float | None:
    """Seconds left at the current rate, or ``None`` when unknown."""
    if total is None or not rows_per_s or rows_per_s <= 0:
        return None
    return max(0, total - done) / rows_per_s


def batch_interval_s(batch_size: int, rate_limit: float | None, pause_s: float = 0.0,
                     rows_share: float | None = None,
                     batches_share: float | None = None) -> float:
    """Seconds a job's pacing puts between the starts of its batches, across all its slots
    (0 when nothing paces it): what "its next batch is late" is measured against.

    Mirrors the runner's delay after a batch: ``--rate`` and the controller's rows/s share are
    the job's (its slots share them), so a batch of ``batch_size`` rows comes every
    ``batch_size / rate`` seconds; a batches/s share allows one batch every ``1 / share``; the
    job's pause is slept after each batch."""
    rates = [r for r in (rate_limit, rows_share) if r]
    interval = batch_size / min(rates) if rates and batch_size > 0 else 0.0
    if batches_share:
        interval = max(interval, 1.0 / batches_share)
    return interval + max(0.0, pause_s)
