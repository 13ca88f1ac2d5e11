"""
The ablation table of the cups testbed: each row is sgpo.py's default run plus flags, over several
seeds; prints greedy held-out accuracy (unguided and guided) after RL, mean +- standard deviation
over seeds, and the unguided accuracy on generalisation splits the training never sees in kind.

    python toy/ablation.py              # the ablation rows x 3 seeds, ~3 min a run on 2 cores
    python toy/ablation.py --rows main  # the main table in miniature (SGPO vs SFT on answers,
                                        # SFT on full worked solutions, each then GRPO)
    python toy/ablation.py --rows imitation  # SFT on full traces written otherwise than the
                                             # student's way, vs SGPO
    python toy/ablation.py --rows proximal  # the proximal constraints at k = 2 and 4 optimizer
                                            # steps per rollout batch
    # SGPO for SFT's 250 steps, SFT on full worked solutions cut to 20-80 steps
    python toy/ablation.py --rows budget --seeds 0 1 2 3 4
    # the proximal constraints on the teacher with spread, k = 4 x 2 passes, lr 3e-5
    python toy/ablation.py --rows sgpo_spread_lr3e-5 no_trust_region_spread_lr3e-5 \
        no_proximal_spread_lr3e-5 kl_clip_10_spread_lr3e-5 --seeds 0 1 2 3 4
    # SGPO and its baselines from warm checkpoints of guided 71 / 80 / 100 % (built once, ~10 min)
    python toy/ablation.py --rows capability
    python toy/ablation.py --rows sizes # SGPO and its baselines at hidden 32, 64 and 128 (their
                                        # warm checkpoints committed in toy/cups_data)
    python toy/ablation.py --rows teachers  # SGPO with a base and an EMA teacher at each size
    # ... whose guided rollouts the teacher samples, at hidden 32
    python toy/ablation.py --rows sgpo_base_g2_h32 sgpo_ema_g2_h32
    # forward KL vs direct SFT, teacher with spread; SGPO from that teacher trained 300 steps only
    python toy/ablation.py --rows sgpo_spread direct_sft_spread sgpo_spread_short
    # a subset; extra sgpo.py flags after --
    python toy/ablation.py --seeds 0 --rows sgpo grpo_only -- --max_steps 40

Finished runs (out/ablation/<row>-seed<k>/metrics.jsonl with its final evaluation) are read, not
rerun; so is their generalisation accuracy (generalisation.json next to them). Each run records what
it was made from (provenance.json: the commit, whether tracked files differed from it, the row's
flags, the seed, torch's version and threads); a run of a row without extra flags is kept as
toy/results/<row>-seed<k>.json, from which `python toy/tables.py` writes the READMEs' tables.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from toy.cups import (  # noqa: E402
    COMMITTED, SOLUTION_STYLES, capability_warmup, committed_problems, make_split, notation_spread,
    separators, sized_warmup, spread_warmup, strong_solution
)
from toy.tiny import write_jsonl  # noqa: E402

def sft(style: str, lr: str = "1e-4") -> list:
    """SFT on a strong model's solutions written in `style` (toy/cups.py strong_solution): 2 epochs
    of the 2,000 training problems at learning rate lr, unguided prompt -> solution."""
    return ["--sft_epochs", "2", "--sft_data", f"{{strong_{style}}}", "--sft_learning_rate", lr]


# Answer-only solutions: what a strong model that tracks the ball in its head writes; the small
# model cannot imitate the computation it does not see (toy/README.md). Full worked solutions: the
# strong model writes every step; in the strategy's own notation (full), in words (verbose, ~5x
# longer), organised otherwise (arrangement: the whole row of cups after each swap) or ordered
# otherwise (answer_first: the answer, then the working).
SFT = sft("answer")
# A teacher with real spread (toy/cups.py spread_warmup, built once into <output_dir>/spread, ~12
# min): three notations per working step, so one sampled guided rollout is one of 3^(swaps) valid
# ones.
SPREAD = [
    "--model", "{spread}/model", "--data", "{spread}/train.jsonl", "--eval_data",
    "{spread}/test.jsonl"
]
# the teachers with spread built: name in the flags -> (spread_warmup's arguments, what it is); the
# short one is why the teacher is trained to 100 % guided first (toy/README.md)
SPREAD_TEACHERS = {
    "spread": ({}, "the teacher with spread"),
    "spread_short": ({"steps": 300, "lr": 1e-3}, "the teacher with spread trained 300 steps"),
}
ROWS = {  # name -> (label, sgpo.py flags)
    "sgpo": ("SGPO (defaults)", []),
    "grpo_only": ("GRPO only", ["--use_kd", "false"]),
    "direct_sft": ("direct SFT on the selected guided targets", ["--kd_loss", "sft"]),
    "reverse_kl": ("reverse KL", ["--kd_loss", "rkl"]),
    "fixed_alpha": ("fixed alpha", ["--adaptive_alpha", "false"]),
    "kl_clip_1": ("KL clipping at the paper's delta = 1", ["--kl_clip", "1"]),
    "no_grpo": ("w/o autonomous GRPO", ["--use_grpo", "false"]),
    "no_target_selection": ("w/o target selection", ["--target_selection", "false"]),
    "no_proximal": (
        "w/o all proximal constraints",
        ["--kl_clip", "inf", "--target_selection", "false", "--kd_trust_region", "false"]
    ),
    "sft_solutions": ("SFT on the strong model's answers", SFT + ["--max_steps", "0"]),
    "sft_grpo": ("SFT on the answers, then GRPO", SFT + ["--use_kd", "false"]),
    "sft_sgpo": ("SFT on the answers, then SGPO", SFT),
    "sft_full": ("SFT on full worked solutions", sft("full") + ["--max_steps", "0"]),
    "sft_full_grpo": (
        "SFT on full worked solutions, then GRPO", sft("full") + ["--use_kd", "false"]
    ),
    # the workings written otherwise are longer: room for the longest (6 swaps) and its end of turn
    "sft_verbose": (
        "SFT on full worked solutions in words",
        sft("verbose") + ["--max_steps", "0", "--max_completion_length", "192"]
    ),
    "sft_arrangement": (
        "SFT on full worked solutions tracking the whole row of cups",
        sft("arrangement") + ["--max_steps", "0", "--max_completion_length", "64"]
    ),
    # the same at a 10x learning rate: imitation given the chance to fit the other notation
    "sft_verbose_lr1e-3": (
        "SFT on full worked solutions in words, lr 1e-3",
        sft("verbose", "1e-3") + ["--max_steps", "0", "--max_completion_length", "192"]
    ),
    "sft_arrangement_lr1e-3": (
        "SFT on full worked solutions tracking the whole row of cups, lr 1e-3",
        sft("arrangement", "1e-3") + ["--max_steps", "0", "--max_completion_length", "64"]
    ),
    "sft_answer_first": (
        "SFT on full worked solutions, answer first", sft("answer_first") + ["--max_steps", "0"]
    ),
    # adaptive alpha needs revisits: 128 problems, 16 a step, 80 steps = 10 epochs
    "sgpo_128": ("SGPO, 128 problems x 10 epochs", ["--data", "{small}"]),
    "fixed_alpha_128": (
        "fixed alpha, 128 problems x 10 epochs", ["--data", "{small}", "--adaptive_alpha", "false"]
    ),
    "sgpo_spread": ("SGPO (forward KL), teacher with spread", SPREAD),
    "direct_sft_spread": (
        "direct SFT on the selected guided targets, teacher with spread",
        SPREAD + ["--kd_loss", "sft"]
    ),
    "sgpo_spread_short": (
        "SGPO, teacher with spread trained 300 steps at lr 1e-3",
        [f.replace("{spread}", "{spread_short}") for f in SPREAD]
    ),
}
# Base capability: the testbed at other model sizes (hidden units; toy/cups.py sized_warmup, the
# committed checkpoint's data and warm-up recipe). The warm models the results start from are
# committed (toy/cups_data/size-<hidden>/model, at one thread); a size without one is built once
# into <output_dir>/size-<hidden>.
# Each size runs SGPO and its baselines from its own warm checkpoint. Warm-up learning rate per
# size: hidden 128 stalled at 3e-3 (loss 0.149 at step 800 of 1200, guided 32 %; toy/README.md).
SIZES = {32: 3e-3, 128: 1e-3}
ALL_SIZES = sorted((64, *SIZES))
SIZE_ROWS = ("sgpo", "grpo_only", "sft_full")  # at hidden 64: these rows themselves


def at_size(row: str, hidden: int) -> str:
    """A row's name at one model size (hidden 64 is the committed checkpoint: the row itself)."""
    return row if hidden == 64 else f"{row}_h{hidden}"


