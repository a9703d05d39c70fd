"""Migration files: shape errors before any database is involved; names within limits."""

from __future__ import annotations

import pytest

from backfill.core.errors import InvalidInput, InvalidOption
from backfill.migrate.file import parse
from backfill.migrate.operations.base import object_name
from backfill.migrate.steps import OpPlan, Step, ordered_steps


def test_a_minimal_file_parses_with_default_settings() -> None:
    m = parse('id = "a-1"\n[[operations]]\nop = "drop_table"\ntable = "t"\n')
    assert m.id == "a-1"
    assert m.settings.lock_timeout_ms == 2000
    assert m.settings.lock_retries == 30
    assert len(m.checksum) == 16


def test_the_checksum_follows_the_content_not_the_layout() -> None:
    a = parse('id = "a"\n[[operations]]\nop = "drop_table"\ntable = "t"\n')
    b = parse('# a comment\nid   =   "a"\n\n[[operations]]\ntable = "t"\nop = "drop_table"\n')
    c = parse('id = "a"\n[[operations]]\nop = "drop_table"\ntable = "u"\n')
    assert a.checksum == b.checksum != c.checksum


@pytest.mark.parametrize(("text", "message"), [
    ('[[operations]]\nop = "drop_table"\n', "`id` must be"),
    ('id = "a"\n', "at least one [[operations]]"),
    ('id = "a"\nops = 1\n[[operations]]\nop = "drop_table"\n', "unknown key(s) ops"),
    ('id = "a"\n[[operations]]\nop = "nope"\n', "unknown op 'nope'"),
    ('id = "a"\ndepends_on = "b"\n[[operations]]\nop = "drop_table"\n', "depends_on must be"),
    ('id = "a"\nsettings = 3\n[[operations]]\nop = "drop_table"\n', "[settings] must be a table"),
    ('id = "a"\n[settings]\nlock_timeout = "soon"\n[[operations]]\nop = "drop_table"\n',
     "cannot parse duration"),
    ('id = "a"\n[settings]\nlock_retries = -1\n[[operations]]\nop = "drop_table"\n',
     "lock_retries must be"),
    ('id = "a"\n[settings]\nlock_wait = "1s"\n[[operations]]\nop = "drop_table"\n',
     "unknown setting(s) lock_wait"),
    ('id = "a"\n[settings]\nlock_timeout = 0\n[[operations]]\nop = "drop_table"\n',
     "lock_timeout must be > 0"),
])
def test_malformed_files_are_refused_with_what_to_fix(text: str, message: str) -> None:
    with pytest.raises((InvalidInput, InvalidOption)) as info:
        parse(text, "m.toml")
    assert message in str(info.value)


def test_object_names_fit_postgres_limit_and_stay_distinct() -> None:
    assert object_name("nn", "users", "email") == "bf_nn_users_email"
    long_a = object_name("sync", "t" * 60, "column_a")
    long_b = object_name("sync", "t" * 60, "column_b")
    assert len(long_a) <= 63
    assert len(long_b) <= 63
    assert long_a != long_b
    assert object_name("x", "Weird Name!").startswith("bf_x_weirdname_")
    assert object_name("idx", "Orders") != object_name("idx", "orders") == "bf_idx_orders"


def _step(phase: str, op: int, mode: str, d: str) -> Step:
    return Step(phase=phase, op=op, description=d, mode=mode)


def test_start_runs_ddl_then_backfills_then_checks_and_rollback_runs_in_reverse() -> None:
    plans = [
        OpPlan(0, "a", "a", (_step("start", 0, "tx", "a1"), _step("start", 0, "backfill", "a2"),
                             _step("start", 0, "check", "a3"), _step("rollback", 0, "tx", "ra1"),
                             _step("rollback", 0, "tx", "ra2"), _step("complete", 0, "tx", "ca"))),
        OpPlan(1, "b", "b", (_step("start", 1, "concurrent", "b1"),
                             _step("start", 1, "check", "b2"), _step("rollback", 1, "tx", "rb"),
                             _step("complete", 1, "tx", "cb"))),
    ]
    steps = ordered_steps(plans)
    assert [s.description for s in steps["start"]] == ["a1", "b1", "a2", "a3", "b2"]
    assert [s.description for s in steps["complete"]] == ["ca", "cb"]
    assert [s.description for s in steps["rollback"]] == ["rb", "ra2", "ra1"]


def test_a_step_survives_its_json_round_trip() -> None:
    s = Step(phase="start", op=2, description="d", mode="concurrent", statements=("SELECT 1",),
             lock="l", duration="build", risk="medium", table="public.t", index="public.i",
             job={"kind": "update"}, note="n")
    assert Step.from_json(s.to_json()) == s


def test_the_version_schema_is_named_after_the_migration_within_63_bytes() -> None:
    from backfill.migrate.plan import version_schema

    assert version_schema("2026-11-26-users-split") == "bf_v_2026_11_26_users_split"
    assert version_schema("Users.Split") == "bf_v_users_split"
    long = version_schema("x" * 100)
    assert len(long) == 63
    assert long != version_schema("x" * 99)


def test_the_file_format_names_exactly_the_operations_there_are() -> None:
    from backfill.migrate.file import OPERATION_NAMES
    from backfill.migrate.operations import OPERATIONS

    assert list(OPERATION_NAMES) == list(OPERATIONS)
