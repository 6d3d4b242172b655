#!/usr/bin/env bash
# The suite against the newest releases that pyproject.toml allows, ignoring requirements.lock:
# drift is seen here before a user's unpinned `pip install edgeline` meets it. Not run by CI.
#   scripts/test-latest.sh                  # everything
#   scripts/test-latest.sh tests/unit -q    # arguments go to pytest
# Uses its own .venv-latest; services and Kafka jars come from scripts/install-test-deps.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

scripts/install-test-deps.sh
[ -x .venv-latest/bin/python ] || "$PYTHON" -m venv .venv-latest
.venv-latest/bin/python -m pip install -q --upgrade pip
.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[all]'

echo "[test-latest] versions that differ from requirements.lock:"
.venv-latest/bin/python - <<'PY'
import re
from importlib.metadata import distributions
from packaging.utils import canonicalize_name

locked = {}
for line in open("requirements.lock"):
    match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if match:
        locked.setdefault(canonicalize_name(match[1]), set()).add(match[2])
for dist in sorted(distributions(), key=lambda d: canonicalize_name(d.metadata["Name"])):
    name = canonicalize_name(dist.metadata["Name"])
    if name in locked and dist.version not in locked[name]:
        print(f"  {name}: {dist.version} (lock: {', '.join(sorted(locked[name]))})")
PY

rc=0
.venv-latest/bin/python -m pytest --durations=15 "$@" || rc=$?
printf '[test-latest] pytest exited with %d; total wall time %d s\n' "$rc" "$SECONDS"
exit "$rc"
