"""A real Prometheus scraping the exporter, loading the shipped rules, firing an alert."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from backfill import Backfill, JobState, update
from backfill.observe.metrics import serve
from tests.conftest import missing_tool
from tests.integration.helpers import ROOT, make_counter_table, wait_for
from tests.integration.servers import free_port


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def test_prometheus_scrapes_the_exporter_and_a_failed_job_fires(dsn: str,
                                                                 tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        missing_tool("prometheus", "prometheus is not installed (apt-get install -y prometheus)")
    make_counter_table(dsn, 2_000)
    bf = Backfill(dsn)
    done = bf.enqueue(update("items", {"counter": "counter + 1"}, batch_size=500))
    assert bf.run(done.id).state == JobState.SUCCEEDED
    bad = bf.enqueue(update("items", {"val": "val / (val - val)"}, max_retries=0))
    assert bf.run(bad.id).state == JobState.FAILED

    exporter_port, prom_port = free_port(), free_port()
    server, _ = serve(dsn, port=exporter_port, addr="127.0.0.1")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ROOT / 'deploy' / 'prometheus' / 'rules.yml'}\n"
        "scrape_configs:\n  - job_name: backfill\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        def firing() -> list[dict[str, Any]]:
            alerts = _get(f"{api}/alerts")
            if not alerts:
                return []
            return [a for a in alerts["data"]["alerts"]
                    if a["labels"].get("alertname") == "BackfillJobFailed"
                    and a["state"] == "firing"]

        alerts = wait_for(firing, timeout=90, interval=0.5, what="BackfillJobFailed to fire")
        assert [a["labels"]["job_id"] for a in alerts] == [str(bad.id)]
        rows = _get(f"{api}/query?query=backfill_job_rows_done_total")
        by_job = {r["metric"]["job_id"]: float(r["value"][1]) for r in rows["data"]["result"]}
        assert by_job[str(done.id)] == 2_000
        target = _get(f"{api}/targets")["data"]["activeTargets"][0]
        assert target["health"] == "up", target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        server.shutdown()
