#!/usr/bin/env bash
# Lint: ruff, then the import layers (pyproject.toml [tool.importlinter]) checked on the
# package as a wheel installs it (the editable install maps folders that grimp cannot walk).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
target="$(mktemp -d)"
trap 'rm -rf "$target"' EXIT
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --target "$target" . \
  >/dev/null 2>&1
(cd "$target" && PYTHONPATH="$target" "$OLDPWD/.venv/bin/lint-imports" --no-cache \
  "$OLDPWD/pyproject.toml")
