"""Rates, ETAs and stalls from a job's recent batches (backfill.state.pace): pure, no database."""

from __future__ import annotations

import datetime as dt

from backfill.state.pace import BatchSample, Limits, ceiling, measure

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def batches(count: int, *, every_s: float, rows: int, duration_s: float,
            last_ago_s: float = 0.0) -> list[BatchSample]:
    """``count`` batches, newest first, one every ``every_s`` seconds, the last one
    ``last_ago_s`` before NOW."""
    return [BatchSample(NOW - dt.timedelta(seconds=last_ago_s + i * every_s), duration_s, rows)
            for i in range(count)]


def test_a_rate_limited_job_after_its_first_batch_needs_hours_not_seconds() -> None:
    # --rate 5, 288k rows left: its first 1,000-row batch took 50 ms (20,000 rows/s), but
    # the limit allows 5 rows/s, so the job needs about 16 hours.
    pace = measure(batches(1, every_s=0, rows=1000, duration_s=0.05, last_ago_s=1),
                   now=NOW, running_since=NOW - dt.timedelta(seconds=2), running=True,
                   rows_left=288_000, limits=Limits(rate_limit=5, batch_size=1000))
    assert pace.rows_per_s == 5
    assert pace.eta_s is not None
    assert 15 * 3600 < pace.eta_s < 17 * 3600
    assert pace.stalled_since is None


def test_the_rate_of_a_paced_job_counts_its_sleeps() -> None:
    # 1,000 rows every 200 s (the 5 rows/s limit), the last one 100 s ago: 5 rows/s, not the
    # 20,000 rows/s of the batches themselves, and not less for the sleep in progress.
    pace = measure(batches(6, every_s=200, rows=1000, duration_s=0.05, last_ago_s=100),
                   now=NOW, running_since=None, running=True, rows_left=10_000,
                   limits=Limits(rate_limit=5, batch_size=1000))
    assert pace.rows_per_s is not None
    assert abs(pace.rows_per_s - 5) < 0.01
    assert pace.expected_interval_s is not None
    assert abs(pace.expected_interval_s - 200) < 0.1
    assert pace.eta_s is not None
    assert abs(pace.eta_s - 2000) < 5


def test_a_pause_between_batches_caps_the_eta() -> None:
    # --pause 1s after 100 ms batches of 1,000 rows: at most ~909 rows/s.
    cap, interval = ceiling(Limits(pause_s=1.0, batch_size=1000), 1000, 0.1)
    assert cap is not None
    assert abs(cap - 1000 / 1.1) < 0.01
    assert interval is not None
    assert abs(interval - 1.1) < 1e-9
    pace = measure(batches(1, every_s=0, rows=1000, duration_s=0.1), now=NOW,
                   running_since=None, running=True, rows_left=909_091,
                   limits=Limits(pause_s=1.0, batch_size=1000))
    assert pace.eta_s is not None
    assert abs(pace.eta_s - 1000) < 1


def test_a_job_without_a_batch_for_14_minutes_is_stalled_and_slow() -> None:
    # It did 800 rows every 0.5 s, then nothing for 14 minutes: not 1,600 rows/s and a
    # 3-minute ETA, but a rate near zero, no ETA, and "stalled since" its last batch.
    samples = batches(200, every_s=0.5, rows=800, duration_s=0.4, last_ago_s=14 * 60)
    pace = measure(samples, now=NOW, running_since=NOW - dt.timedelta(hours=1), running=True,
                   rows_left=300_000, limits=Limits(batch_size=800))
    assert pace.stalled_since == samples[0].finished_at
    assert pace.rows_per_s is not None
    assert pace.rows_per_s < 10
    assert pace.eta_s is None


def test_not_stalled_within_its_expected_interval_or_when_not_running() -> None:
    # A 5 rows/s job's batches come every 200 s: 5 minutes without one is on time.
    slow = batches(5, every_s=200, rows=1000, duration_s=0.05, last_ago_s=300)
    assert measure(slow, now=NOW, running_since=None, running=True, rows_left=1,
                   limits=Limits(rate_limit=5)).stalled_since is None
    # 11 minutes is more than 3 intervals: stalled.
    late = batches(5, every_s=200, rows=1000, duration_s=0.05, last_ago_s=660)
    assert measure(late, now=NOW, running_since=None, running=True, rows_left=1,
                   limits=Limits(rate_limit=5)).stalled_since == late[0].finished_at
    # A fast job gets at least a minute (a checkpoint or a lock wait may hold one batch).
    fast = batches(50, every_s=0.1, rows=100, duration_s=0.05, last_ago_s=50)
    assert measure(fast, now=NOW, running_since=None, running=True, rows_left=1,
                   limits=Limits()).stalled_since is None
    # Throttled (running=False): waiting is its job; no stall, no ETA.
    throttled = measure(late, now=NOW, running_since=None, running=False, rows_left=1,
                        limits=Limits(rate_limit=5))
    assert throttled.stalled_since is None
    assert throttled.eta_s is None


def test_a_resumed_job_is_measured_from_its_resume() -> None:
    # Fast batches an hour ago, paused, resumed 10 s ago with two batches since: the old
    # batches do not count, and neither does the hour in between.
    old = batches(100, every_s=0.1, rows=1000, duration_s=0.1, last_ago_s=3600)
    new = batches(2, every_s=1, rows=1000, duration_s=0.5, last_ago_s=0.5)
    pace = measure(new + old, now=NOW, running_since=NOW - dt.timedelta(seconds=10),
                   running=True, rows_left=1000, limits=Limits())
    assert pace.rows_per_s is not None
    assert 900 < pace.rows_per_s < 1100
    # Resumed a minute and a half ago and no batch since: stalled since the resume.
    since = NOW - dt.timedelta(seconds=90)
    assert measure(old, now=NOW, running_since=since, running=True, rows_left=1,
                   limits=Limits()).stalled_since == since


def test_a_steady_job_over_its_last_minute() -> None:
    # 500 rows every 0.25 s for minutes: 2,000 rows/s; 120k rows left: a minute.
    pace = measure(batches(200, every_s=0.25, rows=500, duration_s=0.2, last_ago_s=0.1),
                   now=NOW, running_since=None, running=True, rows_left=120_000,
                   limits=Limits())
    assert pace.rows_per_s is not None
    assert abs(pace.rows_per_s - 2000) < 50
    assert pace.eta_s is not None
    assert 55 < pace.eta_s < 65
    assert measure([], now=NOW, running_since=None, running=True, rows_left=5,
                   limits=Limits()).rows_per_s is None


def test_the_run_progress_bar_eta_respects_the_rate_limit() -> None:
    from types import SimpleNamespace
    from typing import Any

    from backfill.cli.jobs import _capped_rate
    from backfill.job.options import JobOptions

    job = SimpleNamespace(options=JobOptions(batch_size=1000, rate_limit=5), rate_share=None,
                          batch_rate_share=None)
    first: Any = SimpleNamespace(job=job, batch=SimpleNamespace(duration_ms=50.0),
                                 batch_size=1000, rows_per_s=None)
    assert _capped_rate(first) == 5  # before a second batch: the limit, not "unknown"
    measured: Any = SimpleNamespace(**{**vars(first), "rows_per_s": 20_000.0})
    assert _capped_rate(measured) == 5
    free: Any = SimpleNamespace(**{**vars(first), "rows_per_s": 20_000.0,
                                   "job": SimpleNamespace(**{**vars(job),
                                                             "options": JobOptions()})})
    assert _capped_rate(free) == 20_000
