"""Greedy held-out accuracy over RL steps, unguided and guided, of the finished runs of
toy/ablation.py (mean over seeds, shaded from the lowest seed to the highest); writes
toy/ablation.png. matplotlib is needed here only (it is not a dependency of the project: `pip
install matplotlib`).

    python toy/plot.py                              # every row with finished runs in out/ablation
    python toy/plot.py --rows sgpo grpo_only sft_grpo --out toy/main_table.png
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from toy.ablation import ROWS, final_eval, records  # noqa: E402


def curves(out: str) -> dict:
    """{mode: ([steps], [accuracy in %])} of one run's evaluations."""
    evals = records(out, "eval/unguided_acc")
    return {
        mode: ([m["step"] for m in evals], [100 * m[f"eval/{mode}_acc"] for m in evals])
        for mode in ("unguided", "guided")
    }


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--output_dir", default="out/ablation")
    parser.add_argument("--out", default=os.path.join(ROOT, "toy", "ablation.png"))
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in args.rows:
        runs = [
            os.path.join(args.output_dir, d)
            for d in sorted(os.listdir(args.output_dir))
            if d.rsplit("-seed", 1)[0] == row
        ]
        runs = [curves(r) for r in runs if final_eval(r) is not None]
        if not runs:
            continue
        for ax, mode in zip(axes, ("unguided", "guided")):
            steps = runs[0][mode][0]
            # per step, one value per seed
            values = list(zip(*[r[mode][1] for r in runs if r[mode][0] == steps]))
            label, mean = f"{ROWS[row][0]} ({len(runs)})", [sum(v) / len(v) for v in values]
            if len(steps) == 1:  # no RL steps (the SFT baseline): its one evaluation, as a level
                ax.axhline(mean[0], ls="--", lw=1, color="gray", label=label)
                continue
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=label)
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                alpha=0.15
            )
    for ax, mode in zip(axes, ("unguided", "guided")):
        ax.set(
            title=f"{mode} greedy accuracy, held-out cups problems", xlabel="RL step", ylim=(0, 102)
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
