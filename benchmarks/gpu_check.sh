#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one run, estimated at 5-8 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh [--out FILE] [--cpu-dry-run] [--keep] [--candidates N] [--campaigns device,host]
#
# Run after `make install` with a CUDA torch (README, "Install"). PYTHON overrides the interpreter
# (default: the repository's .venv/bin/python, else python3). Writes the tables to FILE, or to
# $OUT/gpu_check.md when OUT is set, with each campaign's log beside it. Exits 2 without a CUDA
# device unless --cpu-dry-run.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$ROOT/.venv/bin/python"
  if [ ! -x "$PYTHON" ]; then
    PYTHON=python3
    echo "gpu_check: no .venv/bin/python in the repository; using $(command -v python3) (set PYTHON to choose)" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi >&2 || true; fi
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