# the RL learning rate was chosen at hidden 64: does SGPO at another size need another one? (with
# the live teacher, and with a base one: rows defined with the teachers below)
ROWS["sgpo_lr3e-5"] = ("SGPO, lr 3e-5", ["--learning_rate", "3e-5"])
for hidden in SIZES:
    for row in (*SIZE_ROWS, "sgpo_lr3e-5"):
        label, flags = ROWS[row]
        ROWS[at_size(row, hidden)] = (
            f"{label}, hidden {hidden}", ["--model", f"{{size_{hidden}}}/model", *flags]
        )


# A teacher that keeps its guided skill (--teacher): the policy as RL starts (base) or a moving
# average of its weights (ema), at each size; and the guided rollouts sampled by that teacher.
TEACHERS = ("base", "ema")
for teacher in TEACHERS:
    ROWS[f"sgpo_{teacher}"] = (f"SGPO, {teacher} teacher", ["--teacher", teacher])
    ROWS[f"sgpo_{teacher}_g2"] = (
        f"SGPO, {teacher} teacher sampling the guided rollouts",
        ["--teacher", teacher, "--teacher_samples_guided", "true"]
    )
    ROWS[f"sgpo_{teacher}_lr3e-5"] = (
        f"SGPO, {teacher} teacher, lr 3e-5", ["--teacher", teacher, "--learning_rate", "3e-5"]
    )
    for hidden in SIZES:
        for row in (f"sgpo_{teacher}", f"sgpo_{teacher}_g2", f"sgpo_{teacher}_lr3e-5"):
            label, flags = ROWS[row]
            ROWS[at_size(row, hidden)] = (
                f"{label}, hidden {hidden}", ["--model", f"{{size_{hidden}}}/model", *flags]
            )


