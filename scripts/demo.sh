#!/usr/bin/env bash
# The newcomer's one command: a throwaway PostgreSQL, a demo table, one backfill job run to the end.
#
#   BACKFILL_DEMO_DIR  data directory of the throwaway server (default /tmp/backfill-demo-pg)
#   DEMO_ROWS          rows in demo_orders (default 2000000)
#   BACKFILL_DSN       use this database instead of starting a server (docker compose does);
#                      the demo then only drops and recreates its own table, demo_orders
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

DEMO_DIR="${BACKFILL_DEMO_DIR:-/tmp/backfill-demo-pg}"
DEMO_ROWS="${DEMO_ROWS:-2000000}"
DEMO_DB="backfill_demo"
SERVER_STARTED=0

stop_hint() {
    if [[ "$SERVER_STARTED" == 1 ]]; then
        printf '\nThe demo server is still running. Stop it with:\n' >&2
        printf '  cd %q && %q/python -m backfill_dev.localpg stop --dir %q\n' \
            "$PWD" "$VENV_BIN" "$DEMO_DIR" >&2
    fi
}
trap stop_hint EXIT

ensure_venv ""
start_local_server() {
step "PostgreSQL binaries"
ensure_postgres

step "starting a throwaway PostgreSQL in $DEMO_DIR"
ADMIN_DSN="$(python -m backfill_dev.localpg start --dir "$DEMO_DIR")"
SERVER_STARTED=1
echo "server: $ADMIN_DSN" >&2

step "creating database $DEMO_DB (fresh on every run)"
BACKFILL_DSN="$(python - "$ADMIN_DSN" "$DEMO_DB" <<'PY'
import sys

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

admin_dsn, dbname = sys.argv[1], sys.argv[2]
with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
print(make_conninfo(admin_dsn, dbname=dbname))
PY
)"
echo "BACKFILL_DSN=$BACKFILL_DSN" >&2

}

if [[ -n "${BACKFILL_DSN:-}" ]]; then
    step "waiting for the database in BACKFILL_DSN"
    python - <<'PY'
import os
import time

import psycopg

from backfill.core.db import redact_dsn

dsn = os.environ["BACKFILL_DSN"]
deadline = time.monotonic() + 60  # a database container may still be starting
while True:
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
        break
    except psycopg.OperationalError:
        if time.monotonic() > deadline:
            raise SystemExit(f"cannot connect to {redact_dsn(dsn)}") from None
        time.sleep(1)
print(f"database: {redact_dsn(dsn)}")
PY
else
    start_local_server
fi
export BACKFILL_DSN

step "backfill db upgrade"
backfill db upgrade

step "creating demo_orders with $DEMO_ROWS rows"
DEMO_ROWS="$DEMO_ROWS" python - <<'PY'
import os
import time

import psycopg

rows = int(os.environ["DEMO_ROWS"])
started = time.monotonic()
with psycopg.connect(os.environ["BACKFILL_DSN"], autocommit=True, connect_timeout=10) as conn:
    conn.execute("DROP TABLE IF EXISTS demo_orders")
    conn.execute(
        """
        CREATE TABLE demo_orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            quantity int NOT NULL,
            unit_price_cents int NOT NULL,
            total_cents bigint
        )
        """
    )
    conn.execute(
        """
        INSERT INTO demo_orders (quantity, unit_price_cents)
        SELECT 1 + i %% 7, 100 + i %% 1000 FROM generate_series(1, %s) AS i
        """,
        (rows,),
    )
    conn.execute("VACUUM ANALYZE demo_orders")
print(f"inserted {rows} rows in {time.monotonic() - started:.1f}s")
PY

step "backfill enqueue demo_fill_total"
JOB="$(backfill enqueue demo_fill_total --quiet)"
echo "job: $JOB" >&2

step "backfill run $JOB"
backfill run "$JOB"

step "backfill verify $JOB"
backfill verify "$JOB"

step "backfill show $JOB"
backfill show "$JOB"

# The workflow around backfills: a zero-downtime schema change, planned, expanded (with its
# own backfill), validated, then contracted behind the gate.
MIGRATION=examples/migrations/2026-11-26-orders-total.toml
if backfill migrate status "$MIGRATION" >/dev/null 2>&1; then
    # A database given in BACKFILL_DSN keeps its migrations from an earlier demo run.
    step "backfill migrate status $MIGRATION (ran before on this database)"
    backfill migrate status "$MIGRATION" --events 0
else
    step "backfill migrate plan $MIGRATION"
    backfill migrate plan "$MIGRATION"
    step "backfill migrate start $MIGRATION"
    backfill migrate start "$MIGRATION"
    step "backfill migrate complete $MIGRATION"
    backfill migrate complete "$MIGRATION"
    backfill migrate status "$MIGRATION" --events 0
fi

step "done"
echo "Explore further with: BACKFILL_DSN='$BACKFILL_DSN' $VENV_BIN/backfill --help" >&2
