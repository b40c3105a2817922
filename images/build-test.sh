#!/usr/bin/env bash
# Builds both images with podman from a local Debian base (no registry pulls) and runs the
# `encode` flow INSIDE the CPU image against a Prefect server on the host's loopback.
# Needs root, the Debian mirror and PyPI. The GPU image is built with the CPU torch wheel
# (TORCH_INDEX_URL empty), so no CUDA torch is downloaded here.
# Usage: images/build-test.sh [cpu|gpu|all|cpu-image]   (default all; prints timings)
#   cpu-image: only build the CPU image, and only if it is missing (the chart's podman test).
# One build at a time: the image tests and the chart's podman test may ask at once (two pytest
# processes); the second waits on the lock, then finds its layers cached.
set -euo pipefail
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo_root"
which="${1:-all}"
eval "$(tests/charts/setup_podman.sh)"
base="localhost/taskserver-debian-base:bookworm"
port="${TASKSERVER_TEST_PORT:-4297}"
venv_python="${VENV_PYTHON:-$repo_root/.venv/bin/python}"
wheels="${TORCH_WHEELS:-/opt/wheels}"

build() {  # build NAME [if-missing]: images/Dockerfile.NAME -> localhost/taskserver-NAME:test
    local started=$SECONDS lock
    lock="$repo_root/.tools/podman/build.lock"
    mkdir -p "$(dirname "$lock")"
    exec 9>>"$lock"
    flock 9
    if [ "${2:-}" = if-missing ] && podman image exists "localhost/taskserver-$1:test"; then
        echo "reused taskserver-$1"
        flock -u 9
        return
    fi
    local mounts=(--volume /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro)
    local args=(--build-arg "BASE_IMAGE=$base" --build-arg PIP_CERT=/host-ca.crt --build-arg TORCH_INDEX_URL=)
    if [ -d "$wheels" ]; then
        mounts+=(--volume "$wheels:/wheels:ro")
        args+=(--build-arg PIP_FIND_LINKS=/wheels)
    fi
    podman build --quiet --layers "${mounts[@]}" "${args[@]}" \
        -f "images/Dockerfile.$1" -t "localhost/taskserver-$1:test" . >/dev/null
    flock -u 9
    echo "built taskserver-$1 in $((SECONDS - started)) s"
}

run_flow_in_cpu_image() {
    local started=$SECONDS data server_pid
    data="$(mktemp -d)"
    chmod 0777 "$data"
    PREFECT_HOME="$data/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true \
        "$venv_python" -m prefect server start --host 127.0.0.1 --port "$port" >"$data/server.log" 2>&1 &
    server_pid=$!
    trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$data"' RETURN
    for _ in $(seq 1 120); do
        if "$venv_python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api/health', timeout=2)" 2>/dev/null; then
            break
        fi
        sleep 1
    done
    # The flow runs in the container as uid 10001 and reports to the host's server.
    podman run --rm --network host --user 10001:10001 \
        -e PREFECT_API_URL="http://127.0.0.1:$port/api" -e TASKSERVER_DATA_DIR=/data \
        -e OMP_NUM_THREADS=1 -v "$data:/data" \
        "localhost/taskserver-cpu:test" \
        python -c "from taskserver.flows.encode import encode; print(encode(texts=['a cat', 'a dog', 'a car']))"
    # The host's server must have recorded a COMPLETED run of `encode`.
    PREFECT_API_URL="http://127.0.0.1:$port/api" "$venv_python" - <<'PY'
import asyncio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

async def main() -> None:
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["encode"])))
    states = [run.state.type.value for run in runs]
    if "COMPLETED" not in states:
        raise SystemExit(f"no completed encode run on the host server: {states}")
    print(f"host server recorded encode runs: {states}")

asyncio.run(main())
PY
    echo "ran encode inside the CPU image in $((SECONDS - started)) s"
}

total=$SECONDS
case "$which" in
    cpu) build cpu; run_flow_in_cpu_image ;;
    gpu) build gpu ;;
    all) build cpu; run_flow_in_cpu_image; build gpu ;;
    cpu-image) build cpu if-missing ;;
    *) echo "usage: $0 [cpu|gpu|all|cpu-image]" >&2; exit 2 ;;
esac
echo "images/build-test.sh $which: $((SECONDS - total)) s"
