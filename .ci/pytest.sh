#!/usr/bin/env bash
# Runs the whole suite. pytest exits 5 when a selection collects nothing; that is not a
# failure of the code, so it maps to 0 with a loud line, and every other code passes through.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PATH"
export DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The test command installs every tool, so a skip would hide a broken install: make it fail.
export TASKSERVER_STRICT_SKIPS=1
# In-process temporary servers (`taskserver run`, the flow tests' harness) get 2 minutes to come
# up, not 20 s: beside an image build on 2 cores one took longer (2026-12-01).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
# Two processes, whole files each (module fixtures stay shared): most of a test's time is waiting
# on servers, workers and heartbeats. TASKSERVER_TEST_PROCESSES=0 runs everything in this one.
# --no-loadscope-reorder: files go out in collection order (tests/conftest.py puts the longest
# first), not xdist's default of most tests first, which left a 10-minute file for the end.
.venv/bin/python -m pytest -ra -p no:cacheprovider --durations=40 \
  -n "${TASKSERVER_TEST_PROCESSES:-2}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5)"
  exit 0
fi
exit "$rc"
