#!/usr/bin/env bash
# Build the agent and server images (Dockerfile) when a container builder works here;
# otherwise say so and succeed: CI machines without docker/podman skip this step.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${VMAD_IMAGE_TAG:-0.1.0}"
for builder in docker podman; do
    if command -v "$builder" >/dev/null && timeout 20 "$builder" info >/dev/null 2>&1; then
        "$builder" build --target agent -t "vmad-agent:$TAG" .
        "$builder" build --target server -t "vmad-server:$TAG" .
        # The agent image must stay free of PyTorch.
        "$builder" run --rm --entrypoint python "vmad-agent:$TAG" -c \
            "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
        echo "built vmad-agent:$TAG and vmad-server:$TAG with $builder"
        exit 0
    fi
done
echo "build-images: no working docker or podman here; skipped"
