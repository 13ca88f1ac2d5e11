"""
The ablation table of the cups testbed: each row is sgpo.py's default run plus flags, over several
seeds; prints greedy held-out accuracy (unguided and guided) after RL, mean +- standard deviation
over seeds, and the unguided accuracy on a generalisation split the training never sees in kind
(7-10 swaps; training has 4-6).

    python toy/ablation.py              # the ablation rows x 3 seeds, ~3 min a run on 2 cores
    python toy/ablation.py --rows sft_solutions sft_grpo sgpo   # the main table in miniature
    # forward KL vs direct SFT, teacher with spread
    python toy/ablation.py --rows sgpo_spread direct_sft_spread
    # a subset; extra sgpo.py flags after --
    python toy/ablation.py --seeds 0 --rows sgpo grpo_only -- --max_steps 40

Finished runs (out/ablation/<row>-seed<k>/metrics.jsonl with its final evaluation) are read, not
rerun; so is their generalisation accuracy (generalisation.json next to them).
"""

import argparse
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
from toy.cups import make_split, notation_spread, spread_warmup  # noqa: E402
from toy.tiny import write_jsonl  # noqa: E402

# SFT on a strong model's solutions: the answer alone, reached "in its head", the way a strong model
# that needs no written working would answer; the small model cannot imitate the computation it does
# not see (toy/README.md).
SFT = ["--sft_epochs", "2", "--sft_data", "{strong}", "--sft_learning_rate", "1e-4"]
# A teacher with real spread (toy/cups.py spread_warmup, built once into <output_dir>/spread, ~12
# min): three notations per working step, so one sampled guided rollout is one of 3^(swaps) valid
# ones.
SPREAD = [
    "--model", "{spread}/model", "--data", "{spread}/train.jsonl", "--eval_data",
    "{spread}/test.jsonl"
]
ROWS = {  # name -> (label, sgpo.py flags)
    "sgpo": ("SGPO (defaults)", []),
    "grpo_only": ("GRPO only", ["--use_kd", "false"]),
    "direct_sft": ("direct SFT on the selected guided targets", ["--kd_loss", "sft"]),
    "reverse_kl": ("reverse KL", ["--kd_loss", "rkl"]),
    "fixed_alpha": ("fixed alpha", ["--adaptive_alpha", "false"]),
    "kl_clip_1": ("KL clipping at the paper's delta = 1", ["--kl_clip", "1"]),
    "no_proximal": (
        "w/o all proximal constraints",
        ["--kl_clip", "inf", "--target_selection", "false", "--kd_trust_region", "false"]
    ),
    "sft_solutions": ("SFT on the strong model's solutions", SFT + ["--max_steps", "0"]),
    "sft_grpo": ("SFT, then GRPO", SFT + ["--use_kd", "false"]),
    "sft_sgpo": ("SFT, then SGPO", SFT),
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
}
DEFAULT_ROWS = ["sgpo", "grpo_only", "direct_sft", "reverse_kl", "fixed_alpha", "kl_clip_1"]


def records(out: str, key: str) -> list:
    """The lines of a run's metrics.jsonl that hold `key` (evaluations: "eval/unguided_acc"; RL
    steps: "entropy")."""
    return [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in m]


