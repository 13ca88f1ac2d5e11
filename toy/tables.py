"""
The toy's tables in toy/README.md and README.md, written from the results files that
toy/ablation.py keeps (toy/results/<row>-seed<k>.json: each run's commit, flags, seed and numbers).

    python toy/tables.py            # rewrite every table between its markers, and the figures
    python toy/tables.py --check    # exit 1 if a table differs from what the results give

A table sits between `<!-- table NAME -->` and `<!-- end table -->`; tests/test_toy_tables.py
checks that each equals its rendering.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "toy", "results")
FILES = [os.path.join(ROOT, "toy", "README.md"), os.path.join(ROOT, "README.md")]
BLOCK = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- end table -->)", re.S)
SPLITS = ("7-10 swaps", "start written out", "question reworded")


def load_results(folder: str = RESULTS) -> dict:
    """{(row, seed): result} of every results file."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        result = json.load(open(path))
        out[result["row"], result["seed"]] = result
    return out


def seeds_of(results: dict, row: str) -> list:
    """The row's results, by seed."""
    return [results[key] for key in sorted(k for k in results if k[0] == row)]


def pct(values) -> str:
    """Mean +- standard deviation in %, one decimal."""
    return bits((100 * v for v in values), 1)


def final(result: dict, mode: str = "unguided") -> float:
    return result["evals"][-1][mode]


def finals(runs: list, mode: str = "unguided") -> str:
    """Mean +- sd of the runs' final accuracy in %."""
    return pct(final(r, mode) for r in runs)


def per_seed(runs: list) -> str:
    return " / ".join(f"{100 * final(r):.1f}" for r in runs)


def at_step(result: dict, step: int, mode: str = "unguided"):
    """The held-out accuracy at an evaluation step, or None."""
    return next((e[mode] for e in result["evals"] if e["step"] == step), None)


def entropy(runs: list) -> str:
    """Entropy of the unguided rollouts, mean over seeds: first step -> mean of the last 10."""
    series = [r["series"]["entropy"] for r in runs if r["series"]["entropy"]]
    if not series:
        return "-"
    first = statistics.mean(s[0] for s in series)
    last = statistics.mean(statistics.mean(s[-10:]) for s in series)
    return f"{first:.3f} -> {last:.3f}"


def late(runs: list, name: str) -> str:
    """A late/ fraction (the passes after a batch's first optimizer step), mean of the first 20
    steps and over seeds, in %; '-' where no run records it."""
    series = [r["series"][f"late/{name}"][:20] for r in runs if r["series"][f"late/{name}"]]
    if not series:
        return "-"
    return f"{100 * statistics.mean(statistics.mean(s) for s in series):.1f} %"


def commits(runs: list) -> str:
    return ", ".join(sorted({r["commit"][:7] for r in runs}))


PROXIMAL_ROWS = [
    ("sgpo", "SGPO", 1), ("no_proximal", "w/o all proximal constraints", 1),
    *((f"{row}_k{k}", label, k) for k in (2, 4) for row, label in (
        ("sgpo", "SGPO"), ("no_trust_region", "w/o trust region"),
        ("no_proximal", "w/o all proximal constraints"),
        ("kl_clip_10", "KL clipping at delta = 10")))
]


def proximal(results: dict) -> list:
    """The proximal constraints at k = 1, 2 and 4 optimizer steps per rollout batch."""
    lines = ["| row | k | unguided | per seed | guided | entropy | trust region out / GRPO "
             "clipped / KL clipped (late) | commit |", "|---|---|---|---|---|---|---|---|"]
    for row, label, k in PROXIMAL_ROWS:
        runs = seeds_of(results, row)
        if not runs:
            continue
        lines.append(
            f"| {label} | {k} | {final_cells(runs)} | {entropy(runs)} "
            f"| {constraint_fractions(runs) if k > 1 else '- (ratio 1)'} | {commits(runs)} |")
    return lines


