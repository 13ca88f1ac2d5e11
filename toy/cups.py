"""
A CPU testbed for SGPO: the ball-under-cups family. "Ball under cup 2. Swaps: 13 12 23. Which cup?"
The strategy, "after each swap write the swap and where the ball is", makes the answer easy to
derive ("13:2 12:1 23:1 \\boxed{1}"); without it a tiny model can only guess. The warm-up below
teaches a tiny character-level Qwen3 to follow the strategy when the prompt gives it, and to answer
directly (weakly) when it does not: the regime SGPO is for. Answers are graded by the same
math-verify reward as real data.

    # regenerates toy/cups_data/{model,train.jsonl,test.jsonl} (fixed seed, ~8 min on 2 cores)
    python toy/cups.py

A variant whose teacher has real spread (toy/ablation.py builds it on demand; see spread_warmup):
each swap's step may be written in three notations, 13:2, 13>2 or 13=2, drawn independently, so a
problem of 5 swaps has 3^5 valid workings and one sampled guided rollout is one of many.
"""

import copy
import json
import math
import os
import random
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from toy.tiny import build_model, build_tokenizer, write_jsonl  # noqa: E402

STRATEGY = (
    "After each swap, write the swap and the cup the ball is under now, like 13:2. "
    "The last cup is the answer."
)
SPREAD_STRATEGY = (
    "After each swap, write the swap and the cup the ball is under now, like 13:2, 13>2 or 13=2. "
    "The last cup is the answer."
)
NOTATIONS = ":>="  # the spread variant's separators between a swap and the cup after it


def make_problem(rng: random.Random, idx: int, prefix: str, swaps_range=(4, 6)) -> dict:
    """One instance: a start cup and 4-6 (swaps_range) swaps of two of the three cups."""
    start = cup = rng.randint(1, 3)
    swaps, steps = [], []
    for _ in range(rng.randint(*swaps_range)):
        a, b = sorted(rng.sample([1, 2, 3], 2))
        cup = b if cup == a else a if cup == b else cup
        swaps.append(f"{a}{b}")
        steps.append(f"{a}{b}:{cup}")
    return {
        "id": f"{prefix}-{idx}",
        "problem": f"Ball under cup {start}. Swaps: {' '.join(swaps)}. Which cup?",
        "answer": str(cup), "strategy": STRATEGY, "solution": f"{' '.join(steps)} \\boxed{{{cup}}}"
    }


def make_split(n: int, seed: int, prefix: str, swaps_range=(4, 6)) -> list:
    rng = random.Random(seed)
    return [make_problem(rng, i, prefix, swaps_range) for i in range(n)]


PROBLEM = re.compile(r"cup (\d)\. Swaps: ([\d ]+)\.")
SOLUTION_STYLES = ("answer", "full", "verbose", "arrangement", "answer_first")


def strong_solution(problem: dict, style: str) -> str:
    """How a strong solver writes the solution of a cups problem (the SFT baselines' targets), for
    "Ball under cup 2. Swaps: 13 12. Which cup?":
      answer       the answer alone, the ball tracked in its head: \\boxed{1}
      full         every swap and the cup after it, in the strategy's notation: 13:2 12:1 \\boxed{1}
      verbose      the same steps in words, ~5x longer:
                   swap 1 and 3, ball under 2. swap 1 and 2, ball under 1. so \\boxed{1}
      arrangement  organised otherwise: the whole row of cups after each swap (which starting cup
                   stands where), the ball's cup read off at the end: 13>321 12>231 2@1 \\boxed{1}
      answer_first ordered otherwise: the answer, then the working that justifies it:
                   \\boxed{1} since 13:2 12:1
    """
    start, swaps = PROBLEM.search(problem["problem"]).groups()
    cup, row, states = int(start), "123", []
    for swap in swaps.split():
        a, b = int(swap[0]), int(swap[1])
        cup = b if cup == a else a if cup == b else cup
        cells = list(row)
        cells[a - 1], cells[b - 1] = cells[b - 1], cells[a - 1]
        row = "".join(cells)
        states.append((swap, cup, row))
    if style == "answer":
        working = []
    elif style == "full":
        working = [f"{swap}:{cup}" for swap, cup, _ in states]
    elif style == "verbose":
        working = [f"swap {s[0]} and {s[1]}, ball under {c}." for s, c, _ in states] + ["so"]
    elif style == "arrangement":
        working = [f"{swap}>{row}" for swap, _, row in states] + [f"{start}@{row.index(start) + 1}"]
    else:
        return " ".join([f"\\boxed{{{cup}}}", "since"] + [f"{s}:{c}" for s, c, _ in states])
    return " ".join(working + [f"\\boxed{{{cup}}}"])


