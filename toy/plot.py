"""Greedy held-out accuracy over RL steps, unguided and guided, of the finished runs of
toy/ablation.py (mean over seeds, shaded from the lowest seed to the highest); writes
toy/ablation.png. matplotlib is needed here only (it is not a dependency of the project: `pip
install matplotlib`).

    python toy/plot.py                              # every row with finished runs in out/ablation
    python toy/plot.py --rows sgpo grpo_only sft_grpo --out toy/main_table.png
    python toy/plot.py --sizes                      # final accuracy against model size
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from toy.ablation import ALL_SIZES, ROWS, SIZE_ROWS, at_size, final_eval, records  # noqa: E402


def curves(out: str) -> dict:
    """{mode: ([steps], [accuracy in %])} of one run's evaluations."""
    evals = records(out, "eval/unguided_acc")
    return {
        mode: ([m["step"] for m in evals], [100 * m[f"eval/{mode}_acc"] for m in evals])
        for mode in ("unguided", "guided")
    }


def final_accuracies(output_dir: str, row: str, hidden: int):
    """Final unguided accuracies (%) of a row's seeds 0-2 at one model size; None unless all three
    finished."""
    ends = [final_eval(os.path.join(output_dir, f"{at_size(row, hidden)}-seed{seed}"))
            for seed in (0, 1, 2)]
    return None if None in ends else [100 * end[1]["eval/unguided_acc"] for end in ends]


def plot_sizes(plt, output_dir: str, out: str) -> None:
    """Final unguided accuracy of SGPO (at the default learning rate and at 3e-5, dashed) and its
    baselines against the warm checkpoint's size (a point per seed, a line through the means), and
    SGPO's gain over its best baseline."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = ALL_SIZES
    means = {}  # row -> {hidden: mean over seeds}
    for row in (*SIZE_ROWS, "sgpo_lr3e-5"):
        found = {h: final_accuracies(output_dir, row, h) for h in sizes}
        found = {h: ends for h, ends in found.items() if ends}
        if not found:
            continue
        means[row] = {h: sum(ends) / len(ends) for h, ends in found.items()}
        (line,) = axes[0].plot(list(means[row]), list(means[row].values()), marker="o",
                               ls="-" if row in SIZE_ROWS else "--", label=ROWS[row][0])
        for h, ends in found.items():
            axes[0].scatter([h] * len(ends), ends, s=12, alpha=0.5, color=line.get_color())
    sgpo_rows = [row for row in ("sgpo", "sgpo_lr3e-5") if row in means]
    for k, row in enumerate(sgpo_rows):
        gains = {h: mean - max(means[b][h] for b in SIZE_ROWS[1:])
                 for h, mean in means[row].items()}
        axes[1].bar([sizes.index(h) + 0.4 * k for h in gains], list(gains.values()), width=0.4,
                    label=ROWS[row][0])
    shift = 0.2 * (len(sgpo_rows) - 1)
    axes[0].set(title="unguided greedy accuracy after training", xlabel="hidden units (3 layers)",
                ylabel="accuracy (%)", ylim=(0, 102), xscale="log", xticks=sizes)
    axes[0].set_xticklabels([str(h) for h in sizes])
    axes[0].minorticks_off()
    axes[1].set(title="SGPO minus its best baseline (means of 3 seeds)", ylabel="points",
                xlabel="hidden units (3 layers)", xticks=[i + shift for i in range(len(sizes))])
    axes[1].set_xticklabels([str(h) for h in sizes])
    axes[1].axhline(0, color="gray", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--output_dir", default="out/ablation")
    parser.add_argument("--out", default=os.path.join(ROOT, "toy", "ablation.png"))
    parser.add_argument("--sizes", action="store_true", help="plot_sizes into toy/sizes.png")
    args = parser.parse_args()
    if args.sizes:
        return plot_sizes(plt, args.output_dir, os.path.join(ROOT, "toy", "sizes.png"))
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
