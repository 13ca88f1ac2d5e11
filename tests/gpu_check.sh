#!/usr/bin/env bash
# One bf16 SGPO step (after a short warm-up) with DDP and with FSDP on one GPU, no network; prints peak memory and
# step times (tests/gpu_check.py). Usage: bash tests/gpu_check.sh [work dir]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d)}
python tests/gpu_check.py build "$DIR"
for fsdp in false true; do
    torchrun --standalone --nproc_per_node=1 tests/gpu_check.py run "$DIR" "$fsdp" 2>&1 | grep -E "^gpu_check|Error|error" || true
done