def spread_working(solution: str, rng: random.Random) -> str:
    """The worked solution with each step's separator drawn from NOTATIONS: '12:2 13:3 \\boxed{3}'
    -> '12>2 13=3 ...'."""
    return re.sub(r"(?<=\d\d):(?=\d)", lambda _: rng.choice(NOTATIONS), solution)


def warmup(
    train, test, steps=1200, batch=64, lr=3e-3, seed=0, log=print, model=None, tok=None,
    working=None, hidden=64, watch=None
):
    """SFT: guided prompt -> working + answer; unguided prompt -> the answer alone (weak without
    working).
    model/tok: continue from these instead of a fresh model (else a fresh one of `hidden` units,
    3 layers); working(solution): the guided target, redrawn each time an example is picked
    (default: the solution as written); watch(step, model, tok): called after every optimizer step,
    ends the warm-up when it returns True (it must draw no random number: greedy evaluations, copies
    of the weights; the run stays the unwatched one)."""
    torch.manual_seed(seed)
    if model is None:
        tok = build_tokenizer()
        model = build_model(tok, hidden=hidden, layers=3, seed=seed)
    cfg = sgpo.Config(micro_batch_size=batch, kd_chunk_size=4096)
    eos = tok.eos_token_id
    # prompts tokenized once (the chat template is slow); the responses per pick, as `working` may
    # redraw them
    examples = [
        (engine.prompt_ids(tok, cfg, q, guided), q, guided)
        for q in train
        for guided in (True, False)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.1, 1 - s / steps)
    )
    policy, rng, t0 = sgpo.Policy.of(model, tok, "cpu"), random.Random(seed), time.time()
    for step in range(1, steps + 1):
        picked = [
            (p, (working or str)(q["solution"]) if guided else f"\\boxed{{{q['answer']}}}")
            for p, q, guided in rng.sample(examples, batch)
        ]
        picked = [(p, tok(r, add_special_tokens=False)["input_ids"] + [eos]) for p, r in picked]
        n_tok = sum(len(r) for _, r in picked)
        rows = [sgpo.Row(p, r, weight=1.0 / n_tok) for p, r in picked]
        model.train()
        stats = runtime.Stats()
        sgpo.accumulate_gradients(policy, rows, cfg, stats)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps:
            model.eval()
            accuracy = engine.greedy_accuracy(model, tok, test[:128], cfg, "cpu")
            log(json.dumps({"step": step, "loss": round(stats.sums["loss/sft"], 4),
                            "time_s": round(time.time() - t0), **accuracy}))
        if watch and watch(step, model, tok):
            break
    return model, tok


def separators(texts: list) -> dict:
    """The separators of the working steps written in texts: the count of each, the entropy of their
    shares (log2(3) = 1.58 bits when uniform) and the share of texts that mix notations."""
    steps = [re.findall(rf"\d\d([{re.escape(NOTATIONS)}])\d", t) for t in texts]
    counts = {c: sum(seps.count(c) for seps in steps) for c in NOTATIONS}
    shares = [n / max(1, sum(counts.values())) for n in counts.values()]
    return {
        "separators": counts,
        "separator_entropy_bits": -sum(p * math.log2(p) for p in shares if p > 0),
        "rollouts_mixing_notations": sum(len(set(seps)) > 1 for seps in steps) / len(texts),
    }


def notation_spread(model, tok, problems, guided: bool, seed: int = 0) -> dict:
    """How a policy writes its working steps when sampling (temperature 1, one rollout per problem):
    the count of each separator and the entropy of their shares (log2(3) = 1.58 bits when uniform),
    the share of rollouts that mix notations, and the mean per-token -log p (a Monte-Carlo estimate
    of the per-token entropy)."""
    model.eval()
    torch.manual_seed(seed)
    cfg = sgpo.Config()
    outs = engine.generate(
        model, [engine.prompt_ids(tok, cfg, q, guided) for q in problems], tok.pad_token_id,
        [tok.eos_token_id], "cpu", 1.0, cfg.max_completion_length
    )
    texts = [tok.decode(o["ids"], skip_special_tokens=True) for o in outs]
    return {
        **separators(texts),
        "mean_token_nll": -float(sum(o["sampler_logps"].sum() for o in outs))
        / sum(len(o["ids"]) for o in outs),
    }


COMMITTED = os.path.join(ROOT, "toy", "cups_data")  # the committed testbed (python toy/cups.py)