def final_cells(runs: list) -> str:
    """Cells: unguided, unguided per seed, guided."""
    return f"{finals(runs)} | {per_seed(runs)} | {finals(runs, 'guided')}"


def constraint_fractions(runs: list) -> str:
    """The trust region's, GRPO's clip's and KL clipping's late fractions."""
    return " / ".join(late(runs, n) for n in ("kd/ratio_out_frac", "clip_ratio", "kd/kl_clip_frac"))


BUDGET_ROWS = [
    ("sgpo", "SGPO (defaults)", 80, "1,280"), ("sgpo_250", "SGPO", 250, "4,000"),
    ("sft_full_20", "SFT on full worked solutions", 20, "320"),
    ("sft_full_40", "SFT on full worked solutions", 40, "640"),
    ("sft_full_60", "SFT on full worked solutions", 60, "960"),
    ("sft_full_80", "SFT on full worked solutions", 80, "1,280"),
    ("sft_full", "SFT on full worked solutions (2 epochs)", 250, "4,000"),
]


def budget(results: dict) -> list:
    """SGPO and SFT on full worked solutions at matched optimizer steps and examples."""
    lines = ["| row | optimizer steps | problems seen | unguided | guided | per seed | "
             + " | ".join(SPLITS) + " | commit |", "|---" * (7 + len(SPLITS)) + "|"]
    for row, label, steps, seen in BUDGET_ROWS:
        runs = seeds_of(results, row)
        if runs:
            lines.append(f"| {label} | {steps} | {seen} | {accuracies(runs)} | {commits(runs)} |")
    return lines


def budget_curve(results: dict) -> list:
    """Unguided accuracy every 20 optimizer steps: SGPO's 250-step runs against SFT cut to 20, 40,
    60 and 80 steps (mean +- sd over seeds)."""
    sgpo = seeds_of(results, "sgpo_250")
    steps = sorted({e["step"] for r in sgpo for e in r["evals"]})
    lines = ["| optimizer steps | SGPO (unguided) | SGPO (guided) | SFT on full worked "
             "solutions |", "|---|---|---|---|"]
    for step in steps:
        # SFT cut to `step` steps; its 250 steps: the 2-epoch row
        sft = seeds_of(results, "sft_full" if step == 250 else f"sft_full_{step}")
        row = [pct(at_step(r, step) for r in sgpo), pct(at_step(r, step, "guided") for r in sgpo),
               finals(sft) if sft else ""]
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    return lines


def accuracies(runs: list) -> str:
    """Cells: unguided, guided, unguided per seed, the generalisation splits (unguided)."""
    splits = " | ".join(pct(r["generalisation"][s] for r in runs) for s in SPLITS)
    return (f"{finals(runs)} | {finals(runs, 'guided')} "
            f"| {per_seed(runs)} | {splits}")


def seed_list(runs: list) -> str:
    return ", ".join(str(r["seed"]) for r in runs)


def base_line(results: dict, columns: int) -> str:
    """The warm checkpoint's evaluation before RL (the default rows' step 0)."""
    start = seeds_of(results, "sgpo")[0]["evals"][0]
    cells = [f"{100 * start['unguided']:.1f}", f"{100 * start['guided']:.1f}"]
    return "| base: the warm checkpoint | " + " | ".join(cells + [""] * (columns - 2)) + " |"


MAIN_ROWS = [
    ("sft_solutions", "SFT on the strong model's answers (answer only)"),
    ("sft_grpo", "SFT on the answers, then GRPO"),
    ("sft_full", "**SFT on full worked solutions** (the fair baseline)"),
    ("sft_full_grpo", "SFT on full worked solutions, then GRPO"),
    ("sgpo", "**SGPO** (defaults)"),
    ("sft_sgpo", "SFT on the answers, then SGPO"),
    ("no_proximal", "w/o all proximal constraints"),
]


