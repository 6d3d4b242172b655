#!/usr/bin/env bash
# Refresh requirements.lock: every transitive dependency of edgeline[all] (base, kafka, central,
# models, dev; not gpu, which a Jetson image brings itself) pinned for Python 3.11+ on any platform.
#   scripts/lock.sh                     # re-resolve what pyproject.toml asks for, keeping pins that still fit
#   scripts/lock.sh --upgrade           # move every pin to the newest release allowed
# Every install (scripts/demo.sh, scripts/test.sh, .ci/run, the Dockerfiles) uses the lock as pip
# constraints; tests/unit/test_lock.py fails when the lock and pyproject.toml disagree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV_VERSION=0.13.9
PYTHON=${PYTHON:-python3}

if [ -x .venv/bin/uv ]; then
    UV=.venv/bin/uv
elif command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=uv
else
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q "uv==$UV_VERSION"
    UV=.venv/bin/uv
fi

"$UV" pip compile pyproject.toml \
    --extra kafka --extra central --extra models --extra dev \
    --universal --python-version 3.11 \
    --custom-compile-command "scripts/lock.sh" \
    --output-file requirements.lock "$@"
