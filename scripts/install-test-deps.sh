#!/usr/bin/env bash
# Install everything the test suite needs; safe to run again (it skips what is already there).
#
#   - Debian packages: mosquitto, mosquitto-clients (the compose healthcheck's mosquitto_sub),
#     prometheus, postgresql (central's registry on PostgreSQL), chromium and chromium-driver (the
#     operator console's browser tests, through Selenium), docker-compose (v1, for
#     `docker-compose config`), and a JRE / Maven only when java / mvn are missing;
#   - .venv with `pip install -c requirements.lock -e '.[all]'`: every version pinned by the lock
#     (scripts/lock.sh refreshes it); skipped while pyproject.toml and the lock are unchanged;
#   - the Apache Kafka 3.9.1 jars from Maven Central into
#     ${EDGELINE_CACHE:-$HOME/.cache/edgeline}/kafka-3.9.1/lib (deploy/kafka/pom.xml).
#
# Non-interactive; runs as root or through sudo. EDGELINE_FORCE_INSTALL=1 re-runs pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

say() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
KAFKA_VERSION=3.9.1
CACHE=${EDGELINE_CACHE:-$HOME/.cache/edgeline}
KAFKA_LIB=${EDGELINE_KAFKA_LIB:-$CACHE/kafka-$KAFKA_VERSION/lib}
PYTHON=${PYTHON:-python3}

# ---------------------------------------------------------------- Debian packages
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    if [ -t 0 ]; then SUDO=(sudo); else SUDO=(sudo -n); fi
else
    SUDO=(__no_sudo__)
fi

APT_UPDATED=0
apt_install() {  # apt_install PACKAGE... (only when apt-get exists; updates the index once)
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get here; please install: $*"
        return 1
    fi
    if [ "${SUDO[0]:-}" = "__no_sudo__" ]; then
        say "not root and no sudo; please install: $*"
        return 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        "${SUDO[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

apt_has_candidate() {  # whether the package can be installed from the configured sources
    command -v apt-cache >/dev/null 2>&1 || return 1
    local candidate
    candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_kafka_jars() { compgen -G "$KAFKA_LIB/kafka_2.13-*.jar" >/dev/null; }

missing=()
have_mosquitto || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v prometheus >/dev/null 2>&1 || command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if ! have_kafka_jars && ! command -v mvn >/dev/null 2>&1; then missing+=(maven); fi
if ! command -v docker-compose >/dev/null 2>&1; then
    # Compose v1 (pure Python): `docker-compose config` validates the compose file without an engine.
    if apt_has_candidate docker-compose; then missing+=(docker-compose); fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}" || say "WARNING: could not install ${missing[*]}; tests that need them will skip (or fail under EDGELINE_REQUIRE_SERVICES=1)"
else
    say "system packages present (mosquitto, mosquitto-clients, postgresql, prometheus, java, chromium$(command -v docker-compose >/dev/null 2>&1 && echo ', docker-compose'))"
fi

# ---------------------------------------------------------------- Python
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PYTHON"
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        apt_install "python${pyver}-venv" || apt_install python3-venv || die "cannot create a virtual environment (install python3-venv)"
        "$PYTHON" -m venv .venv || die "python3 -m venv failed"
    fi
fi

stamp=.venv/.edgeline-install-all
want=$( (cat pyproject.toml requirements.lock | sha256sum; echo all) | sha256sum | cut -c1-16)  # demo.sh reads the same stamp
if [ "${EDGELINE_FORCE_INSTALL:-0}" != "1" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "python packages up to date (.[all] from requirements.lock, unchanged)"
else
    say "pip install -c requirements.lock -e '.[all]' (torch comes from pip's cache when present)"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -c requirements.lock -e '.[all]'
    echo "$want" > "$stamp"
fi

# ---------------------------------------------------------------- Kafka jars
if have_kafka_jars; then
    say "Kafka $KAFKA_VERSION jars present in $KAFKA_LIB"
else
    command -v mvn >/dev/null 2>&1 || die "mvn is needed to fetch the Kafka jars (apt-get install maven)"
    say "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIB"
    mkdir -p "$(dirname "$KAFKA_LIB")"
    tmp=$(mktemp -d "$(dirname "$KAFKA_LIB")/lib.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mvn -q -B -Dstyle.color=never -f "$ROOT/deploy/kafka/pom.xml" dependency:copy-dependencies -DoutputDirectory="$tmp"
    rm -rf "$KAFKA_LIB"
    mv "$tmp" "$KAFKA_LIB"   # all or nothing: a half-done download never looks complete
    trap - EXIT
    say "$(ls "$KAFKA_LIB" | wc -l) jars in $KAFKA_LIB"
fi

say "done"
