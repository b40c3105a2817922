#!/usr/bin/env bash
# Installs podman and what it needs to build images as root with no registry access, writes
# its settings under .tools/podman, and builds the local Debian base image once (cached).
# Idempotent. Prints the two environment variables every podman call must carry.
# Usage: tests/charts/setup_podman.sh            (needs root and the Debian mirror)
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
tools="$repo_root/.tools/podman"
base_image="localhost/taskserver-debian-base:bookworm"
packages=(podman buildah runc fuse-overlayfs slirp4netns uidmap debootstrap netavark
          aardvark-dns containernetworking-plugins iptables catatonit)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$tools/graph" "$tools/run"
cat > "$tools/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$tools/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$tools/graph"
runroot = "$tools/run"
CONF
export CONTAINERS_CONF="$tools/containers.conf" CONTAINERS_STORAGE_CONF="$tools/storage.conf"

if ! podman image exists "$base_image"; then
    # The Debian mirror apt already uses (deb822 "URIs:" or one-line "deb URL" entries).
    mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?' | head -n 1 || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$tools/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv bookworm "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | podman import - "$base_image" >/dev/null
    rm -rf "$rootfs"
fi
echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
