#!/usr/bin/env bash
# Run the README's one-box walkthrough against a Mosquitto of its own and write what each command
# printed into README.md (the same run as tests/e2e/test_readme.py). Needs scripts/test.sh's install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python -m tests.e2e.readme_walkthrough --update "$@"
