#!/usr/bin/env bash
# Install the lowest declared versions (constraints-min.txt) into .venv-min and run the
# fast tests there: a floor in pyproject.toml that does not really work fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv-min/bin/python ] || "$PYTHON" -m venv .venv-min
.venv-min/bin/python -m pip install --quiet --upgrade pip
.venv-min/bin/python -m pip install --quiet torch==2.13.0
.venv-min/bin/python -m pip install --quiet -c constraints-min.txt -e '.[train,dev]'
.venv-min/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not integration" "$@"
