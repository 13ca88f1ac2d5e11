"""Time and memory of SGPO steps, to size a run: the step split (generate / grade / select /
update), useful generated tokens per second, update time per trained token and peak memory, for any
model and sgpo.py flags.

    python tests/bench_step.py          # the toy model: 8 problems x (8 + 4) rollouts, 48 tokens
    python tests/bench_step.py --model Qwen/Qwen2.5-1.5B-Instruct --data train.jsonl \
        --max_completion_length 2048
    torchrun --nproc_per_node=8 tests/bench_step.py @paper.args --model ... --data ... --steps 4
Flags after the script's own (--steps) go to sgpo.py unchanged and override its defaults here (8
problems a rank, no held-out evaluation, no checkpoint but the last, in a temporary folder). The
first step (allocator and cache warm-up) is left out of the means. Useful tokens: response tokens
up to the first EOS, all ranks.
"""

import json
import os
import resource
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sgpo  # noqa: E402


def main(argv):
    steps = 5
    if argv[:1] == ["--steps"]:
        steps, argv = int(argv[1]), argv[2:]
    with tempfile.TemporaryDirectory() as out:
        args = [
            "--batch_size", "8", "--eval_data", "", "--save_steps", "1000000", "--max_steps",
            str(steps), *argv, "--output_dir", out, "--overwrite_output_dir", "true"
        ]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if sgpo.main(args) != 0:
            return 2
        peak = (
            torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )  # CPU: peak RSS of the process, model included
        if int(os.environ.get("RANK", 0)):
            return 0
        metrics = [
            json.loads(line)
            for line in open(os.path.join(out, "metrics.jsonl"))
            if '"step"' in line
        ][1:]
    # a step without KD targets has no KD metrics: each mean is over the steps that have it
    mean = {}
    for m in metrics:
        for k in m:
            values = [x[k] for x in metrics if isinstance(x.get(k), (int, float))]
            mean[k] = sum(values) / len(values) if values else 0.0
    split = ("generate", "grade", "select", "update")
    step = sum(mean[f"time/{k}"] for k in split)
    print(f"{len(metrics)} steps after the first, mean per step "
          "(rank 0's clock; tokens of all ranks):")
    print(
        "| step s | "
        + " | ".join(f"{k} s" for k in split)
        + " | generated tokens | useful tokens/s | trained tokens "
        "| update ms / trained token | peak memory GiB |"
    )
    print("|---" * 10 + "|")
    generated, trained = mean["perf/generated_tokens"], mean["perf/trained_tokens"]
    where = "GPU, allocated" if torch.cuda.is_available() else "CPU, RSS"
    cells = [f"{step:.2f}"] + [f"{mean[f'time/{k}']:.2f}" for k in split]
    cells += [f"{generated:.0f}", f"{generated / mean['time/generate']:.0f}", f"{trained:.0f}",
              f"{1000 * mean['time/update'] / trained:.2f}", f"{peak:.2f} ({where})"]
    print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
