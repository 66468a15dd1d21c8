#!/usr/bin/env bash
# Creates the Secret the manifests read (never committed, never in a manifest), with random
# values, in namespace ${NAMESPACE:-modelfleet}. Leaves an existing one alone.
#   keys: admin-token (management API), join-token (workers), db-password (PostgreSQL or Redis)
set -euo pipefail
ns=${NAMESPACE:-modelfleet}
kubectl=${KUBECTL:-kubectl}
if "$kubectl" -n "$ns" get secret modelfleet-secrets >/dev/null 2>&1; then
  echo "secret $ns/modelfleet-secrets exists; not touching it"; exit 0
fi
# Values go through files (mode 0600, removed at exit), never through a command line.
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
for key in admin-token join-token db-password; do
  (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$key")
done
"$kubectl" get namespace "$ns" >/dev/null 2>&1 || "$kubectl" create namespace "$ns"
"$kubectl" -n "$ns" create secret generic modelfleet-secrets \
  --from-file="$dir/admin-token" --from-file="$dir/join-token" --from-file="$dir/db-password"
echo "created secret $ns/modelfleet-secrets (read the admin token with:" \
  "kubectl -n $ns get secret modelfleet-secrets -o jsonpath='{.data.admin-token}' | base64 -d)"