def size_of(row: str) -> int:
    """The hidden size of the warm checkpoint a row starts from (64: the committed one)."""
    for hidden in SIZES:
        if f"{{size_{hidden}}}/model" in ROWS[row][1]:
            return hidden
    return 64


def size_rows(hidden: int) -> list:
    """SGPO and its baselines at one model size."""
    return [at_size(row, hidden) for row in SIZE_ROWS]


# Several optimizer steps per rollout batch (--steps_per_generation k, each of k mini-batches of
# 16 / k problems): after the first step the ratios leave 1, so the GRPO clip and the KD trust
# region can act. KL clipping at delta = 10: a delta the first working token's D_t may stay under
# (delta = 1 blocks the transfer here).
PROXIMAL = {
    "sgpo": ("SGPO", []),
    "no_trust_region": ("w/o trust region", ["--kd_trust_region", "false"]),
    "no_proximal": ("w/o all proximal constraints", ROWS["no_proximal"][1]),
    "kl_clip_10": ("KL clipping at delta = 10", ["--kl_clip", "10"]),
}
STEPS_PER_GENERATION = (2, 4)
for k in STEPS_PER_GENERATION:
    for row, (label, flags) in PROXIMAL.items():
        ROWS[f"{row}_k{k}"] = (f"{label}, k = {k}", [*flags, "--steps_per_generation", str(k)])

# The proximal constraints where the teacher has spread: k = 4 mini-batches per rollout batch and
# 2 passes over it (8 optimizer steps a batch), so the ratios move far from 1, at each learning rate
# tried (toy/README.md); every problem's first unguided and guided sample logged each step
# (--log_completions 16), whose separators give the notations' entropy over steps.
SPREAD_LRS = ("3e-5", "5e-5", "1e-4")
for lr in SPREAD_LRS:
    for row, (label, flags) in PROXIMAL.items():
        ROWS[f"{row}_spread_lr{lr}"] = (
            f"{label}, teacher with spread, k = 4 x 2 passes, lr {lr}",
            [*SPREAD, *flags, "--steps_per_generation", "4", "--num_iterations", "2",
             "--learning_rate", lr, "--log_completions", "16"]
        )

