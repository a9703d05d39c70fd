#!/bin/bash
# Let the replica service stream from this primary (pg_basebackup, then WAL).
set -euo pipefail
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
