#!/usr/bin/env bash
# Set up a virtual environment (if missing), lint, run the test suite, then check the
# wheel as users install it and the fast tests on the lowest declared versions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"
bash scripts/check_wheel.sh
bash scripts/test_min_versions.sh
