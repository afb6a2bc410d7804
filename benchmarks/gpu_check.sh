#!/usr/bin/env bash
# Benchmark entry point on a lent GPU machine (no package index there): install the
# carried wheels (.gpu-wheels/, made here by benchmarks/gpu_wheels.py), put this
# checkout's src/ first on the path, run benchmarks/gpu_check.py (extra args pass on),
# and keep its JSON lines in $OUT/gpu_check.jsonl when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
    python -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python benchmarks/gpu_check.py "$@" | tee "${OUT:-/tmp}/gpu_check.jsonl"
