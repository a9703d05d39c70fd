"""The files in deploy/ and docker-compose.yml: rules tested with promtool, the dashboard and
the compose file checked for what would break them at `docker compose up`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import missing_tool

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_tool("prometheus", "promtool is not installed (apt-get install -y prometheus)")
    return found


def test_rules_pass_promtool_check() -> None:
    res = subprocess.run([_promtool(), "check", "rules", str(PROM / "rules.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_pass_their_unit_tests() -> None:
    res = subprocess.run([_promtool(), "test", "rules", "tests.yml"], cwd=PROM,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_tested_and_has_a_runbook_entry() -> None:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    tests = (PROM / "tests.yml").read_text()
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 6
    base = _runbook_base()
    for rule in alerts:
        name = rule["alert"]
        assert f"alertname: {name}" in tests, f"{name} has no promtool test"
        assert f"## {name}" in runbook, name
        # One configurable base for every alert (set-runbook-base.sh), absolute.
        assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}", name
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_every_join_keeps_the_instance() -> None:
    """One Prometheus watches one exporter per database: a join, an aggregation or an
    absent() that drops `instance` mixes databases up (a job on B judged by A's controller)."""
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            name = rule.get("alert") or rule.get("record")
            for labels in re.findall(r"\b(?:on|by)\s*\(([^)]*)\)", expr):
                assert "instance" in [x.strip() for x in labels.split(",")], (name, expr)
            # An aggregation keeps labels only with a `by` (written before its argument).
            assert not re.search(r"\b(?:sum|max|min|count|avg)\s*\(", expr), (name, expr)
            if name != "BackfillExporterDown":  # absent(up): no target at all, on purpose
                assert "absent(" not in expr, (name, expr)
            assert "ignoring" not in expr, (name, expr)
    tests = yaml.safe_load((PROM / "tests.yml").read_text())
    for alert in ("BackfillJobStalled", "BackfillControllerDown", "BackfillReplicaLagHigh"):
        instances = {m for t in tests["tests"]
                     if any(a["alertname"] == alert for a in t.get("alert_rule_test", []))
                     for series in t["input_series"]
                     for m in re.findall(r'instance="([^"]+)"', series["series"])}
        assert len(instances) >= 2, f"{alert} is not tested with several databases"


def _runbook_base() -> str:
    found = re.findall(r"^# runbook base: (\S+)$", (PROM / "rules.yml").read_text(), re.M)
    assert len(found) == 1, "rules.yml declares its runbook base once"
    assert found[0].startswith(("https://", "http://")), found[0]
    return found[0]


def test_the_runbook_base_is_one_setting(tmp_path: Path) -> None:
    """set-runbook-base.sh moves every runbook_url (rules and their tests) to a new base."""
    for name in ("rules.yml", "tests.yml", "set-runbook-base.sh"):
        shutil.copy2(PROM / name, tmp_path / name)
    res = subprocess.run(["sh", str(tmp_path / "set-runbook-base.sh"),
                          "https://wiki.example.org/ops/backfill"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    rules = (tmp_path / "rules.yml").read_text()
    assert _runbook_base() not in rules + (tmp_path / "tests.yml").read_text()
    urls = re.findall(r'runbook_url: "([^"]+)"', rules)
    assert urls
    assert all(u.startswith("https://wiki.example.org/ops/backfill#") for u in urls)
    res = subprocess.run([_promtool(), "test", "rules", "tests.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_dashboard_is_valid_and_queries_something() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "backfill.json").read_text())
    assert dash["uid"] == "backfill"
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Progress", "Rows per second", "ETA", "Batch duration p50 / p95",
                   "Throttled jobs and why", "Replica lag", "Lock waiters on job tables"):
        assert wanted in titles
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"])


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_is_consistent() -> None:
    compose = _compose()
    services = compose["services"]
    for wanted in ("primary", "replica", "redis", "worker", "controller", "exporter",
                   "prometheus", "grafana"):
        assert wanted in services, wanted
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose.get("volumes", {}), f"{name}: undeclared volume {src}"
        if name not in ("primary", "replica", "redis", "prometheus", "grafana"):
            assert svc.get("build") == ".", name
        probe = svc.get("healthcheck")
        conditions = [d.get("condition") for d in svc.get("depends_on", {}).values()]
        assert probe or name not in {d for s in services.values()
                                     for d, c in s.get("depends_on", {}).items()
                                     if c.get("condition") == "service_healthy"}, name
        assert all(c in ("service_healthy", "service_completed_successfully",
                         "service_started") for c in conditions), name
    ports = [_host_port(p) for svc in services.values() for p in svc.get("ports", [])]
    assert len({v for v, _ in ports}) == len(ports), "two services share a port variable"
    assert len({d for _, d in ports}) == len(ports), "two services publish the same port"
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["exporter:9187"]
    assert "9187" in services["exporter"]["command"]


#: Host ports: 127.0.0.1, then a variable with today's port as its default, then the container's.
_PORT = re.compile(r"127\.0\.0\.1:\$\{(BACKFILL_[A-Z]+_PORT):-(\d+)\}:(\d+)")


def _host_port(mapping: str) -> tuple[str, int]:
    found = _PORT.fullmatch(mapping)
    assert found, f"{mapping}: publish as 127.0.0.1:${{BACKFILL_..._PORT:-N}}:M"
    return found[1], int(found[2])


def test_compose_host_ports_come_from_the_environment_with_the_usual_defaults() -> None:
    services = _compose()["services"]
    published = {name: [_host_port(p) for p in svc.get("ports", [])]
                 for name, svc in services.items() if svc.get("ports")}
    assert published == {
        "primary": [("BACKFILL_PG_PORT", 5432)],
        "replica": [("BACKFILL_REPLICA_PORT", 5433)],
        "exporter": [("BACKFILL_EXPORTER_PORT", 9187)],
        "prometheus": [("BACKFILL_PROMETHEUS_PORT", 9090)],
        "grafana": [("BACKFILL_GRAFANA_PORT", 3000)],
    }
    header = (ROOT / "docker-compose.yml").read_text().split("services:", 1)[0]
    for ports in published.values():
        for var, default in ports:
            assert f"{var} ({default})" in header, f"the header comment lists {var}"


def test_long_running_backfill_services_restart() -> None:
    services = _compose()["services"]
    for name in ("worker", "controller", "exporter"):
        assert services[name].get("restart") == "unless-stopped", name
    # One-shot services must not loop once they succeeded.
    assert services["migrate"].get("restart") == "on-failure"
    assert "restart" not in services["backfill"], "`docker compose run --rm backfill` is one-shot"


def test_the_replica_streams_through_a_physical_slot() -> None:
    services = _compose()["services"]
    primary = " ".join(services["primary"]["command"])
    assert "max_slot_wal_keep_size=" in primary, "a vanished replica must not fill the disk"
    script = "\n".join(services["replica"]["command"])
    assert "pg_create_physical_replication_slot('replica')" in script
    assert "WHERE NOT EXISTS" in script, "creating the slot must be idempotent (restarts)"
    basebackup = next(line for line in script.splitlines() if "pg_basebackup" in line)
    assert " -S replica" in basebackup
    assert " -R" in basebackup
    assert "primary_slot_name = 'replica'" in script
    assert script.index("pg_create_physical_replication_slot") < script.index("pg_basebackup")


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_image_installs_like_a_user_and_holds_what_the_demo_reads() -> None:
    from tests.integration.servers import PACKAGE_FILES
    from tests.integration.test_plain_install import DEMO_FILES

    steps = _dockerfile()
    [install] = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "pip install" in args]
    pip = steps[install][1]
    assert " -e " not in pip, pip
    assert "--editable" not in pip, pip
    assert "[" not in pip, f"no extras: the image runs what `pip install .` brings ({pip})"
    copied_before = {src for op, args in steps[:install] if op == "COPY"
                     for src in args.split()[:-1]}
    assert copied_before == set(PACKAGE_FILES), "the image installs what the smoke test installs"
    copied_after = {src.rstrip("/") for op, args in steps[install:] if op == "COPY"
                    for src in args.split()[:-1]}
    assert set(DEMO_FILES) <= copied_after
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "BACKFILL_USE_INSTALLED=1" in env, "demo.sh must use the installed package"
    # Everything the demo opens from the repository is in a directory the image copies.
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    for path in set(re.findall(r"\b(?:examples|scripts)/[\w./-]+\.\w+", demo)):
        assert (ROOT / path).exists(), path
        assert path.split("/", 1)[0] in copied_after, path
    demo_service = _compose()["services"]["demo"]
    assert demo_service["entrypoint"] == ["bash", "scripts/demo.sh"]
    assert "VENV_DIR" not in demo_service.get("environment", {})
