#!/usr/bin/env sh
# Install vmad for systemd from a checkout, as root:
#   deploy/systemd/install.sh agent|trainer|controller [...]
# Makes a virtual environment in /opt/vmad (the units' ExecStart is /opt/vmad/bin/vmad),
# the `vmad` user (sysusers.d), the docs the units' Documentation= names, and the units.
# Configs stay yours: put them in /etc/vmad/ (deploy/*.yaml document every key) and
# check them with `/opt/vmad/bin/vmad validate /etc/vmad/*.yaml`.
set -eu
[ "$#" -gt 0 ] || { echo "usage: $0 agent|trainer|controller [...]" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PREFIX="${PREFIX:-/opt/vmad}"
PYTHON="${PYTHON:-python3}"
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
extras=""
for role in "$@"; do
    case "$role" in
        agent) ;;
        trainer|controller) extras="[train]" ;;
        *) echo "unknown role: $role" >&2; exit 2 ;;
    esac
done
if [ -n "$extras" ]; then
    # The CPU wheel: the default index pulls a multi-GB CUDA build.
    "$PREFIX/bin/pip" install --quiet --index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0
fi
"$PREFIX/bin/pip" install --quiet "$repo$extras"
install -d -m 0755 "$PREFIX/share/doc/vmad"
install -m 0644 "$repo"/docs/*.md "$PREFIX/share/doc/vmad/"
install -D -m 0644 "$here/vmad.sysusers.conf" /usr/lib/sysusers.d/vmad.conf
systemd-sysusers /usr/lib/sysusers.d/vmad.conf
install -d -m 0750 -o root -g vmad /etc/vmad
for role in "$@"; do
    install -m 0644 "$here/vmad-$role.service" /etc/systemd/system/
done
systemctl daemon-reload
echo "installed $*; next: configs in /etc/vmad/, then systemctl enable --now vmad-<role>"
