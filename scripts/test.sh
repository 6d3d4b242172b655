#!/usr/bin/env bash
# Install the test dependencies (idempotent), then run pytest from the repository root.
#   scripts/test.sh                      # everything
#   scripts/test.sh -q                   # everything, quieter (what .ci/run does)
#   scripts/test.sh tests/unit -q        # arguments go to pytest
#
# With no arguments but output flags (-q, -v, -x, -ra, --tb=..., --durations=...), the suite runs
# as two pytest processes side by side: tests/unit in one, and tests/integration with tests/e2e
# (brokers, workers, whole processes) one after another in the other. The unit tests are mostly
# CPU, the others mostly waiting on services, so the suite takes about two thirds of its serial
# time on 2 cores. EDGELINE_TEST_PROCESSES=1 runs it as one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-test-deps.sh

only_output_flags() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            -q|-qq|-v|-vv|-x|-ra|-rA|--tb=*|--durations=*) ;;
            *) return 1 ;;
        esac
    done
}

pytest=(.venv/bin/python -m pytest --durations=15)
rc=0
if [ "${EDGELINE_TEST_PROCESSES:-2}" -gt 1 ] && only_output_flags "$@"; then
    unit_log=$(mktemp -t edgeline-unit-tests.XXXXXX)
    "${pytest[@]}" "$@" tests/unit >"$unit_log" 2>&1 &
    unit_pid=$!
    printf '[test] tests/unit runs beside the service tests (its output follows theirs)\n'
    services_rc=0
    "${pytest[@]}" "$@" tests/integration tests/e2e || services_rc=$?
    unit_rc=0
    wait "$unit_pid" || unit_rc=$?
    printf '\n[test] ---- tests/unit ----\n'
    cat "$unit_log"
    rm -f "$unit_log"
    printf '[test] tests/unit exited with %d, tests/integration + tests/e2e with %d\n' "$unit_rc" "$services_rc"
    rc=$(( unit_rc != 0 ? unit_rc : services_rc ))
else
    "${pytest[@]}" "$@" || rc=$?
fi
printf '[test] pytest exited with %d; total wall time %d s\n' "$rc" "$SECONDS"
exit "$rc"