def uses_spread(row: str) -> bool:
    """Whether a row runs on the teacher with spread (its model and data)."""
    return ROWS[row][1][: len(SPREAD)] == SPREAD


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
        model, tok = engine.load_model(runtime.latest_checkpoint(out), torch.float32, "cpu")
        cfg = sgpo.Config(max_completion_length=96)  # 10 swaps of working: ~60 tokens
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


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--output_dir", default="out/ablation")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.makedirs(args.output_dir, exist_ok=True)
    # train.jsonl with answer-only solutions
    strong = os.path.join(args.output_dir, "strong_solutions.jsonl")
    train = [
        json.loads(line) for line in open(os.path.join(ROOT, "toy", "cups_data", "train.jsonl"))
    ]
    write_jsonl(strong, [{**q, "solution": f"\\boxed{{{q['answer']}}}"} for q in train])
    small = os.path.join(args.output_dir, "train_128.jsonl")
    write_jsonl(small, train[:128])
    spread, spread_rows = (
        os.path.join(args.output_dir, "spread"), [r for r in args.rows if uses_spread(r)]
    )
    if spread_rows and not os.path.exists(f"{spread}/spread.json"):
        print(f"building the teacher with spread in {spread}", flush=True)
        with open(f"{spread}.log", "w") as log:
            found = spread_warmup(spread, log=lambda line: print(line, file=log, flush=True))
        with open(f"{spread}/spread.json", "w") as f:
            json.dump(found, f)
    splits = generalisation_splits()
    results = {}
    for row in args.rows:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, f"{row}-seed{seed}")
            if final_eval(out) is None:
                flags = [f.format(strong=strong, small=small, spread=spread) for f in ROWS[row][1]]
                cmd = [
                    sys.executable, os.path.join(ROOT, "sgpo.py"), "--seed", str(seed),
                    "--output_dir", out, "--overwrite_output_dir", *flags, *extra
                ]
                print(" ".join(cmd), flush=True)
                os.makedirs(out, exist_ok=True)
                # the run's output (progress bars included)
                with open(os.path.join(out, "log.txt"), "w") as log:
                    subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            results[row, seed] = (*final_eval(out), generalisation(out, splits))
    for warm, rows in (
        (
            "the warm checkpoint",
            [r for r in args.rows if not {"--sft_epochs", "--model"} & set(ROWS[r][1])]
        ),
        ("the teacher with spread", spread_rows),
    ):
        base = [results[row, s][0] for row in rows for s in args.seeds]
        if base:
            print(
                f"seeds {args.seeds}; {warm}, before RL: unguided "
                f"{mean_sd([b['eval/unguided_acc'] for b in base])}, "
                f"guided {mean_sd([b['eval/guided_acc'] for b in base])}"
            )
    if os.path.exists(f"{spread}/spread.json"):
        print(
            f"the teacher with spread samples (guided, temperature 1): "
            f"{open(f'{spread}/spread.json').read()}"
        )
    print(
        "\n| run | flags | unguided | guided | unguided per seed | "
        + " | ".join(f"unguided, {k}" for k in splits)
        + " | entropy, first -> last 10 steps (seed 0) |"
    )
    print("|---" * (6 + len(splits)) + "|")
    for row in args.rows:
        ends = [results[row, s][1] for s in args.seeds]
        flags = (
            " ".join(ROWS[row][1])
            .replace("{strong}", "strong_solutions.jsonl")
            .replace("{small}", "train_128.jsonl")
        )
        flags = flags.replace(" ".join(SPREAD), "--model/--data/--eval_data spread/...") or "-"
        print(
            f"| {ROWS[row][0]} | `{flags}` | {mean_sd([e['eval/unguided_acc'] for e in ends])} "
            f"| {mean_sd([e['eval/guided_acc'] for e in ends])} "
            f"| {' / '.join('%.1f' % (100 * e['eval/unguided_acc']) for e in ends)} "
            "| "
            + " | ".join(mean_sd([results[row, s][2][k] for s in args.seeds]) for k in splits)
            + f" | {entropy(os.path.join(args.output_dir, f'{row}-seed{args.seeds[0]}'))} |"
        )
    test = [json.loads(line) for line in open(f"{spread}/test.jsonl")][:64] if spread_rows else []
    for row in spread_rows:  # does the student keep the teacher's spread?
        for seed in args.seeds:
            model, tok = engine.load_model(
                runtime.latest_checkpoint(os.path.join(args.output_dir, f"{row}-seed{seed}")),
                torch.float32, "cpu"
            )
            print(
                f"{row} seed {seed}: unguided samples at the end: "
                f"{notation_spread(model, tok, test, guided=False)}"
            )
    for row in [r for r in args.rows if r.endswith("_128")]:
        for seed in args.seeds:
            print(
                f"{row} seed {seed}: "
                f"{alpha_report(os.path.join(args.output_dir, f'{row}-seed{seed}'), train[:128])}"
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
