#!/usr/bin/env bash
# Lint, type-check and test. Extra arguments go to pytest, e.g. scripts/test.sh -k keyset -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

ensure_venv test
step "PostgreSQL binaries"
ensure_postgres
step "Redis server (for the Celery worker tests)"
ensure_redis
step "Prometheus and promtool (for the rule and scrape tests)"
ensure_prometheus
export BACKFILL_REQUIRE_PG=1

step "ruff check"
ruff check backfill workers jobs tests bench examples

step "mypy"
mypy

step "pytest"
pytest -q "$@"
