#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"
