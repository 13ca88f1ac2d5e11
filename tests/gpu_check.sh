#!/usr/bin/env bash
# The GPU check (tests/gpu_check.py says what each part proves): on a fresh 1-GPU box, after
# `pip install -r requirements.txt` (no pytest, no network), run this first:
#     bash tests/gpu_check.sh [DIR]
# Every part runs under `timeout`; the first that fails ends the check with a non-zero exit and
# its reason on the last line; the whole output is kept in DIR/gpu_check.log; the last line of a
# check that passed is one JSON summary. Under 10 minutes on one H100: the parts' time limits add
# up to 595 s (not yet run on a GPU: the limits are estimates). On a CPU a scaled-down run of the
# same parts (under a minute), listing what it skipped.
#     GPU_CHECK_FAULT=nan bash tests/gpu_check.sh   # a NaN in the first RL step's loss: must fail
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d)}
mkdir -p "$DIR"
LOG="$DIR/gpu_check.log"
: > "$LOG"
TORCHRUN=(python -m torch.distributed.run --standalone --nproc_per_node=1)

part() {  # name, time limit in seconds, command...
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name ($*)" >> "$LOG"
    local start=$SECONDS
    timeout --kill-after=20 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then
        local reason
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            reason="timed out after $limit s"
        else
            # the part's own verdict, else the last error line of its traceback
            local out
            out=$(sed -n "/^== $name /,\$p" "$LOG")
            reason=$(grep "gpu_check: FAIL" <<< "$out" | tail -n 1)
            [ -n "$reason" ] || reason=$(grep -E "^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception)\b" \
                <<< "$out" | grep -v ChildFailedError | tail -n 1)
        fi
        tail -n 40 "$LOG"
        echo "gpu_check: FAILED: $name (exit $rc): ${reason:-see $LOG}"
        exit 1
    fi
    grep "^gpu_check: $name" "$LOG" | tail -n 1
    echo "   ($name: $((SECONDS - start)) s)"
}

part deps 20 python tests/gpu_check.py deps "$DIR"
part build 40 python tests/gpu_check.py build "$DIR"
part train-ddp 90 "${TORCHRUN[@]}" tests/gpu_check.py train "$DIR" ddp
part train-fsdp 90 "${TORCHRUN[@]}" tests/gpu_check.py train "$DIR" fsdp
part kernels 30 python tests/gpu_check.py kernels "$DIR"
part resume 90 "${TORCHRUN[@]}" tests/gpu_check.py resume "$DIR"
if grep -q '"device": "cpu"' "$DIR/result-deps.json"; then
    echo "gpu_check: memory, memory-sim: skipped (no GPU)" | tee -a "$LOG"
else
    part memory 115 "${TORCHRUN[@]}" tests/gpu_check.py memory "$DIR"
    part memory-sim 90 python tests/gpu_check.py memory-sim "$DIR"
fi
part speed 30 python tests/gpu_check.py speed "$DIR"
python tests/gpu_check.py summary "$DIR" | tee -a "$LOG"
