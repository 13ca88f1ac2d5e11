"""Greedy held-out accuracy over RL steps, unguided and guided, of the rows kept in toy/results
(toy/ablation.py's runs: mean over seeds, shaded from the lowest seed to the highest); writes
toy/ablation.png (`python toy/tables.py` does too). matplotlib is needed here only (it is not a
dependency of the project: `pip install matplotlib`).

    python toy/plot.py                              # the main table's rows
    python toy/plot.py --rows sgpo grpo_only sft_grpo --out toy/main_table.png
    python toy/plot.py --sizes   # final accuracy against model size, per teacher: toy/sizes.png
"""

import argparse
import os
import sys
from statistics import mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from toy.ablation import ALL_SIZES, ROWS, SIZE_ROWS  # noqa: E402
from toy.tables import MAIN_ROWS, load_results, seeds_of, sized  # noqa: E402

# the main table's rows
MAIN = [row for row, _ in MAIN_ROWS]


def curves(result: dict) -> dict:
    """{mode: ([steps], [accuracy in %])} of one kept run's evaluations (toy/results)."""
    evals = result["evals"]
    return {
        mode: ([m["step"] for m in evals], [100 * m[mode] for m in evals])
        for mode in ("unguided", "guided")
    }


TEACHER_ROWS = {"sgpo": "live teacher", "sgpo_base": "base teacher", "sgpo_ema": "EMA teacher"}
BASELINES = SIZE_ROWS[1:]


def final_accuracies(results: dict, row: str, hidden: int):
    """{'unguided': [per seed], 'guided': [...], 'teacher_guided' (a teacher of its own): [...]}
    final accuracies (%) of a row's kept runs at one model size, the size tables' seeds; None if
    it has none."""
    runs = sized(results, row, hidden)
    if not runs:
        return None
    modes = [m for m in ("unguided", "guided", "teacher_guided") if m in runs[0]["evals"][-1]]
    return {mode: [100 * r["evals"][-1][mode] for r in runs] for mode in modes}


def plot_sizes(plt, out: str) -> None:
    """Against the warm checkpoint's size: the final unguided accuracy of SGPO with each teacher
    and of its baselines (a point per seed, a line through the means), the final guided accuracy
    (the policy's own skill, with the strategy; dashed: the base/EMA teacher's), and SGPO's gain
    over its best baseline per teacher."""
    results = load_results()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    sizes, means = ALL_SIZES, {}  # row -> {hidden: mean unguided over seeds}
    for row in (*TEACHER_ROWS, *BASELINES):
        found = {h: final_accuracies(results, row, h) for h in sizes}
        found = {h: ends for h, ends in found.items() if ends}
        if not found:
            continue
        means[row] = {h: mean(e["unguided"]) for h, e in found.items()}
        label = f"SGPO, {TEACHER_ROWS[row]}" if row in TEACHER_ROWS else ROWS[row][0]
        (line,) = axes[0].plot(list(means[row]), list(means[row].values()), marker="o",
                               ls="-" if row in TEACHER_ROWS else ":", label=label)
        for h, ends in found.items():
            axes[0].scatter([h] * len(ends["unguided"]), ends["unguided"], s=12, alpha=0.5,
                            color=line.get_color())
        if row in TEACHER_ROWS:
            guided = {h: mean(e["guided"]) for h, e in found.items()}
            axes[1].plot(list(guided), list(guided.values()), marker="o", label=label,
                         color=line.get_color())
            teacher = {h: mean(e["teacher_guided"]) for h, e in found.items()
                       if "teacher_guided" in e}
            if teacher:
                axes[1].plot(list(teacher), list(teacher.values()), marker="x", ls="--",
                             color=line.get_color(), label=f"{TEACHER_ROWS[row]} itself")
    teachers = [row for row in TEACHER_ROWS if row in means]
    for k, row in enumerate(teachers):
        gains = {h: sgpo - max(means[b][h] for b in BASELINES if h in means.get(b, {}))
                 for h, sgpo in means[row].items()}
        axes[2].bar([sizes.index(h) + 0.25 * k for h in gains], list(gains.values()), width=0.25,
                    label=TEACHER_ROWS[row])
    titles = ("unguided greedy accuracy after training", "guided greedy accuracy after training")
    for ax, title in zip(axes[:2], titles):
        ax.set(title=title, xlabel="hidden units (3 layers)", ylabel="accuracy (%)",
               ylim=(0, 102), xscale="log", xticks=sizes)
        ax.set_xticklabels([str(h) for h in sizes])
        ax.minorticks_off()
    shift = 0.125 * (len(teachers) - 1)
    axes[2].set(title="SGPO minus its best baseline (means of 3 seeds)", ylabel="points",
                xlabel="hidden units (3 layers)", xticks=[i + shift for i in range(len(sizes))])
    axes[2].set_xticklabels([str(h) for h in sizes])
    axes[2].axhline(0, color="gray", lw=1)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_rows(plt, rows: list, out: str) -> None:
    """Unguided and guided accuracy over RL steps of rows kept in toy/results; a row without RL
    steps (SFT only) as a level."""
    results = load_results()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, row in enumerate(rows):
        runs = [curves(r) for r in seeds_of(results, row)]
        if not runs:
            continue
        for ax, mode in zip(axes, ("unguided", "guided")):
            steps = runs[0][mode][0]
            # per step, one value per seed
            values = list(zip(*[r[mode][1] for r in runs if r[mode][0] == steps]))
            label, mean = f"{ROWS[row][0]} ({len(runs)})", [sum(v) / len(v) for v in values]
            if len(steps) == 1:  # no RL steps (the SFT baseline): its one evaluation, as a level
                ax.axhline(mean[0], ls="--", lw=1, color=f"C{i % 10}", label=label)
                continue
            ax.plot(steps, mean, marker="o", ms=3, color=f"C{i % 10}", label=label)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=f"C{i % 10}", alpha=0.15)
    for ax, mode in zip(axes, ("unguided", "guided")):
        ax.set(
            title=f"{mode} greedy accuracy, held-out cups problems", xlabel="RL step", ylim=(0, 102)
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    try:
        import matplotlib
    except ImportError:
        print("error: toy/plot.py needs matplotlib, which the project does not install: "
              "pip install matplotlib", file=sys.stderr)
        sys.exit(2)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rows", nargs="+", default=MAIN, choices=list(ROWS))
    parser.add_argument("--out", default=os.path.join(ROOT, "toy", "ablation.png"))
    parser.add_argument("--sizes", action="store_true", help="plot_sizes into toy/sizes.png")
    args = parser.parse_args()
    if args.sizes:
        return plot_sizes(plt, os.path.join(ROOT, "toy", "sizes.png"))
    plot_rows(plt, args.rows, args.out)


if __name__ == "__main__":
    main()