def accuracy_table(results: dict, rows: list, extra) -> list:
    """A row each of `rows` (name, label) that has results: accuracies' cells, then an extra column
    (extra: its name, the cell it makes of the runs), the seeds and the commits."""
    name, cell = extra
    lines = ["| run | unguided | guided | per seed | " + " | ".join(SPLITS)
             + f" | {name} | seeds | commit |", "|---" * (7 + len(SPLITS)) + "|"]
    for row, label in rows:
        runs = seeds_of(results, row)
        if runs:
            lines.append(f"| {label} | {accuracies(runs)} | {cell(runs)} | {seed_list(runs)} "
                         f"| {commits(runs)} |")
    return lines


def main_table(results: dict) -> list:
    """The paper's main table in miniature, with the generalisation splits and the entropy."""
    lines = accuracy_table(results, MAIN_ROWS, ("entropy", entropy))
    return lines[:2] + [base_line(results, 6 + len(SPLITS))] + lines[2:]


IMITATION_ROWS = [
    ("sgpo", "**SGPO** (the strategy only)"),
    ("sft_full", "SFT, the strategy's notation: `13:2 12:1 \\boxed{1}`"),
    ("sft_verbose", "SFT, in words: `swap 1 and 3, ball under 2. swap 1 and 2, ball under 1. so "
                    "\\boxed{1}`"),
    ("sft_verbose_lr1e-3", "the same, lr 1e-3"),
    ("sft_arrangement", "SFT, the whole row of cups: `13>321 12>231 2@1 \\boxed{1}`"),
    ("sft_arrangement_lr1e-3", "the same, lr 1e-3"),
    ("sft_answer_first", "SFT, answer first: `\\boxed{1} since 13:2 12:1`"),
]


def sft_loss(runs: list) -> str:
    """The warm-up's loss per token at its last step, per seed."""
    return " / ".join(f"{r['sft_loss_last']:.2g}" for r in runs if r["sft_loss_last"] is not None)


def imitation(results: dict) -> list:
    """Full traces written otherwise than the student's way, SFT'd, against SGPO."""
    return accuracy_table(results, IMITATION_ROWS, ("SFT loss, last step", sft_loss))


def ablation_table(results: dict) -> list:
    """toy/ablation.py's default rows and w/o all proximal constraints, each `python sgpo.py
    --seed S` plus its flags."""
    from toy.ablation import DEFAULT_ROWS, ROWS
    lines = ["| run | flags | unguided | guided | unguided per seed | seeds | commit |",
             "|---|---|---|---|---|---|---|"]
    for row in [*DEFAULT_ROWS, "no_proximal"]:
        runs = seeds_of(results, row)
        if runs:
            label, flags = ROWS[row]
            lines.append(
                f"| {label} | `{' '.join(flags) or '-'}` | {finals(runs)} "
                f"| {finals(runs, 'guided')} | {per_seed(runs)} "
                f"| {seed_list(runs)} | {commits(runs)} |")
    return lines


HEADLINE_ROWS = [
    ("sgpo", "**SGPO** (`python sgpo.py`)"), ("grpo_only", "GRPO only (`--use_kd false`)"),
    ("no_grpo", "w/o autonomous GRPO (`--use_grpo false`)"),
    ("reverse_kl", "reverse KL (`--kd_loss rkl`)"),
    ("sft_full", "SFT on the strong model's full worked solutions (250 steps)"),
    ("sft_full_80", "the same cut to SGPO's 80 steps and 1,280 problems"),
    ("sgpo_250", "SGPO for SFT's 250 steps and 4,000 problems"),
    ("sft_arrangement_lr1e-3", "SFT on full worked solutions written otherwise than the student's "
                               "way (the best of 5 variants: the whole row of cups, lr 1e-3)"),
]


def headline(results: dict) -> list:
    """The front README's summary table."""
    lines = ["| run | unguided | guided | seeds |", "|---|---|---|---|",
             base_line(results, 3)]
    for row, label in HEADLINE_ROWS:
        runs = seeds_of(results, row)
        if runs:
            lines.append(f"| {label} | {finals(runs)} "
                         f"| {finals(runs, 'guided')} | {seed_list(runs)} |")
    return lines