# The budget matched: SGPO for the SFT row's 250 optimizer steps over 4,000 examples (2 epochs of
# the 2,000 problems), evaluated every 20 steps, and SFT on full worked solutions cut to 20, 40, 60
# and SGPO's 80 steps, one epoch of the first 16 x steps problems (80 steps: SGPO's 1,280)
BUDGET_STEPS = (20, 40, 60, 80)
# (style, steps): the cut SFT rows, full worked solutions at each budget and the answers at 80
SFT_CUTS = [("full", steps) for steps in BUDGET_STEPS] + [("answer", 80)]
SFT_ROW = {"full": "sft_full", "answer": "sft_solutions"}  # each style's 2-epoch row
ROWS["sgpo_250"] = ("SGPO, 250 steps", ["--max_steps", "250", "--eval_steps", "20"])
for style, steps in SFT_CUTS:
    ROWS[f"sft_{style}_{steps}"] = (
        f"{ROWS[SFT_ROW[style]][0]}, {steps} steps",
        ["--sft_epochs", "1", "--sft_data", f"{{strong_{style}_{16 * steps}}}",
         "--sft_learning_rate", "1e-4", "--max_steps", "0"]
    )

# Base capability at one size: the committed warm-up's recipe re-run and saved where its guided
# accuracy first reaches 60 and 80 % (toy/cups.py capability_warmup, built once into
# <output_dir>/capability); the committed checkpoint, the same warm-up's end, is the 100 % level.
# At each level SGPO (live and base teacher), GRPO only and both SFT baselines at SGPO's budget (80
# steps, 1,280 problems).
CAPABILITIES = (60, 80)
CAPABILITY_ROWS = ("sgpo", "sgpo_base", "grpo_only", "sft_full_80", "sft_answer_80")
for level in CAPABILITIES:
    for row in CAPABILITY_ROWS:
        label, flags = ROWS[row]
        ROWS[f"{row}_g{level}"] = (
            f"{label}, warm-up at guided {level} %",
            ["--model", f"{{capability}}/guided-{level}", *flags]
        )

DEFAULT_ROWS = [
    "sgpo", "grpo_only", "direct_sft", "reverse_kl", "fixed_alpha", "kl_clip_1", "no_grpo",
    "no_target_selection"
]
GROUPS = {  # --rows names a group for its rows
    "main": ["sgpo", "sft_solutions", "sft_grpo", "sft_sgpo", "no_proximal", "sft_full",
             "sft_full_grpo"],
    "imitation": ["sgpo", "sft_full", "sft_full_grpo", "sft_verbose", "sft_verbose_lr1e-3",
                  "sft_arrangement", "sft_arrangement_lr1e-3", "sft_answer_first"],
}
GROUPS["budget"] = ["sgpo", "sgpo_250", *(f"sft_full_{s}" for s in BUDGET_STEPS), "sft_full"]
GROUPS["proximal"] = [f"{row}_k{k}" for k in STEPS_PER_GENERATION for row in PROXIMAL]
GROUPS["spread_proximal"] = [f"{row}_spread_lr{lr}" for lr in SPREAD_LRS for row in PROXIMAL]
GROUPS["capability"] = [
    f"{row}_g{level}" for level in CAPABILITIES for row in CAPABILITY_ROWS
] + list(CAPABILITY_ROWS)
GROUPS["sizes"] = []
GROUPS["teachers"] = []
for hidden in ALL_SIZES:
    GROUPS["sizes"] += size_rows(hidden)
    GROUPS["teachers"] += [at_size(f"sgpo_{teacher}", hidden) for teacher in TEACHERS]


RESULTS = os.path.join(ROOT, "toy", "results")
# the per-step metrics a result keeps (the tables' entropy and proximal columns)
SERIES = ("entropy", "kd/target_frac", "late/clip_ratio", "late/kd/ratio_out_frac",
          "late/kd/kl_clip_frac")


def provenance(row: str, seed: int, args) -> dict:
    """What a run is made from: the commit and whether tracked files differ from it, the row's
    flags (as ROWS holds them) and extra flags, the seed, torch's version and threads."""
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "row": row, "seed": seed, "flags": ROWS[row][1], "extra": args.extra,
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "threads": args.threads
    }


