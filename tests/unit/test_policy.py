"""The controller's pure policy: thresholds, hysteresis, hold time, fail-closed, overrides."""

from __future__ import annotations

import pytest

from backfill.control.policy import Decision, JobView, Limit, PolicyConfig, Reading, decide, rate_shares
from backfill.core.durations import parse_size
from backfill.core.errors import InvalidOption
from backfill.job.states import JobState

LAG = Limit(2.0, 1.0)
CONFIG = PolicyConfig(limits={"replica_lag": LAG, "lock_waiters": Limit(5, 1)}, hold_s=10)
RUNNING = JobView(1, "fill", JobState.RUNNING)
THROTTLED = JobView(1, "fill", JobState.THROTTLED)


def lag(value: float | None, error: str | None = None) -> Reading:
    return Reading("replica_lag", "replica_lag[r1]", value, error=error)


def one(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_a_running_job_throttles_at_the_limit_and_says_why() -> None:
    decisions, _ = decide(CONFIG, [RUNNING], [lag(2.0)], {}, now=0)
    d = one(decisions)
    assert d.action == "throttle"
    assert d.reason == "replica_lag[r1] 2.0s >= 2.0s"
    assert d.readings == (lag(2.0),)
    assert decide(CONFIG, [RUNNING], [lag(1.9)], {}, now=0)[0] == []


def test_an_unreadable_signal_throttles_fail_closed() -> None:
    d = one(decide(CONFIG, [RUNNING], [lag(None, "connection refused")], {}, now=0)[0])
    assert d.action == "throttle"
    assert "cannot read replica_lag[r1]: connection refused (fail closed)" in d.reason


def test_resume_needs_every_signal_below_the_lower_threshold_for_the_hold_time() -> None:
    clear: dict[int, float] = {}
    # Between the thresholds: stays throttled, the hold clock does not start.
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(1.5)], clear, now=0)
    assert decisions == []
    assert clear == {}
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(0.5)], clear, now=1)
    assert decisions == []
    assert clear == {1: 1}
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(0.5)], clear, now=10.9)
    assert decisions == []
    # A blip above the resume threshold restarts the hold.
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(1.2)], clear, now=11)
    assert (decisions, clear) == ([], {})
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(0.2)], clear, now=12)
    assert decide(CONFIG, [THROTTLED], [lag(0.2)], clear, now=21.9)[0] == []
    d = one(decide(CONFIG, [THROTTLED], [lag(0.2)], clear, now=22)[0])
    assert d.action == "resume"
    assert "for 10s" in d.reason


def test_an_unreadable_signal_keeps_a_throttled_job_throttled() -> None:
    decisions, clear = decide(CONFIG, [THROTTLED], [lag(None, "timeout")], {1: 0}, now=100)
    assert (decisions, clear) == ([], {})


def test_paused_and_pending_jobs_are_never_decided_on() -> None:
    for state in (JobState.PAUSED, JobState.PENDING, JobState.SUCCEEDED):
        job = JobView(1, "fill", state)
        assert decide(CONFIG, [job], [lag(99)], {}, now=0)[0] == []
        assert decide(CONFIG, [job], [lag(0)], {1: -100}, now=0)[0] == []


def test_per_job_readings_and_per_job_limits() -> None:
    other = JobView(2, "big_copy", JobState.RUNNING)
    waiters = Reading("lock_waiters", "lock_waiters[items]", 7, job_id=1)
    decisions, _ = decide(CONFIG, [RUNNING, other], [waiters], {}, now=0)
    assert [d.job_id for d in decisions] == [1]  # the waiters are on job 1's table only
    lenient = PolicyConfig(limits=CONFIG.limits, per_job={"big_copy": {"replica_lag": Limit(30, 10)}},
                           hold_s=10)
    decisions, _ = decide(lenient, [RUNNING, other], [lag(5)], {}, now=0)
    assert [d.job_id for d in decisions] == [1]


