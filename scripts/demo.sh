#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run the all-in-one demo on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vmad demo "$@"