def result(out: str, splits: dict) -> dict:
    """A finished run as toy/results keeps it: its provenance, every held-out evaluation, the
    generalisation splits, SERIES step by step and the warm-up's last loss."""
    steps = records(out, "entropy")
    sft = records(out, "loss/sft")
    made = json.load(open(os.path.join(out, "provenance.json")))
    spread = made["row"] in ROWS and uses_spread(made["row"])
    return {
        **made,
        **({"spread": spread_report(out)} if spread else {}),
        "evals": [
            {"step": e["step"], "unguided": e["eval/unguided_acc"], "guided": e["eval/guided_acc"],
             # a teacher of its own weights (--teacher base / ema): its guided accuracy
             **({"teacher_guided": e["eval/teacher_guided_acc"]}
                if "eval/teacher_guided_acc" in e else {})}
            for e in records(out, "eval/unguided_acc")
        ],
        "generalisation": generalisation(out, splits),
        "series": {k: [round(m[k], 6) for m in steps if k in m] for k in SERIES},
        "sft_loss_last": sft[-1]["loss/sft"] if sft else None,
    }


def records(out: str, key: str) -> list:
    """The lines of a run's metrics.jsonl that hold `key` (evaluations: "eval/unguided_acc"; RL
    steps: "entropy")."""
    return [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in m]


def spread_report(out: str) -> dict:
    """How a run on the teacher with spread writes its working (cached in out/spread.json): the
    final weights' samples on 64 test problems (cups.py notation_spread), unguided and guided,
    and, with --log_completions, the separator entropy (bits) of each step's logged samples, the
    first unguided and the first guided one of each problem."""
    path = os.path.join(out, "spread.json")
    if os.path.exists(path):
        return json.load(open(path))
    ckpt = runtime.latest_checkpoint(out)
    model, tok = engine.load_model(ckpt, torch.float32, "cpu")
    data = json.load(open(os.path.join(ckpt, "sgpo_config.json")))["eval_data"]
    test = [json.loads(line) for line in open(data)][:64]
    report = {
        mode: notation_spread(model, tok, test, guided=mode == "guided")
        for mode in ("unguided", "guided")
    }
    logged = os.path.join(out, "completions.jsonl")
    by_step = {}
    for line in open(logged) if os.path.exists(logged) else []:
        sample = json.loads(line)
        by_step.setdefault(sample["step"], []).append(sample)
    report["steps"] = {
        mode: [
            round(separators([s[f"{mode}_sample"] or "" for s in samples])
                  ["separator_entropy_bits"], 4)
            for samples in by_step.values()
        ]
        for mode in ("autonomous", "guided")
    }
    with open(path, "w") as f:
        json.dump(report, f)
    return report


def uses_capability(row: str) -> bool:
    """Whether a row starts from a warm checkpoint of less guided skill (capability_warmup)."""
    return "{capability}" in " ".join(ROWS[row][1])


def spread_teacher(row: str):
    """The teacher with spread a row runs on (its model and data: a name in SPREAD_TEACHERS), or
    None."""
    flags = ROWS[row][1]
    return next((name for name in SPREAD_TEACHERS if flags[:2] == ["--model", f"{{{name}}}/model"]),
                None)


def uses_spread(row: str) -> bool:
    """Whether a row runs on a teacher with spread."""
    return spread_teacher(row) is not None


def final_eval(out: str):
    """(eval before RL, eval at the end) of a run in out, or None if it has not finished."""
    ckpt = runtime.latest_checkpoint(out)
    if (
        ckpt is None
        or int(ckpt.rsplit("-", 1)[1])
        != json.load(open(os.path.join(ckpt, "sgpo_config.json")))["max_steps"]
    ):
        return None
    evals = records(out, "eval/unguided_acc")
    return evals[0], evals[-1]


def generalisation_splits() -> dict:
    """Held-out problems unlike the training ones in kind (training: 'Ball under cup S. Swaps: ...
    Which cup?', 4-6 swaps): longer sequences, and the same lengths written differently. No
    strategy: unguided accuracy only."""
    longer = make_split(106, seed=3, prefix="long", swaps_range=(7, 10))
    same = make_split(106, seed=4, prefix="reworded")
    return {
        "7-10 swaps": longer,
        "start written out": [
            {**q, "problem": q["problem"].replace("Ball under", "The ball starts under")}
            for q in same
        ],
        "question reworded": [
            {**q, "problem": q["problem"].replace("Which cup?", "Where is the ball now?")}
            for q in same
        ],
    }


