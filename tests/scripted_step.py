"""rl_step on scripted rollouts and rewards, and the rows it trains on, captured: the harness of
test_assembly.py and test_minibatches.py; run as a script, one RL step of 4 scripted problems over
1 or 2 ranks (main), once per setting, in one launch (each launch costs seconds of imports):

    python tests/scripted_step.py OUT "train k2"
    torchrun --nproc_per_node=2 tests/scripted_step.py OUT "" "train k2" "train k2 fsdp"

Each setting's files go to OUT/<its flags joined by "-", or "plain"> (setting_dir)."""

import gc
import json
import os
import random
import sys
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.conftest import tiny_rows, tiny_setup  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Script:
    """The rollouts sample() returns, by prompt, in the order it is asked for them; and a grader
    that records every (text, gold answer) pair it is given. A response is correct when its text
    ends with the gold answer: text '<problem id>:<letters><digit>'."""

    def __init__(self, tok):
        self.tok, self.queue, self.graded = tok, {}, []

    def response(self, q, letters, correct):
        digit = q["answer"] if correct else {"3": "7", "7": "3"}[q["answer"]]
        text = f"{q['id']}:{letters}{digit}"
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def add(self, prompt, responses):
        self.queue.setdefault(tuple(prompt), []).extend(responses)

    def sample(self, policy, prompts, cfg, lm=None):
        out = []
        for p in prompts:
            ids = self.queue[tuple(p)].pop(0)
            out.append(dict(ids=ids, truncated=False, sampler_logps=torch.zeros(len(ids))))
        return out

    def grade(self, texts, answers):
        self.graded += list(zip(texts, answers))
        return [float(t.endswith(a)) for t, a in zip(texts, answers)]


def script_problem(script, cfg, q, auto_correct, guided_correct, rng):
    """Queue one step's rollouts of problem q: autonomous ones correct as auto_correct says (one
    bool each), guided ones as guided_correct; responses of 2-9 random letters. Returns the
    autonomous and guided responses (ids)."""
    out = []
    for guided, flags in ((False, auto_correct), (True, guided_correct)):
        responses = []
        for correct in flags:
            letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9)))
            responses.append(script.response(q, letters, correct))
        script.add(engine.prompt_ids(script.tok, cfg, q, guided), responses)
        out.append(responses)
    return out


@contextmanager
def scripted(script, train=False):
    """rl_step samples from script and trains on nothing (train=False: its rows are only recorded)
    or as usual. Yields the list of row lists accumulate_gradients is given."""
    captured, real = [], sgpo.accumulate_gradients

    def spy(policy, rows, *args):
        captured.append(list(rows))
        return real(policy, rows, *args) if train else 0

    with mock.patch.object(sgpo, "sample", script.sample), \
            mock.patch.object(sgpo, "accumulate_gradients", spy):
        yield captured


@contextmanager
def recorded_gradients():
    """Yields a list into which every optimizer step puts its gradient before clipping ({name:
    full tensor}, FSDP's gathered)."""
    grads, real_step = [], sgpo.optimizer_step

    def recorded_step(lm, opt, cfg):
        grads.append({n: full(p.grad).clone() for n, p in lm.named_parameters()})
        return real_step(lm, opt, cfg)

    with mock.patch.object(sgpo, "optimizer_step", recorded_step):
        yield grads


def describe(rows, prompt_of):
    """Rows as JSON: kind, problem id (prompt_of: student prompt -> id), response length, weight,
    advantage."""
    out = []
    for r in rows:
        kind = "kd" if isinstance(r, sgpo.KDRow) else "grpo"
        out.append(dict(kind=kind, id=prompt_of[tuple(r.prompt)], length=len(r.response),
                        weight=r.weight, advantage=getattr(r, "advantage", None)))
    return out