def spread_proximal(results: dict) -> list:
    """The proximal constraints on the teacher with spread (k = 4 x 2 passes), at each learning rate
    tried: accuracy, the separator entropy of the unguided samples (the training rollouts logged at
    the first and last 10 steps; the final weights' 64 samples) and the constraints' fractions."""
    from toy.ablation import PROXIMAL, SPREAD_LRS
    lines = ["| row | lr | unguided | per seed | guided | separator entropy, rollouts: steps 1-10 "
             "-> 71-80 | final samples: unguided / guided | trust region out / GRPO clipped / "
             "KL clipped (late) | seeds | commit |", "|---" * 10 + "|"]
    for lr in SPREAD_LRS:
        for row, (label, _) in PROXIMAL.items():
            runs = seeds_of(results, f"{row}_spread_lr{lr}")
            if not runs:
                continue
            lines.append(
                f"| {label} | {lr} | {final_cells(runs)} | {separator_drift(runs)} "
                f"| {final_separators(runs)} | {constraint_fractions(runs)} | {seed_list(runs)} "
                f"| {commits(runs)} |")
    return lines


def bits(values, digits: int = 2) -> str:
    """Mean +- standard deviation, `digits` decimals."""
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def separator_drift(runs: list) -> str:
    """Separator entropy (bits) of the logged unguided rollouts, steps 1-10 -> the last 10 steps,
    mean +- sd over seeds of each run's mean."""
    series = [r["spread"]["steps"]["autonomous"] for r in runs]
    return (f"{bits(statistics.mean(s[:10]) for s in series)} -> "
            f"{bits(statistics.mean(s[-10:]) for s in series)}")


def final_separators(runs: list) -> str:
    return " / ".join(bits(r["spread"][mode]["separator_entropy_bits"] for r in runs)
                      for mode in ("unguided", "guided"))