def generalisation(out: str, splits: dict) -> dict:
    """{split: unguided greedy accuracy} of a finished run's final weights (cached in
    out/generalisation.json)."""
    path = os.path.join(out, "generalisation.json")
    done = (
        {k: v for k, v in json.load(open(path)).items() if k in splits}
        if os.path.exists(path)
        else {}
    )
    if set(splits) - set(done):
        ckpt = runtime.latest_checkpoint(out)
        model, tok = engine.load_model(ckpt, torch.float32, "cpu")
        # 10 swaps of working: ~60 tokens in the strategy's notation; twice the run's room for 4-6
        length = json.load(open(os.path.join(ckpt, "sgpo_config.json")))["max_completion_length"]
        cfg = sgpo.Config(max_completion_length=max(96, 2 * length))
        for name in set(splits) - set(done):
            problems = [{**q, "strategy": ""} for q in splits[name]]
            accuracy = engine.greedy_accuracy(model, tok, problems, cfg, "cpu")
            done[name] = accuracy["eval/unguided_acc"]
        with open(path, "w") as f:
            json.dump(done, f, indent=1)
    return done


def entropy(out: str) -> str:
    """Mean per-token entropy of the unguided rollouts over the first and the last 10 RL steps ('-'
    without RL)."""
    steps = [m["entropy"] for m in records(out, "entropy")]
    return (
        f"{statistics.mean(steps[:10]):.2f} -> {statistics.mean(steps[-10:]):.2f}" if steps else "-"
    )


def mean_sd(values):
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {sd:.1f}"


def write_once(path: str, rows: list) -> None:
    """write_jsonl through a temporary file, so that a run of another ablation.py process reading
    the same path never sees it half written."""
    write_jsonl(f"{path}.tmp{os.getpid()}", rows)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def prepare_inputs(output_dir: str, rows: list) -> dict:
    """What the rows' flags name ({strong_full}, {small}, {spread}, {size_32}, ...), written into
    output_dir: the training problems with a strong model's solutions in each style, the first 128
    problems, and the checkpoints built once (the teacher with spread, the other model sizes)."""
    train = committed_problems("train.jsonl")
    paths = {"small": os.path.join(output_dir, "train_128.jsonl")}
    write_once(paths["small"], train[:128])
    solved = {}  # style -> the training problems with its solutions
    for style in SOLUTION_STYLES:
        solved[style] = [{**q, "solution": strong_solution(q, style)} for q in train]
        paths[f"strong_{style}"] = os.path.join(output_dir, f"strong_{style}.jsonl")
        write_once(paths[f"strong_{style}"], solved[style])
    # the budget rows' SFT data: the first problems of the solutions
    for style, steps in SFT_CUTS:
        name = f"strong_{style}_{16 * steps}"
        paths[name] = os.path.join(output_dir, f"{name}.jsonl")
        write_once(paths[name], solved[style][:16 * steps])
    for name, (recipe, what) in SPREAD_TEACHERS.items():
        paths[name] = spread = os.path.join(output_dir, name)
        needed = any(spread_teacher(row) == name for row in rows)
        if needed and not os.path.exists(f"{spread}/spread.json"):
            print(f"building {what} in {spread}", flush=True)
            with open(f"{spread}.log", "w") as log:
                found = spread_warmup(
                    spread, **recipe, log=lambda line: print(line, file=log, flush=True)
                )
            with open(f"{spread}/spread.json", "w") as f:
                json.dump(found, f)
    paths["capability"] = capability = os.path.join(output_dir, "capability")
    if any(map(uses_capability, rows)) and not os.path.exists(f"{capability}/levels.json"):
        print(f"building the warm checkpoints of less guided skill in {capability}", flush=True)
        with open(f"{capability}.log", "w") as log:
            levels = capability_warmup(
                capability, CAPABILITIES, log=lambda line: print(line, file=log, flush=True)
            )
        with open(f"{capability}/levels.json", "w") as f:
            json.dump(levels, f)
    for hidden in SIZES:
        if os.path.exists(f"{COMMITTED}/size-{hidden}/model"):
            paths[f"size_{hidden}"] = f"{COMMITTED}/size-{hidden}"
            continue
        paths[f"size_{hidden}"] = size = os.path.join(output_dir, f"size-{hidden}")
        needed = any(size_of(row) == hidden for row in rows)
        # test.jsonl is written last
        if needed and not os.path.exists(f"{size}/test.jsonl"):
            print(f"building the warm checkpoint of hidden {hidden} in {size}", flush=True)
            with open(f"{size}.log", "w") as log:
                sized_warmup(
                    size, hidden, SIZES[hidden], log=lambda line: print(line, file=log, flush=True)
                )
    return paths


