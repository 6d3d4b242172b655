#!/usr/bin/env bash
# Run the embedded demo: `scripts/demo.sh [edgeline demo options]`.
# Creates .venv and installs the package with the central extra (the operator console; no torch, no
# Kafka) on first use, at the versions of requirements.lock.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[demo] creating $ROOT/.venv" >&2
    "$PYTHON" -m venv "$ROOT/.venv" || { echo "[demo] python3 -m venv failed: install python3-venv" >&2; exit 1; }
fi

# Skip pip while pyproject.toml and the lock are unchanged since the last install (base or full).
hash=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum)
base=$( (echo "$hash"; echo demo) | sha256sum | cut -c1-16)
all=$( (echo "$hash"; echo all) | sha256sum | cut -c1-16)
if ! grep -qsx -e "$base" "$ROOT/.venv/.edgeline-install-base" && ! grep -qsx -e "$all" "$ROOT/.venv/.edgeline-install-all"; then
    echo "[demo] pip install -c requirements.lock -e $ROOT[central]" >&2
    "$ROOT/.venv/bin/python" -m pip install -q -c "$ROOT/requirements.lock" -e "$ROOT[central]"
    echo "$base" > "$ROOT/.venv/.edgeline-install-base"
fi

exec "$ROOT/.venv/bin/edgeline" demo "$@"
