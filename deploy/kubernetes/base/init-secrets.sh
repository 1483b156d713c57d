#!/usr/bin/env sh
# Make what the base's secretGenerator reads, in secrets/ beside this file:
# certificates from `vmad certs init` (the names the pods reach each other by) and the
# trainers' shared token. Agents' tokens are made per node by the pods' init step.
# Re-running keeps existing files; delete secrets/ to rotate everything.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
[ -f secrets/ca.pem ] || vmad certs init --dir secrets --days 365 \
  --host vmad-trainer \
  --host vmad-controller-0.vmad-controller.vmad.svc \
  --host localhost --host 127.0.0.1
[ -f secrets/trainer-token.env ] || \
  printf 'VMAD_TRAINER_TOKEN=%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
  > secrets/trainer-token.env
echo "secrets/ ready: kubectl apply -k $(pwd)"
