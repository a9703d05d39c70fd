"""scripts/test.sh's rule for servers it could not install: fail, unless it named them."""

from __future__ import annotations

import pytest

from tests.conftest import missing_tool


def test_a_missing_server_fails_under_the_test_script_unless_it_could_not_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_REQUIRE_PG", "1")
    monkeypatch.setenv("BACKFILL_SKIP_MISSING", "mariadb prometheus")
    with pytest.raises(pytest.fail.Exception, match="redis-server is not installed"):
        missing_tool("redis", "redis-server is not installed")
    with pytest.raises(pytest.skip.Exception, match="promtool"):
        missing_tool("prometheus", "promtool is not installed")
    monkeypatch.setenv("BACKFILL_SKIP_MISSING", "")
    with pytest.raises(pytest.fail.Exception):
        missing_tool("prometheus", "promtool is not installed")
    monkeypatch.delenv("BACKFILL_REQUIRE_PG")
    with pytest.raises(pytest.skip.Exception):  # plain pytest, outside the script
        missing_tool("redis", "redis-server is not installed")
