#!/usr/bin/env bash
# What tests/deploy needs besides Python packages: podman (with runc, see
# deploy/podman/containers.conf), mmdebstrap (the images' Debian base, built locally),
# podman-compose, and promtool (Debian's prometheus package). Installs only what is missing,
# as root with apt-get; elsewhere says in one line what the tests will skip (or fail on, in CI).
set -uo pipefail
want=()
command -v podman >/dev/null 2>&1 || want+=(podman)
command -v runc >/dev/null 2>&1 || want+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || want+=(mmdebstrap)
command -v podman-compose >/dev/null 2>&1 || want+=(podman-compose)
command -v promtool >/dev/null 2>&1 || want+=(prometheus)
# Debian's podman 4.3 networks through CNI: containers find each other by name (the compose
# file's `postgres`, `controller-1`…) only with the dnsname plugin, which podman does not pull in.
[ -x /usr/lib/cni/dnsname ] || want+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#want[@]} -eq 0 ]; then
  echo "deploy deps: podman, runc, mmdebstrap, podman-compose, promtool, CNI dnsname present"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "deploy deps: installing ${want[*]}"
  if ! { apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
         || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null; }; }; then
    echo "deploy deps: apt-get install ${want[*]} failed: tests/deploy will skip (fail with CI=true) what needs them"
  fi
else
  echo "deploy deps: ${want[*]} missing and not root (or no apt-get): tests/deploy will skip what needs them" \
       "(fail with CI=true); install with: sudo apt-get install -y ${want[*]}"
fi
exit 0
