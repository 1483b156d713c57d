#!/usr/bin/env bash
# Regenerate the Python stubs for protos/vmad/v1/*.proto.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, in place)
# Run from anywhere; uses grpc_tools.protoc from the venv's python (or $PYTHON).
# Generated imports read `from vmad.v1 import x_pb2`; we rewrite them to
# `from vmad.protos.vmad.v1 import x_pb2` so the stubs import as `vmad.protos`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out/protos/vmad/v1"
cd "$root/protos"
"$python" -m grpc_tools.protoc -I . \
  --python_out="$out/protos" --grpc_python_out="$out/protos" \
  vmad/v1/*.proto
for f in "$out"/protos/vmad/v1/*_pb2*.py; do
  sed -i -E 's/^from vmad\.v1 import /from vmad.protos.vmad.v1 import /' "$f"
done
