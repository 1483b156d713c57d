#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
