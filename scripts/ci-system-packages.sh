#!/usr/bin/env bash
# Debian packages some tests use: `prometheus` (promtool and the server, for
# tests/test_observability.py) and `chromium` (the fleet page screenshot test). CI runs
# as root on a fresh Debian machine; anywhere else (no apt, not root, no network) this
# says what it skipped and succeeds, and those tests skip themselves.
set -uo pipefail
PACKAGES=(prometheus chromium)
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages: ${PACKAGES[*]} already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "system packages: cannot install ${missing[*]} (needs apt-get as root); their tests skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if timeout 300 apt-get update -qq \
   && timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    echo "system packages: installed ${missing[*]}"
else
    echo "system packages: installing ${missing[*]} failed; their tests skip"
fi
exit 0