def rank_script(tok, cfg, rank):
    """Rank r's problems (2r, 2r+1 of tiny_rows(4)) and their scripted rollouts, G1 4 and G2 2;
    rank 1's responses 5 tokens longer (the text still ends with its digit), so that the ranks'
    token counts differ."""
    problems = tiny_rows(4)[2 * rank:2 * rank + 2]
    script, rng = Script(tok), random.Random(rank)
    for q, (auto_correct, guided_correct) in zip(problems, [([1, 0, 0, 0], [1, 1]),
                                                            ([1, 1, 1, 0], [0, 1])]):
        script_problem(script, cfg, q, auto_correct, guided_correct, rng)
    if rank:
        for key in script.queue:
            script.queue[key] = [r[:1] * 5 + r for r in script.queue[key]]
    return problems, script


def setting_dir(out, flags: str) -> str:
    return os.path.join(out, "-".join(flags.split()) or "plain")


def main(out_dir, flags):
    """Under torchrun: rank r trains on rank_script(r); in one process: both ranks' problems, in
    the order that makes its mini-batches those of the two ranks (q0 q2 | q1 q3, the split in
    order). flags: train (else the rows are only captured), k2 (--steps_per_generation 2, a large
    learning rate: the second mini-batch's ratios leave the clip range), fsdp (else DDP). Saves
    OUT/rank<r>.json (rows, alpha, metrics) and, training, OUT/grads-rank<r>.pt: each optimizer
    step's gradient before clipping. The loss's forwards take a row each (--share_prompts false):
    one process and two ranks hold other rows in a micro-batch, and the shared layout's float sums
    would differ by ~3e-8, which the second step's Adam (lr 0.05) turns into ~5e-6; the shared
    layout over ranks: tests/test_ddp.py."""
    tok, model, cfg = tiny_setup()
    cfg.num_generations, cfg.num_guided_generations = 4, 2
    cfg.steps_per_generation = 2 if "k2" in flags else 1
    share = "false"
    if dist.is_initialized():
        rank = dist.get_rank()
        problems, script = rank_script(tok, cfg, rank)
        fsdp = "fsdp" in flags
        policy = sgpo.Policy.of(model, tok, "cpu", lambda backbone: runtime.shard_fsdp(
            backbone, torch.float32, torch.device("cpu")) if fsdp else DDP(backbone), share)
    else:
        rank = 0
        (q0, q1), script = rank_script(tok, cfg, 0)
        (q2, q3), other = rank_script(tok, cfg, 1)
        script.queue.update(other.queue)
        problems = [q0, q2, q1, q3]
        policy = sgpo.Policy.of(model, tok, "cpu", share=share)
    opt = sgpo.make_optimizer(model, 0.05 if "k2" in flags else 1e-3, cfg)
    # AdamW's first step moves a weight by ~lr g / (|g| + eps): at eps 1e-8 a gradient entry at
    # float-noise level (its sign set by the order of a sum, which differs between one process
    # and two ranks' micro-batches) moves its weight by a random +-lr, and the second step's
    # gradient with it (measured on one CPU: one process and two ranks 1.1e-5 apart; at eps 1e-3,
    # 2.8e-7)
    for group in opt[0].param_groups:
        group["eps"] = 1e-3
    alpha = {}
    with scripted(script, train="train" in flags) as captured, recorded_gradients() as grads, \
            mock.patch.object(torch, "randperm", lambda n: torch.arange(n)):
        metrics, _ = sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
    prompt_of = {tuple(engine.prompt_ids(tok, cfg, q, False)): q["id"] for q in problems}
    rows = [describe(rows, prompt_of) for rows in captured]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rows=rows, alpha=alpha, metrics=metrics), f)
    torch.save(grads, os.path.join(out_dir, f"grads-rank{rank}.pt"))


def full(t):
    """A DTensor (FSDP) gathered, else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    for setting in sys.argv[2:]:
        os.makedirs(setting_dir(sys.argv[1], setting), exist_ok=True)
        main(setting_dir(sys.argv[1], setting), setting.split())
    if dist.is_initialized():
        # DDP's wrappers hold the process group: collected before it is destroyed
        gc.collect()
        dist.destroy_process_group()
