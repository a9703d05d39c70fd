"""The pre-flight gate: checks against a real server, a failing check blocks the first write,
a skip is recorded, and the workers' path pauses the job with the reasons."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import psycopg
import pytest

from backfill import Backfill, update
from backfill.core.errors import InvalidInput, PreflightFailed
from backfill.engine.runner import Runner
from backfill.job.states import JobState
from backfill.safety.preflight import PreflightConfig, first_write_gate
from tests.integration.helpers import cli, make_counter_table, scalar, wait_for

pytestmark = pytest.mark.timeout(180)


def _cli(dsn: str, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return cli(dsn, *args, env={"BACKFILL_PREFLIGHT_CONFIG": str(config)} if config else None)


def _config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "preflight.toml"
    p.write_text("[preflight]\n" + text)
    return p


def _checks(r: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(r.stdout)["checks"]}


def test_a_healthy_database_passes_and_nothing_is_written(dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 20_000)
    job = Backfill(dsn).enqueue(update("items", {"note": "'n' || id"}))
    before = scalar(dsn, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i")
    backup = tmp_path / "last-backup.sh"
    backup.write_text(f"#!/bin/sh\necho {dt.datetime.now(dt.UTC).isoformat()}\n")
    backup.chmod(0o755)
    r = _cli(dsn, "preflight", str(job.id), "--json",
             config=_config(tmp_path, f'backup_command = "{backup}"\n'))
    assert r.returncode == 0, r.stderr
    checks = _checks(r)
    assert {c["status"] for c in checks.values()} <= {"pass", "warn"}
    for name in ("table and WAL", "free disk", "replicas", "long transactions",
                 "invalid indexes", "backup", "timeouts"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["WAL archiving"]["status"] == "warn"          # archive_mode is off here
    assert checks["table and WAL"]["details"]["wal_bytes_per_row"] > 0
    assert scalar(dsn, "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM items i") == before
    assert Backfill(dsn).get(job.id).state == JobState.PENDING
    text = _cli(dsn, "preflight", str(job.id)).stdout
    assert "warn backup" in text
    assert "no backup_command configured" in text


def test_a_failing_check_blocks_the_first_write_and_a_skip_is_recorded(
        dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'n' || id"}))
    with psycopg.connect(dsn, autocommit=True) as c, pytest.raises(psycopg.errors.UniqueViolation):
        # val repeats: the build fails and leaves an INVALID index behind.
        c.execute("CREATE UNIQUE INDEX CONCURRENTLY items_broken ON items (val)")
    r = _cli(dsn, "run", str(job.id), "--no-progress")
    assert r.returncode == 1
    assert "did not pass pre-flight (paused, nothing was written)" in r.stderr
    assert "invalid indexes: items_broken" in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 0
    # The job says why it waits, where an operator looks.
    paused = bf.get(job.id)
    assert paused.state == JobState.PAUSED
    assert "pre-flight failed: invalid indexes: items_broken" in (paused.state_reason or "")
    for command in (("show", str(job.id)), ("list",)):
        shown = _cli(dsn, *command)
        assert "paused" in shown.stdout
        assert "pre-flight failed" in shown.stdout, shown.stdout
    r = _cli(dsn, "run", str(job.id), "--no-progress", "--skip-preflight")
    assert r.returncode == 0, r.stderr
    skipped = [e for e in bf.events(job.id) if e.kind == "preflight_skipped"]
    assert len(skipped) == 1
    assert skipped[0].actor == "tester"


def test_old_backup_long_transaction_and_little_disk_fail(dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 5_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "repeat('x', 200)"}))
    old = tmp_path / "old-backup.sh"
    old.write_text("#!/bin/sh\necho 1700000000\n")
    old.chmod(0o755)
    cfg = PreflightConfig.from_mapping({"backup_command": str(old),
                                        "disk_free_command": "echo 1000",
                                        "max_transaction_age": "1s"})
    holder = psycopg.connect(dsn)
    holder.execute("SELECT txid_current()")
    holder_pid = holder.info.backend_pid
    try:
        wait_for(lambda: scalar(dsn, "SELECT extract(epoch FROM now() - xact_start) > 1.1 "
                                "FROM pg_stat_activity WHERE pid = %s",
                                (holder_pid,)), timeout=10, what="an old transaction")
        checks = {c.name: c for c in bf.preflight(job.id, config=cfg)}
    finally:
        holder.rollback()
        holder.close()
    assert checks["backup"].status == "fail"
    assert "old" in checks["backup"].reason
    assert checks["long transactions"].status == "fail"
    assert f"pid {holder_pid}" in checks["long transactions"].reason
    assert checks["free disk"].status == "fail"
    failing = PreflightConfig.from_mapping({"backup_command": "false"})
    checks = {c.name: c for c in bf.preflight(job.id, config=failing)}
    assert checks["backup"].status == "fail"
    assert "exited 1" in checks["backup"].reason
    with pytest.raises(PreflightFailed):
        bf.run(job.id, preflight=cfg)


def test_on_the_workers_a_failing_preflight_pauses_the_job(dsn: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    make_counter_table(dsn, 2_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'n'"}), workers=True)
    monkeypatch.setenv("BACKFILL_PREFLIGHT_CONFIG",
                       str(_config(tmp_path, 'backup_command = "false"\n')))
    with pytest.raises(PreflightFailed):
        Runner(dsn, job.id, actor="reaper:test").start_distributed(
            gate=first_write_gate(dsn, "reaper:test"))
    paused = bf.get(job.id)
    assert paused.state == JobState.PAUSED
    assert "pre-flight failed: backup" in (paused.state_reason or "")


def test_a_job_paused_before_its_first_batch_is_still_checked(dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'n'"}))
    bf.pause(job.id)
    r = _cli(dsn, "run", str(job.id), "--no-progress",
             config=_config(tmp_path, 'backup_command = "false"\n'))
    assert r.returncode == 1
    assert "did not pass pre-flight" in r.stderr
    assert [e.kind for e in bf.events(job.id)].count("preflight") == 1


def test_a_job_that_failed_preflight_does_not_block_a_job_on_a_recreated_table(
        dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'n'"}))
    r = _cli(dsn, "run", str(job.id), "--no-progress",
             config=_config(tmp_path, 'backup_command = "false"\n'))
    assert r.returncode == 1
    assert bf.get(job.id).state == JobState.PAUSED
    # The same table still has its waiting job: a second one is refused, naming it.
    r = _cli(dsn, "enqueue", "-t", "items", "--set", "note = 'm'")
    assert r.returncode == 2
    assert f"job {job.id}" in r.stderr
    assert "paused" in r.stderr
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE items")
    make_counter_table(dsn, 1_000)
    # A recreated table of the same name is another table: the old job does not block it.
    r = _cli(dsn, "enqueue", "-t", "items", "--set", "note = 'm'", "--quiet")
    assert r.returncode == 0, r.stderr
    new = bf.run(int(r.stdout.strip()), skip_preflight=True)
    assert new.state == JobState.SUCCEEDED, new.state_reason
    # The old job cannot run on the new table.
    with pytest.raises(InvalidInput, match="dropped and recreated"):
        bf.run(job.id, skip_preflight=True)


def test_revert_takes_skip_preflight_as_its_refusal_offers(dsn: str, tmp_path: Path) -> None:
    make_counter_table(dsn, 1_000)
    bf = Backfill(dsn)
    job = bf.enqueue(update("items", {"note": "'n'"}))
    assert bf.run(job.id, skip_preflight=True).state == JobState.SUCCEEDED
    failing = _config(tmp_path, 'backup_command = "false"\n')
    r = _cli(dsn, "revert", str(job.id), "--no-progress", config=failing)
    assert r.returncode == 1
    assert "--skip-preflight overrides" in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 1_000
    revert_id = max(j.id for j in bf.list(include_finished=True))
    r = _cli(dsn, "run", str(revert_id), "--no-progress", config=failing)
    assert r.returncode == 1   # still refused without the skip
    bf.cancel(revert_id)
    r = _cli(dsn, "revert", str(job.id), "--no-progress", "--skip-preflight", config=failing)
    assert r.returncode == 0, r.stderr
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 0
