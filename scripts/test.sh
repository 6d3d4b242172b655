#!/usr/bin/env bash
# Install the test dependencies (idempotent), then run pytest from the repository root.
#   scripts/test.sh                      # everything
#   scripts/test.sh tests/unit -q        # arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-test-deps.sh

rc=0
.venv/bin/python -m pytest --durations=15 "$@" || rc=$?
printf '[test] pytest exited with %d; total wall time %d s\n' "$rc" "$SECONDS"
exit "$rc"
