#!/usr/bin/env bash
# Writes .env next to compose.yaml with fresh random secrets (never overwrites one).
set -euo pipefail
cd "$(dirname "$0")"
if [ -e .env ]; then echo ".env exists; not touching it" >&2; exit 1; fi
rand() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
{
  echo "MODELFLEET_ADMIN_TOKEN=$(rand)"
  echo "MODELFLEET_JOIN_TOKEN=$(rand)"
  echo "POSTGRES_PASSWORD=$(rand)"
} > .env
echo "wrote $(pwd)/.env (mode 0600)"
