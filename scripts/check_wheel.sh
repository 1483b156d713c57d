#!/usr/bin/env bash
# Build the wheel, install it the way an agent host does (base install: no PyTorch) in a
# fresh venv outside the checkout, and run every console command's --help there, plus
# `vmad validate` on every shipped config: what users install is what works.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$root/.venv/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" \
  "$root" >/dev/null 2>&1
wheel="$(ls "$work"/dist/vmad-*.whl)"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" "$wheel" 2>&1 \
  | grep -v "^WARNING: Location" || true
cd "$work"  # away from the checkout, so nothing imports from the source folders
vmad="$work/venv/bin/vmad"
"$work/venv/bin/python" - "$vmad" <<'PY'
import subprocess, sys
vmad = sys.argv[1]
from vmad.cli import build_parser
parser = build_parser()
commands = parser._subparsers._group_actions[0].choices
failed = []
def run(args):
    result = subprocess.run([vmad, *args, "--help"], capture_output=True, text=True)
    status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode})"
    print(f"{status:12s} vmad {' '.join(args)} --help")
    if result.returncode:
        failed.append(" ".join(args))
        print(result.stderr[-2000:])
run([])
for name, sub in sorted(commands.items()):
    run([name])
    for action in sub._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for child in sorted(action.choices):
                run([name, child])
import importlib.util
assert importlib.util.find_spec("torch") is None, "the base install pulled in torch"
sys.exit(1 if failed else 0)
PY
# Every shipped config, with each `${NAME}` it reads (secrets, the VM id) set as an
# operator would set it in the environment.
for name in $(grep -ho '\${[A-Z_0-9]*}' "$root"/deploy/*.yaml | tr -d '${}' | sort -u); do
  export "$name=check-value"
done
for config in "$root"/deploy/*.yaml; do
  "$vmad" validate "$config"
done
# The agent's out-of-box model is package data: it must load from the installed wheel.
"$work/venv/bin/python" -c "from vmad.bundle import load_default_bundle as load
print('default bundle ok:', load().metadata.version)"
echo "wheel ok: $(basename "$wheel")"