def spread_curve(results: dict, lr: str) -> list:
    """The spread testbed's constraint rows at one learning rate every 10 steps: unguided / guided
    accuracy (mean over seeds, %) and the separator entropy of the logged unguided rollouts (bits,
    mean of the 10 steps up to it)."""
    from toy.ablation import PROXIMAL
    rows = [(f"{row}_spread_lr{lr}", label) for row, (label, _) in PROXIMAL.items()]
    rows = [(row, label) for row, label in rows if seeds_of(results, row)]
    lines = ["| step | " + " | ".join(label for _, label in rows) + " |",
             "|---" * (1 + len(rows)) + "|"]
    for step in range(0, 81, 10):
        cells = []
        for row, _ in rows:
            runs = seeds_of(results, row)
            accuracy = "%.0f / %.0f" % tuple(
                100 * statistics.mean(at_step(r, step, mode) for r in runs)
                for mode in ("unguided", "guided"))
            window = [r["spread"]["steps"]["autonomous"][max(0, step - 10):step] for r in runs]
            entropy = statistics.mean(map(statistics.mean, window)) if step else None
            cells.append(accuracy + (f", {entropy:.2f} bits" if entropy is not None else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


SPREAD_ROWS = [("sgpo_spread", "SGPO (forward KL)"),
               ("direct_sft_spread", "direct SFT on the selected targets"),
               ("sgpo_spread_short", "SGPO, the teacher trained 300 steps at lr 1e-3")]


def spread(results: dict) -> list:
    """Forward KL vs direct SFT on the teacher with spread: accuracy and how the final policy's
    unguided samples (temperature 1, 64 test problems) write their working."""
    lines = ["| run | unguided | guided | per seed | separator entropy (bits), per seed | "
             "rollouts mixing notations | -log p per token | start written out | seeds | commit |",
             "|---" * 10 + "|"]
    for row, label in SPREAD_ROWS:
        runs = seeds_of(results, row)
        if not runs:
            continue
        samples = [r["spread"]["unguided"] for r in runs]
        entropies = [s["separator_entropy_bits"] for s in samples]
        lines.append(
            f"| {label} | {finals(runs)} | {finals(runs, 'guided')} "
            f"| {per_seed(runs)} | {bits(entropies)} ({' / '.join(f'{e:.2f}' for e in entropies)}) "
            f"| {pct(s['rollouts_mixing_notations'] for s in samples)} "
            f"| {bits((s['mean_token_nll'] for s in samples), 3)} "
            f"| {pct(r['generalisation']['start written out'] for r in runs)} "
            f"| {seed_list(runs)} | {commits(runs)} |")
    return lines


# the learning rate of the spread testbed's constraint rows with 5 seeds (toy/README.md)
SPREAD_LR = "3e-5"
CAPABILITY_COLUMNS = [("sgpo", "SGPO"), ("sgpo_base", "SGPO, base teacher"),
                      ("grpo_only", "GRPO only"), ("sft_full_80", "SFT on full worked solutions"),
                      ("sft_answer_80", "SFT on the answers")]
BASELINES = ("grpo_only", "sft_full_80", "sft_answer_80")


def capability(results: dict) -> list:
    """SGPO and its baselines at 80 steps from warm checkpoints of less guided skill (the warm-up
    saved where it first reaches guided 60 / 80 %; the committed one, its end); SGPO's gain over the
    best baseline (by mean) and over GRPO only, seed by seed."""
    from toy.ablation import CAPABILITIES
    lines = ["| warm checkpoint: guided / unguided before RL | "
             + " | ".join(label for _, label in CAPABILITY_COLUMNS)
             + " | SGPO minus best baseline, per seed | the same, base teacher "
             "| SGPO minus GRPO only | commit |", "|---" * (5 + len(CAPABILITY_COLUMNS)) + "|"]
    for suffix in [f"_g{level}" for level in CAPABILITIES] + [""]:
        runs = {row: seeds_of(results, row + suffix) for row, _ in CAPABILITY_COLUMNS}
        if not all(runs[row] for row in ("sgpo", *BASELINES)):
            continue
        start = runs["sgpo"][0]["evals"][0]
        name = "the committed one (the end)" if not suffix else f"first at >= {suffix[2:]} %"
        cells = [with_seeds(r) if r else "" for r in runs.values()]
        accuracy = {row: by_seed(v) for row, v in runs.items()}
        best = best_of([accuracy[row] for row in BASELINES])
        gains = [paired(accuracy[row], best) for row in ("sgpo", "sgpo_base")]
        over_grpo = paired(accuracy["sgpo"], accuracy["grpo_only"])
        lines.append(
            f"| {name}: {100 * start['guided']:.1f} / {100 * start['unguided']:.1f} | "
            + " | ".join(cells + [gain(g, each=True) for g in gains])
            + f" | {gain(over_grpo)} | {commits(sum(runs.values(), []))} |")
    return lines


def paired(mine: dict, other: dict) -> list:
    """{seed: value} x2 -> the differences on the seeds both ran, by seed."""
    return [mine[s] - other[s] for s in sorted(set(mine) & set(other))]


def gain(differences: list, each: bool = False) -> str:
    """Their mean, and with each, every one: '+1.0 (+2.0 / +0.0)'; '' without any."""
    if not differences:
        return ""
    mean = f"{statistics.mean(differences):+.1f}"
    return f"{mean} ({' / '.join(f'{d:+.1f}' for d in differences)})" if each else mean


def adaptive_alpha(results: dict) -> list:
    """Adaptive vs fixed alpha on 128 problems x 10 epochs (alpha updated on every visit)."""
    lines = ["| run | unguided | guided | per seed (unguided) | seeds | commit |",
             "|---|---|---|---|---|---|"]
    for row, label in (("sgpo_128", "adaptive alpha (defaults)"),
                       ("fixed_alpha_128", "fixed alpha (`--adaptive_alpha false`)")):
        runs = seeds_of(results, row)
        if runs:
            lines.append(f"| {label} | {finals(runs)} "
                         f"| {finals(runs, 'guided')} | {per_seed(runs)} "
                         f"| {seed_list(runs)} | {commits(runs)} |")
    return lines


# the seeds of the size and teacher rows (the default rows' seeds 3 and 4 left out there)
SIZE_SEEDS = (0, 1, 2)


def sized(results: dict, row: str, hidden: int) -> list:
    """A row's runs at one model size (toy/ablation.py at_size), seeds SIZE_SEEDS."""
    from toy.ablation import at_size
    return [r for r in seeds_of(results, at_size(row, hidden)) if r["seed"] in SIZE_SEEDS]


def with_seeds(runs: list) -> str:
    """'mean +- sd (per seed)' of the final unguided accuracy."""
    return f"{finals(runs)} ({per_seed(runs)})"


def by_seed(runs: list) -> dict:
    """{seed: final unguided accuracy in %}."""
    return {r["seed"]: 100 * final(r) for r in runs}


def best_of(accuracies: list) -> dict:
    """The by_seed with the best mean."""
    return max(accuracies, key=lambda accuracy: statistics.mean(accuracy.values()))


def best_baseline(results: dict, hidden: int) -> dict:
    """by_seed of the best baseline (by mean) of SGPO at one size (GRPO only, SFT on full worked
    solutions); {} if one has not run."""
    from toy.ablation import SIZE_ROWS
    runs = [by_seed(sized(results, row, hidden)) for row in SIZE_ROWS[1:]]
    return best_of(runs) if all(runs) else {}


def sizes(results: dict) -> list:
    """SGPO (live teacher) and its baselines from each size's warm checkpoint; SGPO's gain over the
    best baseline, seed by seed, and over GRPO only; SGPO (live and base teacher) at lr 3e-5
    where it ran."""
    from toy.ablation import ALL_SIZES, SIZE_ROWS, SIZES
    lines = ["| hidden | warm: unguided / guided | SGPO | GRPO only | SFT on full worked solutions "
             "| SGPO minus best baseline, per seed | SGPO minus GRPO only | commit |",
             "|---" * 8 + "|"]
    for hidden in ALL_SIZES:
        runs = {row: sized(results, row, hidden) for row in SIZE_ROWS}
        if not all(runs.values()):
            continue
        start = runs["sgpo"][0]["evals"][0]
        sgpo = by_seed(runs["sgpo"])
        over = [paired(sgpo, best_baseline(results, hidden)),
                paired(sgpo, by_seed(runs["grpo_only"]))]
        lines.append(
            f"| {hidden} | {100 * start['unguided']:.1f} / {100 * start['guided']:.1f} "
            f"| {with_seeds(runs['sgpo'])}, guided {finals(runs['sgpo'], 'guided')} "
            f"| {with_seeds(runs['grpo_only'])} | {with_seeds(runs['sft_full'])} "
            f"| {gain(over[0], each=True)} | {gain(over[1])} "
            f"| {commits(sum(runs.values(), []))} |")
    for row, label in (("sgpo_lr3e-5", "SGPO"), ("sgpo_base_lr3e-5", "SGPO, base teacher,")):
        for hidden in SIZES:
            runs = sized(results, row, hidden)
            if runs:
                lines.append(
                    f"| {hidden}, {label} at lr 3e-5 (seed{'s' * (len(runs) > 1)} "
                    f"{seed_list(runs)}) | | {with_seeds(runs)}, guided {finals(runs, 'guided')} "
                    f"| | | | | {commits(runs)} |")
    return lines


TEACHER_LABELS = {"sgpo": "live", "sgpo_base": "base", "sgpo_ema": "EMA"}


def every_10(runs: list, mode: str) -> str:
    """An accuracy at steps 0, 10, ..., 80, mean over seeds, in %."""
    return ", ".join(
        "%.0f" % (100 * statistics.mean(at_step(r, step, mode) for r in runs))
        for step in range(0, 81, 10))


def targets(runs: list, first: int, last: int) -> str:
    """kd/target_frac (problems with a KD target) over steps first..last, mean over seeds."""
    return "%.2f" % statistics.mean(
        statistics.mean(r["series"]["kd/target_frac"][first - 1:last]) for r in runs)


def teachers(results: dict) -> list:
    """SGPO with the live, base and EMA teacher at each size: final accuracy, the policy's and the
    teacher's guided accuracy every 10 steps, the problems with a KD target late, and the gap to
    the best baseline."""
    from toy.ablation import ALL_SIZES
    lines = ["| hidden | teacher | unguided (per seed) | guided, policy | policy's guided every "
             "10 steps | teacher's guided every 10 steps | targets, steps 71-80 | minus best "
             "baseline | commit |", "|---" * 9 + "|"]
    for hidden in ALL_SIZES:
        best = best_baseline(results, hidden)
        for row, teacher in TEACHER_LABELS.items():
            runs = sized(results, row, hidden)
            if not runs:
                continue
            own = every_10(runs, "teacher_guided") if row != "sgpo" else "(the policy)"
            lines.append(
                f"| {hidden} | {teacher} | {with_seeds(runs)} "
                f"| {finals(runs, 'guided')} | {every_10(runs, 'guided')} "
                f"| {own} | {targets(runs, 71, 80)} "
                f"| {gain(paired(by_seed(runs), best))} "
                f"| {commits(runs)} |")
    return lines


def who_samples(results: dict) -> list:
    """At hidden 32, base and EMA teacher: the guided rollouts sampled by the policy (the default)
    or by the teacher (--teacher_samples_guided true)."""
    lines = ["| teacher | G2 sampled by | unguided (per seed) | guided, policy | teacher's guided "
             "at 80 | targets, steps 1-10 / 71-80 | seeds | commit |", "|---" * 8 + "|"]
    for teacher in ("base", "ema"):
        for suffix, sampler in (("", "the policy (default)"), ("_g2", "the teacher")):
            runs = sized(results, f"sgpo_{teacher}{suffix}", 32)
            if runs:
                lines.append(
                    f"| {TEACHER_LABELS[f'sgpo_{teacher}']} | {sampler} | {with_seeds(runs)} "
                    f"| {finals(runs, 'guided')} "
                    f"| {finals(runs, 'teacher_guided')} "
                    f"| {targets(runs, 1, 10)} / {targets(runs, 71, 80)} | {seed_list(runs)} "
                    f"| {commits(runs)} |")
    return lines


# The paper's claims, each "a row with X beats the row without": (what X is, the paper's average
# with and without, the toy's row with and without). KL clipping: the paper's full method clips
# (delta = 1), the toy's default does not, so "with" is the toy's clipping row.
CLAIMS = [
    ("strategy distillation (without: GRPO only)", (52.1, 49.9), ("sgpo", "grpo_only")),
    ("autonomous GRPO", (52.1, 48.6), ("sgpo", "no_grpo")),
    ("forward KL, not reverse KL", (52.1, 50.9), ("sgpo", "reverse_kl")),
    ("forward KL, not direct SFT on the selected targets", (52.1, 49.3), ("sgpo", "direct_sft")),
    ("KL clipping at delta = 1", (52.1, 48.7), ("kl_clip_1", "sgpo")),
    ("target selection", (52.1, 48.1), ("sgpo", "no_target_selection")),
    ("adaptive alpha, not fixed", (52.1, 50.9), ("sgpo", "fixed_alpha")),
    ("all proximal constraints (1 optimizer step a batch)", (52.1, 45.3), ("sgpo", "no_proximal")),
    ("all proximal constraints (k = 2)", (52.1, 45.3), ("sgpo_k2", "no_proximal_k2")),
    ("all proximal constraints (k = 4)", (52.1, 45.3), ("sgpo_k4", "no_proximal_k4")),
    ("all proximal constraints (teacher with spread, k = 4 x 2 passes, lr {lr})", (52.1, 45.3),
     ("sgpo_spread_lr{lr}", "no_proximal_spread_lr{lr}")),
    ("SGPO, not SFT on the answers then GRPO", (52.1, 49.9), ("sgpo", "sft_grpo")),
    ("SGPO, not SFT on full worked solutions (80 steps each)", (52.1, 42.7),
     ("sgpo", "sft_full_80")),
    ("SGPO, not SFT on full worked solutions (250 steps each)", (52.1, 42.7),
     ("sgpo_250", "sft_full")),
    ("SGPO, not SFT on full traces written otherwise (the best variant)", (52.1, 42.7),
     ("sgpo", "sft_arrangement_lr1e-3")),
]


def verdict(difference: float, spread: float, paper: float) -> str:
    """reproduced / contradicted: the toy's means differ by more than the two rows' standard
    deviations together, in the paper's direction / the other; else not separated."""
    if abs(difference) <= spread:
        return "not separated"
    return "reproduced" if (difference > 0) == (paper > 0) else "**contradicted**"


def claims(results: dict) -> list:
    """Each claim of the paper against the toy's rows, on the seeds both rows ran; the verdict by
    the rule of `verdict`."""
    lines = ["| the paper's claim: the method is better with | paper: with / without | toy: with "
             "| toy: without | seeds | difference | verdict |", "|---|---|---|---|---|---|---|"]
    for claim, paper, rows in CLAIMS:
        with_row, without_row = (row.format(lr=SPREAD_LR) for row in rows)
        by_seed = [{r["seed"]: 100 * final(r) for r in seeds_of(results, row)}
                   for row in (with_row, without_row)]
        seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
        if not seeds:
            continue
        cells = [[side[s] for s in seeds] for side in by_seed]
        sds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cells]
        difference = statistics.mean(cells[0]) - statistics.mean(cells[1])
        lines.append(
            f"| {claim.format(lr=SPREAD_LR)} | {paper[0]} / {paper[1]} "
            + " ".join(f"| {statistics.mean(c):.1f} +- {sd:.1f}" for c, sd in zip(cells, sds))
            + f" | {', '.join(map(str, seeds))} | {difference:+.1f} "
            f"| {verdict(difference, sum(sds), paper[0] - paper[1])} |")
    return lines


TABLES = {"proximal": proximal, "budget": budget, "budget_curve": budget_curve,
          "main": main_table, "imitation": imitation, "ablation": ablation_table,
          "headline": headline, "spread_proximal": spread_proximal,
          "spread_curve": lambda results: spread_curve(results, SPREAD_LR),
          "spread_curve_fast": lambda results: spread_curve(results, "1e-4"),
          "capability": capability, "spread": spread,
          "claims": claims, "adaptive_alpha": adaptive_alpha, "sizes": sizes,
          "teachers": teachers, "who_samples": who_samples}


def render(name: str, results: dict) -> str:
    return "\n".join(TABLES[name](results)) + "\n"


def rewrite(text: str, results: dict) -> str:
    """text with every table block rendered from results."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), results) + m.group(4), text)


def figure() -> None:
    """toy/ablation.png and toy/sizes.png from the results (toy/plot.py; matplotlib is not a
    dependency: skipped without it)."""
    try:
        import matplotlib
    except ImportError:
        print("toy/ablation.png, toy/sizes.png not redrawn: pip install matplotlib",
              file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy import plot
    plot.plot_rows(plt, plot.MAIN, os.path.join(ROOT, "toy", "ablation.png"))
    plot.plot_sizes(plt, os.path.join(ROOT, "toy", "sizes.png"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    results, stale = load_results(), []
    for path in FILES:
        text = open(path).read()
        new = rewrite(text, results)
        if new != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check and stale:
        print(f"tables differ from toy/results in: {', '.join(stale)}", file=sys.stderr)
        return 1
    if not args.check:
        figure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