def committed_problems(name: str) -> list:
    """The committed testbed's problems: name is train.jsonl or test.jsonl."""
    return [json.loads(line) for line in open(os.path.join(COMMITTED, name))]


def save_testbed(out: str, model, tok, train: list, test: list) -> None:
    """A testbed's files: out/model (weights and tokenizer), out/train.jsonl and out/test.jsonl
    (written last: its presence says the testbed is complete)."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    write_jsonl(os.path.join(out, "test.jsonl"), test)


def spread_warmup(out: str, steps: int = 600, lr: float = 3e-3, seed: int = 0, log=print) -> dict:
    """The spread variant's teacher: the committed warm checkpoint trained `steps` more with
    SPREAD_STRATEGY in the guided prompts and a separator drawn per step in their workings (unguided
    prompts: the answer alone, as before). Writes out/{model, train.jsonl, test.jsonl}
    (toy/cups_data's problems, strategy replaced); returns the teacher's notation_spread on 64 test
    problems."""
    train, test = (
        [{**q, "strategy": SPREAD_STRATEGY} for q in committed_problems(name)]
        for name in ("train.jsonl", "test.jsonl")
    )
    model, tok = engine.load_model(os.path.join(COMMITTED, "model"), torch.float32, "cpu")
    rng = random.Random(seed + 1)
    model, tok = warmup(
        train, test, steps=steps, lr=lr, seed=seed, log=log, model=model, tok=tok,
        working=lambda solution: spread_working(solution, rng)
    )
    spread = notation_spread(model, tok, test[:64], guided=True, seed=seed)
    log(json.dumps(spread))
    save_testbed(out, model, tok, train, test)
    return spread


def sized_warmup(out: str, hidden: int, lr: float = 3e-3, steps: int = 1200, log=print) -> None:
    """The testbed at another model size: toy/cups_data's problems and the same warm-up recipe
    (seed, steps, batch, schedule; learning rate lr) from a fresh model of `hidden` units. Writes
    out/{model, train.jsonl, test.jsonl}."""
    train, test = committed_problems("train.jsonl"), committed_problems("test.jsonl")
    model, tok = warmup(train, test, steps=steps, lr=lr, log=log, hidden=hidden)
    save_testbed(out, model, tok, train, test)


def capability_warmup(out: str, levels=(60, 80), log=print, every: int = 20) -> dict:
    """The committed warm-up (toy/cups_data's problems, recipe and seed) saved at the first step
    whose greedy guided accuracy on the held-out problems reaches each level (in %):
    out/guided-<level> (weights and tokenizer), warm models of less guided skill than the committed
    one (its end: 100 %). Evaluated every `every` steps; where a level is newly reached, the steps
    since the previous evaluation are evaluated one by one from their weights, kept in memory (the
    guided skill can jump from 39 to 84 % within 20 steps). Stops at the last level; returns
    {level: (step, accuracy)}."""
    train, test = committed_problems("train.jsonl"), committed_problems("test.jsonl")
    cfg, saved, kept = sgpo.Config(), {}, {}

    def evaluate(model, tok, step):
        model.eval()
        accuracy = engine.greedy_accuracy(model, tok, test[:128], cfg, "cpu")
        log(json.dumps({"step": step, **accuracy}))
        return accuracy

    def watch(step, model, tok):
        kept[step] = copy.deepcopy(model.state_dict())
        if step % every:
            return False
        guided = 100 * evaluate(model, tok, step)["eval/guided_acc"]
        if any(level not in saved and guided >= level for level in levels):
            probe = copy.deepcopy(model)
            for at in sorted(kept):
                probe.load_state_dict(kept[at])
                accuracy = evaluate(probe, tok, at)
                for level in levels:
                    if level not in saved and 100 * accuracy["eval/guided_acc"] >= level:
                        saved[level] = (at, accuracy)
                        probe.save_pretrained(os.path.join(out, f"guided-{level}"))
                        tok.save_pretrained(os.path.join(out, f"guided-{level}"))
                if len(saved) == len(levels):
                    break
        kept.clear()
        return len(saved) == len(levels)

    warmup(train, test, log=log, watch=watch)
    return saved


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else COMMITTED
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1200
    train, test = make_split(2000, seed=1, prefix="train"), make_split(256, seed=2, prefix="test")
    train_problems = {q["problem"] for q in train}
    test = [q for q in test if q["problem"] not in train_problems]  # held-out instances only
    model, tok = warmup(train, test, steps=steps)
    save_testbed(out, model, tok, train, test)
    print(f"wrote {out}/model, train.jsonl ({len(train)}), test.jsonl ({len(test)})")
