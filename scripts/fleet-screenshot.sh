#!/usr/bin/env bash
# Screenshot the controller's fleet page during `vmad demo` (docs/operations.md):
#   bash scripts/fleet-screenshot.sh [OUT.png] [SECONDS_INTO_THE_DEMO]
# Needs Debian's `chromium`. The demo runs in the background and is stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/img/fleet-page.png}"
AFTER="${2:-60}"
VMAD="${VMAD:-.venv/bin/vmad}"
work="$(mktemp -d)"
"$VMAD" demo --seconds 100 --keep "$work/demo" > "$work/demo.out" 2>&1 &
demo=$!
# SIGINT, not SIGTERM: the demo stops the processes it started when interrupted.
trap 'kill -INT "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true; rm -rf "$work"' EXIT
url=""
for _ in $(seq 120); do
    url="$(grep -o 'fleet page: http://[0-9.:]*/' "$work/demo.out" | cut -d' ' -f3 || true)"
    [ -n "$url" ] && break
    sleep 1
done
[ -n "$url" ] || { cat "$work/demo.out"; echo "the demo never printed its fleet page"; exit 1; }
echo "fleet page at $url; screenshot in ${AFTER} s"
sleep "$AFTER"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --hide-scrollbars --window-size=1500,900 \
    --screenshot="$OUT" "$url" 2>/dev/null
echo "wrote $OUT; waiting for the demo to finish"
wait "$demo" || true
