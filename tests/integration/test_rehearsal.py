"""Rehearsal on a clone (CREATE DATABASE … TEMPLATE): measured, verified, and the figures
kept on the original job for show, preflight and migration plans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from backfill import Backfill, update
from tests.conftest import _create_db, _db_dsn, _drop_db
from tests.integration.helpers import cli, make_counter_table, scalar

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def prod_and_clone(dsn: str, admin_dsn: str) -> Iterator[tuple[str, str, int]]:
    make_counter_table(dsn, 30_000)
    job = Backfill(dsn).enqueue(update("items", {"note": "'n' || id"}, batch_size=2000))
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    clone_name = _create_db(admin_dsn, str(dbname))   # no session may be open on dsn here
    try:
        yield dsn, _db_dsn(admin_dsn, clone_name), job.id
    finally:
        _drop_db(admin_dsn, clone_name)


def test_a_rehearsal_measures_on_the_clone_and_leaves_production_alone(
        prod_and_clone: tuple[str, str, int], tmp_path: Path) -> None:
    dsn, clone, job_id = prod_and_clone
    r = cli(dsn, "rehearse", str(job_id), "--on", clone, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["state"] == "succeeded"
    assert result["verified"] is True
    assert result["rows"] == 30_000
    assert result["wal_bytes_per_row"] > 0
    assert result["batches"] >= 2
    assert result["batch_ms_p95"] >= result["batch_ms_p50"] > 0
    assert scalar(clone, "SELECT count(*) FROM items WHERE note IS NULL") == 0
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 0
    assert Backfill(dsn).get(job_id).state == "pending"
    shown = cli(dsn, "show", str(job_id)).stdout
    assert "rehearsed 30,000 rows at" in shown
    assert "projected here" in shown
    checks = json.loads(cli(dsn, "preflight", str(job_id), "--json").stdout)["checks"]
    wal = next(c for c in checks if c["name"] == "table and WAL")
    details = wal["details"]
    # Both figures are shown and the larger counts; the rehearsal ran after a checkpoint on
    # the clone, so it wrote the full-page images a real run writes, as the sample did.
    assert details["rehearsed_wal_bytes_per_row"] == result["wal_bytes_per_row"]
    assert details["sampled_wal_bytes_per_row"] > 0
    assert details["wal_bytes_per_row"] == max(details["rehearsed_wal_bytes_per_row"],
                                               details["sampled_wal_bytes_per_row"])
    assert "the larger of a rolled-back sample batch" in wal["reason"]
    assert result["checkpointed"] is True
    ratio = details["rehearsed_wal_bytes_per_row"] / details["sampled_wal_bytes_per_row"]
    assert 0.5 < ratio < 2.0, details
    # A migration on the same table takes the rehearsed rate for its estimate.
    mig = tmp_path / "m.toml"
    mig.write_text('id = "m"\n[[operations]]\nop = "backfill"\ntable = "items"\n'
                   'set = { val = "val + 0" }\n')
    plan = json.loads(cli(dsn, "migrate", "plan", str(mig), "--json").stdout)
    assert plan["rows_per_s"]["public.items"]["basis"].startswith("rehearsed on")


def test_the_jobs_own_database_is_refused(prod_and_clone: tuple[str, str, int]) -> None:
    dsn, _, job_id = prod_and_clone
    r = cli(dsn, "rehearse", str(job_id), "--on", dsn)
    assert r.returncode == 2
    assert "names the job's own database" in r.stderr
    assert scalar(dsn, "SELECT count(*) FROM items WHERE note IS NOT NULL") == 0
