"""
The ablation table of the cups testbed: each row is sgpo.py's default run plus one flag, over several seeds;
prints greedy held-out accuracy (unguided and guided) after RL, mean +- standard deviation over seeds.

    python toy/ablation.py                        # 6 rows x 3 seeds, ~2 min a run on 2 cores (~40 min)
    python toy/ablation.py --seeds 0 --rows sgpo grpo_only -- --max_steps 40   # a subset; extra sgpo.py flags after --

Finished runs (out/ablation/<row>-seed<k>/metrics.jsonl with its final evaluation) are read, not rerun.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sgpo  # noqa: E402
ROWS = {  # name -> (label, sgpo.py flags)
    "sgpo": ("SGPO (defaults)", []),
    "grpo_only": ("GRPO only", ["--use_kd", "false"]),
    "direct_sft": ("direct SFT on the selected guided targets", ["--kd_loss", "sft"]),
    "reverse_kl": ("reverse KL", ["--kd_loss", "rkl"]),
    "fixed_alpha": ("fixed alpha", ["--adaptive_alpha", "false"]),
    "kl_clip_1": ("KL clipping at the paper's delta = 1", ["--kl_clip", "1"]),
}


def final_eval(out: str):
    """(eval before RL, eval at the end) of a run in out, or None if it has not finished."""
    ckpt = sgpo.latest_checkpoint(out)
    if ckpt is None or int(ckpt.rsplit("-", 1)[1]) != json.load(open(os.path.join(ckpt, "sgpo_config.json")))["max_steps"]:
        return None
    evals = [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "eval/unguided_acc" in m]
    return evals[0], evals[-1]


def mean_sd(values):
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {sd:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--output_dir", default="out/ablation")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = {}
    for row in args.rows:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, f"{row}-seed{seed}")
            if final_eval(out) is None:
                cmd = [sys.executable, os.path.join(ROOT, "sgpo.py"), "--seed", str(seed), "--output_dir", out,
                       "--overwrite_output_dir", *ROWS[row][1], *extra]
                print(" ".join(cmd), flush=True)
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "log.txt"), "w") as log:  # the run's output (progress bars included)
                    subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            results[row, seed] = final_eval(out)
    before = [results[row, s][0] for row in args.rows for s in args.seeds]
    print(f"\nseeds {args.seeds}; before RL: unguided {mean_sd([b['eval/unguided_acc'] for b in before])}, "
          f"guided {mean_sd([b['eval/guided_acc'] for b in before])}")
    print("| run | flags | unguided | guided | unguided per seed |\n|---|---|---|---|---|")
    for row in args.rows:
        ends = [results[row, s][1] for s in args.seeds]
        print(f"| {ROWS[row][0]} | `{' '.join(ROWS[row][1]) or '-'}` | {mean_sd([e['eval/unguided_acc'] for e in ends])} "
              f"| {mean_sd([e['eval/guided_acc'] for e in ends])} "
              f"| {' / '.join('%.1f' % (100 * e['eval/unguided_acc']) for e in ends)} |")


if __name__ == "__main__":
    main()