def start_of(row: str) -> str:
    """The checkpoint a row's RL starts from, as the report names it ("" when it warms up with SFT
    first)."""
    flags = ROWS[row][1]
    if "--sft_data" in flags:
        return ""
    if uses_spread(row):
        return SPREAD_TEACHERS[spread_teacher(row)][1]
    if uses_capability(row):
        return f"the warm-up at guided {row.rsplit('_g', 1)[1]} %"
    if size_of(row) != 64:
        return f"the warm checkpoint of hidden {size_of(row)}"
    return "the warm checkpoint"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=[*ROWS, *GROUPS])
    parser.add_argument("--output_dir", default="out/ablation")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of each run (1: the results files'; another count splits "
        "floating-point sums otherwise, and a seed's run can part from step ~60 on)"
    )
    args, extra = parser.parse_known_args()
    args.extra = extra = [a for a in extra if a != "--"]
    # (the generalisation splits' greedy decoding too)
    torch.set_num_threads(args.threads)
    args.rows = list(dict.fromkeys(sum((GROUPS.get(row, [row]) for row in args.rows), [])))
    os.makedirs(args.output_dir, exist_ok=True)
    paths = prepare_inputs(args.output_dir, args.rows)
    spread_rows = [r for r in args.rows if uses_spread(r)]
    splits = generalisation_splits()
    results = {}
    for row in args.rows:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, f"{row}-seed{seed}")
            if final_eval(out) is None:
                flags = [f.format(**paths) for f in ROWS[row][1]]
                cmd = [
                    sys.executable, os.path.join(ROOT, "sgpo.py"), "--seed", str(seed),
                    "--output_dir", out, "--overwrite_output_dir", *flags, *extra
                ]
                print(" ".join(cmd), flush=True)
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "provenance.json"), "w") as f:
                    json.dump(provenance(row, seed, args), f, indent=1)
                # the run's output (progress bars included)
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                       "MKL_NUM_THREADS": str(args.threads)}
                with open(os.path.join(out, "log.txt"), "w") as log:
                    subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
            results[row, seed] = (*final_eval(out), generalisation(out, splits))
            if not extra and os.path.exists(os.path.join(out, "provenance.json")):
                os.makedirs(RESULTS, exist_ok=True)
                with open(os.path.join(RESULTS, f"{row}-seed{seed}.json"), "w") as f:
                    json.dump(result(out, splits), f, indent=None)
                    f.write("\n")
    base = {}  # the evaluations before RL, by starting checkpoint
    for row in args.rows:
        base.setdefault(start_of(row), []).extend(results[row, s][0] for s in args.seeds)
    for start, evals in base.items():
        if start:
            print(
                f"seeds {args.seeds}; {start}, before RL: unguided "
                f"{mean_sd([b['eval/unguided_acc'] for b in evals])}, "
                f"guided {mean_sd([b['eval/guided_acc'] for b in evals])}"
            )
    for name in dict.fromkeys(map(spread_teacher, spread_rows)):
        print(
            f"{SPREAD_TEACHERS[name][1]} samples (guided, temperature 1): "
            f"{open(os.path.join(paths[name], 'spread.json')).read()}"
        )
    print(
        "\n| run | flags | unguided | guided | unguided per seed | "
        + " | ".join(f"unguided, {k}" for k in splits)
        + " | entropy, first -> last 10 steps (seed 0) |"
    )
    print("|---" * (6 + len(splits)) + "|")
    for row in args.rows:
        ends = [results[row, s][1] for s in args.seeds]
        flags = " ".join(ROWS[row][1])
        flags = flags.replace(" ".join(SPREAD), "--model/--data/--eval_data {spread}/...")
        flags = flags.format(**{k: os.path.relpath(v, args.output_dir) for k, v in paths.items()})
        flags = flags or "-"
        print(
            f"| {ROWS[row][0]} | `{flags}` | {mean_sd([e['eval/unguided_acc'] for e in ends])} "
            f"| {mean_sd([e['eval/guided_acc'] for e in ends])} "
            f"| {' / '.join('%.1f' % (100 * e['eval/unguided_acc']) for e in ends)} "
            "| "
            + " | ".join(mean_sd([results[row, s][2][k] for s in args.seeds]) for k in splits)
            + f" | {entropy(os.path.join(args.output_dir, f'{row}-seed{args.seeds[0]}'))} |"
        )
    for hidden in ALL_SIZES:
        model = paths[f"size_{hidden}"] if hidden in SIZES else COMMITTED
        print_gain(hidden, os.path.join(model, "model"), results, args.seeds)
    for row in spread_rows:  # does the student keep the teacher's spread?
        for seed in args.seeds:
            report = spread_report(os.path.join(args.output_dir, f"{row}-seed{seed}"))
            print(f"{row} seed {seed}: unguided samples at the end: {report['unguided']}")
    small = [json.loads(line) for line in open(paths["small"])]
    for row in [r for r in args.rows if "{small}" in ROWS[r][1]]:  # 128 problems x 10 epochs
        for seed in args.seeds:
            print(
                f"{row} seed {seed}: "
                f"{alpha_report(os.path.join(args.output_dir, f'{row}-seed{seed}'), small)}"
            )


