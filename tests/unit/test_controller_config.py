"""Controller configuration: the TOML file and command-line overrides, checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.control.controller import DEFAULT_LIMITS, ControllerConfig
from backfill.control.policy import Limit
from backfill.core.errors import InvalidOption

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_example_parses() -> None:
    cfg = ControllerConfig.from_file(ROOT / "deploy" / "controller.example.toml")
    limits = cfg.policy.limits
    assert limits["replica_lag"] == Limit(10, 3)
    assert limits["lock_waiters"] == Limit(5, 2.5)
    assert limits["slot_retained"] == Limit(10 * 2**30, 5 * 2**30)
    assert limits["long_transaction"] == Limit(600, 300)
    assert limits["probe:queue_depth"] == Limit(50, 10)
    assert cfg.policy.per_job["archive_old_orders"]["replica_lag"] == Limit(30, 15)
    assert cfg.policy.hold_s == 10
    assert cfg.poll_s == 1
    assert [p.name for p in cfg.probes] == ["queue_depth"]


def test_overrides_win_and_defaults_fill_in() -> None:
    cfg = ControllerConfig.from_mapping(
        {"limits": {"replica_lag": "4s"}},
        limits={"lock_waiters": "3"}, replicas={"r1": "host=db2 dbname=app"}, poll="250ms",
        rows_per_s=1000.0)
    assert cfg.policy.limits["replica_lag"] == Limit(4, 2)
    assert cfg.policy.limits["lock_waiters"] == Limit(3, 1.5)
    assert cfg.policy.limits["long_transaction"] == DEFAULT_LIMITS["long_transaction"]
    assert cfg.poll_s == 0.25
    assert cfg.rows_per_s == 1000
    assert cfg.replicas[0].name == "r1"
    assert "secret" not in repr(ControllerConfig.from_mapping(
        {}, replicas={"r": "host=x password=secret"}).replicas)


@pytest.mark.parametrize(("data", "message"), [
    ({"limits": {"replica_lagg": "1s"}}, "unknown signal 'replica_lagg'"),
    ({"limits": {"replica_lag": "soon"}}, "cannot parse duration"),
    ({"limits": {"replica_lag": {"throttle": "1s", "resume": "2s"}}}, "must not be above"),
    ({"limits": {"slot_retained": "lots"}}, "cannot parse size"),
    ({"limits": {"autovacuum": "yes"}}, "true or false"),
    ({"replicas": {"r1": "host=x port=notaport dbname"}}, "replica r1: malformed DSN"),
    ({"probes": {"q": {"sql": "SELECT 1"}}}, "needs `sql` and `max`"),
    ({"pol": "1s"}, "unknown controller settings: pol"),
    ({"poll": "0s"}, "more than 0s"),
    ({"resume_ratio": 2}, "more than 0 and at most 1"),
])
def test_bad_settings_are_refused_with_a_clear_error(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        ControllerConfig.from_mapping(data)


def test_a_turned_off_limit_still_serialises_and_resume_zero_is_refused() -> None:
    import json

    cfg = ControllerConfig.from_mapping({"limits": {"autovacuum": False}})
    json.dumps(cfg.to_json(), allow_nan=False)  # PostgreSQL's jsonb has no Infinity
    with pytest.raises(InvalidOption, match="resume_ratio must be more than 0"):
        ControllerConfig.from_mapping({"resume_ratio": 0})
    with pytest.raises(InvalidOption, match="resume threshold must be more than 0"):
        ControllerConfig.from_mapping({"limits": {"replica_lag": {"throttle": "2s",
                                                                  "resume": "0s"}}})