def test_readings_without_a_limit_are_informational() -> None:
    vacuum = Reading("autovacuum", "autovacuum[items]", 1, job_id=1)
    assert decide(CONFIG, [RUNNING], [vacuum], {}, now=0)[0] == []
    strict = PolicyConfig(limits={"autovacuum": Limit(1, 1)})
    assert one(decide(strict, [RUNNING], [vacuum], {}, now=0)[0]).reason == (
        "autovacuum[items] running >= running")


def test_limits_are_validated_and_sizes_parse() -> None:
    with pytest.raises(ValueError, match="resume threshold"):
        Limit(1, 2)
    assert Limit.at(10) == Limit(10, 5)
    assert parse_size("1GB") == 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size(100) == 100
    with pytest.raises(InvalidOption):
        parse_size("lots")


def test_rate_shares_split_a_global_budget() -> None:
    assert rate_shares(1000, [1, 2, 3, 4]) == {1: 250, 2: 250, 3: 250, 4: 250}
    assert rate_shares(None, [1]) == {1: None}
    assert rate_shares(1000, []) == {}


def test_replica_lag_from_heartbeats_ignores_pauses_in_writing() -> None:
    import datetime as dt

    from backfill.control.signals import Heartbeats

    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    beats = Heartbeats()
    assert beats.lag(t, t) is None  # nothing written: cannot tell
    # A heartbeat an hour ago, then a pause (a controller restart), then one every second.
    beats.written = [t, t + dt.timedelta(hours=1), t + dt.timedelta(hours=1, seconds=1)]
    now = t + dt.timedelta(hours=1, seconds=1.5)
    assert beats.lag(t + dt.timedelta(hours=1, seconds=1), now) == 0.0  # has the newest
    # Has the hour-old one only: behind since the first one it lacks, 1.5 s ago, not 1 h.
    assert beats.lag(t, now) == 1.5
    assert beats.lag(t + dt.timedelta(hours=1), now) == 0.5
    # Older than anything remembered: at least as old as the oldest remembered.
    assert beats.lag(t - dt.timedelta(seconds=5), now) == 3601.5


def test_a_rising_lag_throttles_before_it_reaches_the_limit() -> None:
    predictive = PolicyConfig(limits={"replica_lag": LAG}, hold_s=10, lookahead_s=1.0)
    rising = Reading("replica_lag", "replica_lag[r1]", 1.2, trend=0.9)
    d = one(decide(predictive, [RUNNING], [rising], {}, now=0)[0])
    assert d.action == "throttle"
    assert "rising 0.90/s" in d.reason
    # Falling, or too slow to get there within the lookahead: nothing yet.
    for trend in (-0.5, 0.5):
        steady = Reading("replica_lag", "replica_lag[r1]", 1.2, trend=trend)
        assert decide(predictive, [RUNNING], [steady], {}, now=0)[0] == []
    assert decide(CONFIG, [RUNNING], [rising], {}, now=0)[0] == []  # no lookahead: off


def test_a_signal_kind_keeps_a_probe_name_and_maps_standby_readings() -> None:
    from backfill.control.policy import kind_of

    assert kind_of("probe[queue_depth]") == "probe:queue_depth"  # as its limit is keyed
    assert kind_of("standby_replay_lag[walreceiver@10.0.0.2]") == "replica_lag"
    assert kind_of("standby_replay_bytes[r1]") == "replica_lag_bytes"
    assert kind_of("lock_waiters[job 3]") == "lock_waiters"
    assert kind_of("long_transaction") == "long_transaction"


def test_the_interval_between_batches_follows_the_runners_pacing() -> None:
    from backfill.engine.throttle import batch_interval_s

    assert batch_interval_s(5000, 5) == 1000  # --rate 5 --batch-size 5000
    assert batch_interval_s(5000, None) == 0  # not paced: due at once
    assert batch_interval_s(1000, 100, rows_share=50) == 20  # the smaller of rate and share
    assert batch_interval_s(1000, None, batches_share=0.1) == 10
    assert batch_interval_s(1000, 1000, pause_s=2, batches_share=0.5) == 4