def print_gain(hidden: int, model: str, results: dict, seeds: list) -> None:
    """SGPO's gain in unguided accuracy over its best baseline at one model size (its warm
    checkpoint: model), if every row of that size ran: results maps (row, seed) to (evaluation
    before RL, at the end, generalisation)."""
    rows = size_rows(hidden)
    if not set(itertools.product(rows, seeds)) <= set(results):
        return
    accuracy = {row: [100 * results[row, s][1]["eval/unguided_acc"] for s in seeds] for row in rows}
    best = max(rows[1:], key=lambda row: statistics.mean(accuracy[row]))
    # seed by seed: the runs of one seed share their sampling seed
    gains = [a - b for a, b in zip(accuracy[rows[0]], accuracy[best])]
    weights = engine.load_model(model, torch.float32, "cpu")[0].named_parameters()
    size = sum(w.numel() for name, w in weights if "embed_tokens" not in name)
    print(
        f"hidden {hidden} ({size:,} non-embedding parameters): SGPO "
        f"{statistics.mean(accuracy[rows[0]]):.1f}, best baseline {ROWS[best][0]} "
        f"{statistics.mean(accuracy[best]):.1f}, gain {statistics.mean(gains):+.1f} "
        f"(per seed {' / '.join(f'{g:+.1f}' for g in gains)})"
    )


def alpha_report(out: str, problems: list) -> str:
    """How alpha moved in a run: the batch mean every 10 steps, and at the end the mean alpha of the
    training problems the final policy solves unguided (greedy) vs those it does not."""
    curve = [m["alpha/mean"] for m in records(out, "alpha/mean")]
    ckpt = runtime.latest_checkpoint(out)
    alpha = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["alpha"]
    model, tok = engine.load_model(ckpt, torch.float32, "cpu")
    cfg, solved = sgpo.Config(), {True: [], False: []}
    outs = engine.generate(
        model, [engine.prompt_ids(tok, cfg, q, False) for q in problems], tok.pad_token_id,
        model.generation_config.eos_token_id, "cpu", 0.0, cfg.max_completion_length
    )
    for q, o in zip(problems, outs):
        solved[
            reward.math_reward(tok.decode(o["ids"], skip_special_tokens=True), q["answer"]) > 0
        ].append(alpha[q["id"]])
    return (
        f"alpha/mean every 10 steps: {' '.join(f'{a:.2f}' for a in curve[::10] + curve[-1:])}; at "
        f"the end, solved "
        f"unguided: {statistics.mean(solved[True] or [0]):.2f} ({len(solved[True])} problems), "
        f"not solved: "
        f"{statistics.mean(solved[False] or [0]):.2f} ({len(solved[False])})"
    )


if __name__ == "__main__":
    main()
