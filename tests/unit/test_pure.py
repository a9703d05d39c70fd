"""Fast tests of pure logic: options, durations, sizing, state machine, codecs, redaction."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import psycopg
import pytest
from psycopg import errors as pgerrors
from psycopg import sql

from backfill.core.db import redact_dsn, redact_text
from backfill.core.durations import format_duration, parse_duration_ms
from backfill.core.errors import IllegalTransition, InvalidInput, InvalidOption
from backfill.engine.keyset import KeyCodec, Keyset
from backfill.engine.retry import Verdict, classify
from backfill.engine.throttle import BatchSizer, LockWaits, eta_seconds, rate_delay
from backfill.job.options import JobOptions, build_options
from backfill.job.spec import JobSpec, parse_set, update
from backfill.job.states import TRANSITIONS, JobState, check_transition


@pytest.mark.parametrize(
    ("text", "ms"),
    [("500ms", 500), ("2s", 2000), ("1m30s", 90_000), ("1.5", 1500), (3, 3000), ("1h", 3_600_000)],
)
def test_parse_duration(text: str | int, ms: float) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["5parsecs", "", "s", "-1s", "2 s x", "ms5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidOption):
        parse_duration_ms(text)


def test_format_duration() -> None:
    assert format_duration(None) == "-"
    assert format_duration(5) == "5s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3720) == "1h02m"


def test_options_validation() -> None:
    with pytest.raises(InvalidOption, match="batch_size"):
        build_options(batch_size=0)
    with pytest.raises(InvalidOption, match="batch_size"):
        build_options(batch_size="abc")
    with pytest.raises(InvalidOption, match="rate"):
        build_options(rate=-1)
    with pytest.raises(InvalidOption, match="unknown option"):
        build_options(bach_size=10)
    opts = build_options(batch_size="500", target_duration="2s", rate="0", pause="100ms")
    assert (opts.batch_size, opts.target_duration_ms, opts.rate_limit, opts.pause_ms) == (
        500, 2000.0, None, 100.0)


def test_tune_widens_bounds_for_explicit_batch_size() -> None:
    opts = JobOptions().merged({"batch_size": 500_000})
    assert opts.batch_size == opts.max_batch_size == 500_000
    assert JobOptions.from_json(opts.to_json()) == opts


def test_sizer_converges_to_target_without_oscillation() -> None:
    opts = JobOptions(batch_size=1000, target_duration_ms=500)
    sizer = BatchSizer(size=1000)
    sizes = []
    for _ in range(40):  # the database takes 0.01 ms per row: 50k rows make 500 ms
        size = sizer.size
        sizes.append(sizer.observe(size, 0.01 * size, opts))
    assert 50_000 * 0.85 <= sizes[-1] <= 50_000 * 1.15
    assert sizes == sorted(sizes), "grows monotonically, never overshoots and comes back"
    fast = BatchSizer(size=1000)
    for _ in range(40):
        fast.observe(fast.size, 0.0001 * fast.size, opts)
    assert fast.size == opts.max_batch_size  # capped
    sizer = BatchSizer(size=1000)
    for _ in range(60):
        sizer.observe(sizer.size, 0.1 * sizer.size, opts)  # ideal: 5000 rows
    tail = []
    for _ in range(20):
        tail.append(sizer.observe(sizer.size, 0.1 * sizer.size, opts))
    assert len(set(tail)) == 1, "size keeps moving at steady state"
    assert 5000 * (1 - 0.2) <= tail[-1] <= 5000 * (1 + 0.2)


def test_sizer_ignores_one_slow_batch_and_shrinks_on_timeout() -> None:
    opts = JobOptions(batch_size=5000, target_duration_ms=500)
    sizer = BatchSizer(size=5000)
    for _ in range(10):
        sizer.observe(sizer.size, 0.1 * sizer.size, opts)
    steady = sizer.size
    after_spike = sizer.observe(sizer.size, 0.1 * sizer.size * 3, opts)  # one 3x slow batch
    assert after_spike >= steady * 0.5
    assert sizer.shrink(opts) == after_spike // 2
    assert BatchSizer(size=10).shrink(JobOptions(batch_size=10)) == 10  # bounded below


def test_blocked_sessions_over_budget_cap_the_batch_size() -> None:
    """Throughput under a latency bound: once a batch has blocked an application session,
    batches are held to the lock-wait budget in duration (a blocked session waits up to the
    whole batch): right after an overrun at most the rows that fit it, then the rows the
    measured per-row time fits in it; batches that block nobody do not climb back above it
    until QUIET_LIFT_MS of batch time has passed without a block; a budget of 0 turns it off."""
    opts = JobOptions(batch_size=40_000, target_duration_ms=500, lock_wait_budget_ms=100)
    sizer = BatchSizer(size=40_000)
    assert sizer.observe(40_000, 500, opts, LockWaits(0, 0.0)) == 40_000  # nobody blocked
    assert sizer.ceiling is None
    assert not sizer.held
    assert sizer.observe(40_000, 500, opts, LockWaits(1, 20.0)) == 8_000  # 500 ms > 100 ms
    assert sizer.held
    assert sizer.ceiling == 8_000
    # Held: the next batches fit the budget at the measured per-row time (0.0125 ms here,
    # then less), never the 500 ms target, blocked or not.
    for _ in range(40):
        size = sizer.observe(sizer.size, sizer.size * 0.01, opts, LockWaits())
        assert sizer.ms_per_row is not None
        assert size * sizer.ms_per_row <= 100.0 + 1e-6
    assert sizer.size == 9_999          # 100 ms at 0.01 ms a row, after smoothing
    # A long wait (the batch blocked by something else first) counts as it is.
    assert sizer.observe(9_999, 100, opts, LockWaits(1, 200.0)) == 4_999
    # At most a tenfold cut in one step.
    assert sizer.observe(4_999, 50_000, opts, LockWaits(1, 10.0)) == 499
    # A quiet minute of batch time (the application stopped writing here): the cap lifts.
    quiet = BatchSizer(size=8_000, ms_per_row=0.01, ceiling=8_000, held=True)
    for _ in range(749):
        quiet.observe(8_000, 80, opts, LockWaits())
    assert quiet.held
    quiet.observe(8_000, 80, opts, LockWaits())
    assert not quiet.held
    assert quiet.ceiling is None
    # Growing towards the target again, past the 10,000 rows the budget fits.
    assert quiet.observe(quiet.size, quiet.size * 0.01, opts, LockWaits()) > 10_000
    off = JobOptions(batch_size=40_000, target_duration_ms=500, lock_wait_budget_ms=0)
    capped = BatchSizer(size=40_000, ceiling=5_000, held=True)
    assert capped.clamp(opts) == 5_000
    capped.size = 40_000
    assert capped.clamp(off) == 40_000     # tuned to 0: the cap no longer holds
    assert capped.observe(40_000, 500, off, LockWaits(1, 10.0)) == 40_000
    assert capped.ceiling is None
    free = BatchSizer(size=40_000)
    assert free.observe(40_000, 500, off, LockWaits(5, 10_000.0)) == 40_000
    assert free.ceiling is None
    assert build_options(lock_wait_budget="50ms").lock_wait_budget_ms == 50.0
    assert JobOptions().lock_wait_budget_ms == 30.0
    with pytest.raises(InvalidOption):
        JobOptions(lock_wait_budget_ms=-1)


def test_a_rate_cap_keeps_batches_small_and_frequent() -> None:
    """--rate 200 with a 500 ms target: batches of at most 100 rows, whatever the database's
    speed and min_batch_size, so locks are brief and the cap holds over any minute."""
    opts = JobOptions(batch_size=1000, min_batch_size=500, target_duration_ms=500)
    sizer = BatchSizer(size=1000, rate=200)
    assert sizer.clamp(opts) == 100
    for _ in range(40):   # a fast database: without the cap this grows to max_batch_size
        assert sizer.observe(sizer.size, 0.0001 * sizer.size, opts) == 100
    slow = BatchSizer(size=1000, rate=5)
    assert slow.clamp(opts) == 2          # a low rate: tiny batches, 0.4 s apart
    assert slow.shrink(opts) == 1         # a timeout still halves it, to at least one row
    assert BatchSizer(size=50_000, rate=None).clamp(opts) == 50_000
    # Paced at the cap, the rows done in any 60 s window stay within 5 % of rate * 60.
    t, done = 0.0, []
    for _ in range(400):
        rows = sizer.size
        done.append((t, rows))
        t += 0.01 + rate_delay(rows, 0.01, 200)
    for start, _ in done:
        window = sum(r for at, r in done if start <= at < start + 60)
        assert window <= 200 * 60 * 1.05


def test_rate_delay_and_eta() -> None:
    assert rate_delay(1000, 0.1, None) == 0
    assert rate_delay(1000, 0.1, 1000) == pytest.approx(0.9)
    assert rate_delay(1000, 2.0, 1000) == 0
    assert eta_seconds(50, 100, 10) == 5
    assert eta_seconds(50, None, 10) is None


def test_state_machine() -> None:
    check_transition(1, JobState.PENDING, JobState.RUNNING)
    check_transition(1, JobState.RUNNING, JobState.THROTTLED)
    check_transition(1, JobState.FAILED, JobState.PENDING)
    with pytest.raises(IllegalTransition, match="already succeeded"):
        check_transition(1, JobState.SUCCEEDED, JobState.PAUSED)
    with pytest.raises(IllegalTransition):
        check_transition(1, JobState.PAUSED, JobState.RUNNING)
    assert not TRANSITIONS[JobState.CANCELLED]
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(
    ("types", "key"),
    [
        (("bigint",), (2**62,)),
        (("uuid",), (uuid.uuid4(),)),
        (("text",), ("é/'\"x",)),
        (("timestamp with time zone",), (dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),)),
        (("integer", "bigint"), (3, 4)),
        (("date", "numeric"), (dt.date(2024, 2, 29), decimal.Decimal("1.50"))),
    ],
)
def test_codec_roundtrip(types: tuple[str, ...], key: tuple[object, ...]) -> None:
    codec = KeyCodec(types)
    encoded = codec.encode(key)
    assert codec.decode(encoded) == key
    assert codec.encode(None) is None


def test_keyset_sql_is_row_comparison_for_composite_keys() -> None:
    ks = Keyset(sql.Identifier("public", "t"), ("a", "b"))
    text = ks.probe_query(lower=True).as_string(None)
    assert '("a", "b") > (%(lo0)s, %(lo1)s)' in text
    assert '("a", "b") <= (%(hi0)s, %(hi1)s)' in text
    assert "ORDER BY \"a\", \"b\" LIMIT 1 OFFSET %(offset)s" in text
    assert '"id"' in Keyset(sql.Identifier("t"), ("id",)).predicate(lower=False).as_string(None)


def test_parse_set() -> None:
    assert parse_set(["total = a * 2", '"Odd Col" = lower(x)']) == (
        ("total", "a * 2"), ("Odd Col", "lower(x)"))
    assert parse_set({"x": "1"}) == (("x", "1"),)
    for bad in (["nothing"], ["= 1"], ["a == 1"], ["a = 1", "a = 2"]):
        with pytest.raises(InvalidInput):
            parse_set(bad)


def test_spec_roundtrip_and_shape_checks() -> None:
    spec = update("users", {"a": "b + 1"}, where="b > 0", key="id", batch_size=10)
    assert JobSpec.from_json(spec.to_json()) == spec
    with pytest.raises(InvalidInput, match="predicate"):
        JobSpec("delete", "t")
    with pytest.raises(InvalidInput, match="kind"):
        JobSpec("truncate", "t")
    from backfill.job.spec import transform

    with pytest.raises(InvalidInput, match="lambda"):
        transform("t", lambda row: None, columns=["x"])


def test_redaction() -> None:
    assert "hunter2" not in redact_dsn("host=db user=u password=hunter2 dbname=x")
    assert "hunter2" not in redact_dsn("postgresql://u:hunter2@db:5432/x")
    assert "hunter2" not in redact_text("failed for postgresql://u:hunter2@db/x and password='hunter2'")


def test_retry_classification() -> None:
    assert classify(pgerrors.DeadlockDetected()) is Verdict.RETRY
    assert classify(pgerrors.SerializationFailure()) is Verdict.RETRY
    assert classify(pgerrors.LockNotAvailable()) is Verdict.RETRY
    assert classify(pgerrors.AdminShutdown()) is Verdict.RETRY
    assert classify(psycopg.OperationalError("connection lost")) is Verdict.RETRY
    assert classify(pgerrors.QueryCanceled()) is Verdict.SHRINK
    assert classify(pgerrors.UndefinedColumn()) is Verdict.FATAL
    assert classify(pgerrors.UniqueViolation()) is Verdict.FATAL
    assert classify(pgerrors.SyntaxError()) is Verdict.FATAL
    assert classify(ValueError("transform bug")) is Verdict.FATAL
