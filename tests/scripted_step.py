"""rl_step on scripted rollouts and rewards, and the rows it trains on, captured: the harness of
test_assembly.py. Run under `torchrun --nproc_per_node=2 tests/scripted_step.py OUT`, each rank
scripts its own problems (rank 1's responses longer) and saves what it trained on to
OUT/rank<r>.json."""

import json
import os
import random
import sys
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
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

    def sample(self, policy, prompts, cfg):
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

    def spy(policy, rows, cfg, stats, ref=None):
        captured.append(list(rows))
        return real(policy, rows, cfg, stats, ref) if train else 0

    with mock.patch.object(sgpo, "sample", script.sample), \
            mock.patch.object(sgpo, "accumulate_gradients", spy):
        yield captured


def describe(rows, prompt_of):
    """Rows as JSON: kind, problem id (prompt_of: student prompt -> id), response length, weight,
    advantage."""
    out = []
    for r in rows:
        kind = "kd" if isinstance(r, sgpo.KDRow) else "grpo"
        out.append(dict(kind=kind, id=prompt_of[tuple(r.prompt)], length=len(r.response),
                        weight=r.weight, advantage=getattr(r, "advantage", None)))
    return out


def main(out_dir):
    """Rank r: problems 2r, 2r+1 of tiny_rows(4), G1 4, G2 2; rank 1's responses are longer."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok, model, cfg = tiny_setup()
    cfg.num_generations, cfg.num_guided_generations = 4, 2
    problems = tiny_rows(4)[2 * rank:2 * rank + 2]
    script, rng = Script(tok), random.Random(rank)
    pattern = [([1, 0, 0, 0], [1, 1]), ([1, 1, 1, 0], [0, 1])]
    for q, (auto_correct, guided_correct) in zip(problems, pattern):
        script_problem(script, cfg, q, auto_correct, guided_correct, rng)
    if rank:
        # 5 tokens longer on rank 1 (the text still ends with its digit): the ranks' token counts
        # differ
        for key in script.queue:
            script.queue[key] = [r[:1] * 5 + r for r in script.queue[key]]
    policy = sgpo.Policy.of(model, tok, "cpu")
    opt = sgpo.make_optimizer(model, 1e-3, cfg)
    alpha = {}
    with scripted(script) as captured:
        sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
    prompt_of = {tuple(engine.prompt_ids(tok, cfg, q, False)): q["id"] for q in problems}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rows=describe(captured[0], prompt_of), alpha=alpha), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
