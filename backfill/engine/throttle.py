"""Pure pacing decisions: the adaptive batch size and the rate limit. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.job.options import JobOptions

#: Weight of the newest per-row time in the moving average (lower: smoother, slower to react).
SMOOTHING = 0.3
#: Keep the size when the ideal one is within this fraction of it (no oscillation around target).
DEAD_BAND = 0.15
#: Largest growth factor per batch; shrinking is faster so an overload is left quickly.
MAX_GROWTH = 1.5
MAX_SHRINK = 0.5
#: Once a batch has blocked an application session, batches are held to the lock-wait budget
#: in duration until this much batch time has passed without blocking anyone (the
#: application stopped writing the table): then they may grow to the target again. Blocking
#: is rare per batch even on a busy table (a 30 ms batch of 10k rows in 5M, 200 app writes/s:
#: about one batch in 75), so a per-batch probe upwards would climb back between two blocks.
QUIET_LIFT_MS = 60_000.0
#: The deepest cut of the ceiling after one batch: a proportional cut, so a 500 ms batch
#: under a 30 ms budget comes down in one step, not four halvings (each one blocking the app).
CEILING_MIN_CUT = 0.1


@dataclass(frozen=True)
class LockWaits:
    """Application sessions blocked behind a batch, sampled just before its COMMIT (they
    all wait until it commits: the sample sees every one still waiting)."""

    sessions: int = 0
    #: The longest of their waits so far (ms); each waits until COMMIT, a moment later.
    max_wait_ms: float = 0.0


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
    #: The largest batch the lock-wait budget allows (``None``: no session blocked yet, or
    #: not for ``QUIET_LIFT_MS`` of batch time). While ``held``: the rows that fit the budget
    #: at the measured per-row time (after an overrun, at most ``rows * budget / duration``).
    ceiling: int | None = None
    held: bool = False
    #: Batch time since a batch last blocked a session, while held.
    quiet_ms: float = 0.0

    def observe(self, rows: int, duration_ms: float, options: JobOptions,
                waits: LockWaits | None = None) -> int:
        """Record a finished batch (and the sessions it blocked) and return the next size.

        Throughput is maximised under a latency bound: the size moves toward the target
        duration, but never above the ceiling the lock-wait budget sets. A session blocked
        by a batch waits for its COMMIT, at worst the whole batch (its first row is locked
        from the start): once a batch has blocked anyone, batches are held to the budget in
        duration (the rows that fit it at the measured per-row time; right after an
        overrun, at most ``rows * budget / duration``), until ``QUIET_LIFT_MS`` of batch
        time passes without blocking anyone.
        """
        cut = self._observe_waits(rows, duration_ms, waits, options)
        if rows > 0 and duration_ms >= 0:
            sample = max(duration_ms, 0.01) / rows
            if self.ms_per_row is None:
                self.ms_per_row = sample
            else:
                self.ms_per_row = SMOOTHING * sample + (1 - SMOOTHING) * self.ms_per_row
        if self.held and self.ms_per_row:
            fit = max(1, int(options.lock_wait_budget_ms / self.ms_per_row))
            if self.ceiling is not None:   # one slow batch does not cut deeper than tenfold
                fit = max(fit, int(self.ceiling * CEILING_MIN_CUT))
            self.ceiling = min(fit, cut) if cut is not None else fit
        if self.ms_per_row is None or rows < self.size // 2:
            # A short last batch says little about the per-row cost at full size.
            return self.clamp(options)
        ideal = options.target_duration_ms / self.ms_per_row
        ratio = ideal / self.size
        if abs(ratio - 1.0) > DEAD_BAND:
            ratio = min(max(ratio, MAX_SHRINK), MAX_GROWTH)
            self.size = int(self.size * ratio)
        return self.clamp(options)

    def _observe_waits(self, rows: int, duration_ms: float, waits: LockWaits | None,
                       options: JobOptions) -> int | None:
        """Hold or release the budget; return the rows an overrun cuts the ceiling to."""
        budget = options.lock_wait_budget_ms
        if not budget:
            self.ceiling, self.held = None, False   # turned off (tuned to 0): no cap left over
            return None
        if waits is None or rows <= 0:
            return None
        if waits.sessions > 0:
            self.held, self.quiet_ms = True, 0.0
            longest = max(duration_ms, waits.max_wait_ms)
            if longest > budget:
                scale = max(budget / longest, CEILING_MIN_CUT)
                base = min(rows, self.ceiling) if self.ceiling is not None else rows
                return max(1, int(base * scale))
        elif self.held:
            self.quiet_ms += max(duration_ms, 0.0)
            if self.quiet_ms >= QUIET_LIFT_MS:   # the application stopped writing here
                self.ceiling, self.held, self.quiet_ms = None, False, 0.0
        return None

    def shrink(self, options: JobOptions) -> int:
        """After a statement timeout: halve the size (and forget the per-row estimate)."""
        capped = rate_cap(self.rate, options) < options.min_batch_size
        self.size = max(1 if capped else options.min_batch_size, self.size // 2)
        self.ms_per_row = None
        return self.size

    def clamp(self, options: JobOptions) -> int:
        self.size = min(max(self.size, options.min_batch_size), options.max_batch_size,
                        rate_cap(self.rate, options))
        if self.ceiling is not None and options.lock_wait_budget_ms and self.size > self.ceiling:
            # Below min_batch_size if need be: the budget is about the application.
            self.size = max(1, self.ceiling)
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
