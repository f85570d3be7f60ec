#!/usr/bin/env bash
# One job for a GPU machine (see scripts/gpu_check.py): the gpu-marked tests, the benchmark tables of SD v1 and
# LDM-1.4B against the peer, ops per step, Lightning's host syncs and the paper recipe's timing, within 8 minutes.
#   bash scripts/gpu_check.sh OUTDIR             # on a CUDA machine
#   bash scripts/gpu_check.sh OUTDIR --dry-run   # every part on the CPU with tiny configs (checks the job)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
