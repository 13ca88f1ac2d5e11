"""Ranks given different amounts of work, each case recording what must equal one process doing
all of it: the helper of tests/test_uneven_work.py. Every case runs under DDP and FSDP2 in one
launch (a launch costs seconds of imports); collectives time out after 20 s, so a rank left
waiting on another fails the launch in seconds, and after each case every rank checks in with its
name (a rank that made one collective more would be caught there too).

    python tests/uneven_work.py OUT WORLD CASE...         # one process, the work of WORLD ranks
    torchrun --nproc_per_node=WORLD tests/uneven_work.py OUT WORLD CASE...

A case: a name and optionally `fsdp` (else DDP; one process: neither). OUT: a torch file, rank 0's
{case: result}. Names:
- generate: greedy generate calls of 2 prompts each inside runtime.full_weights; rank 0 has 3
  prompts (2 calls), every other rank 2 (1 call). Result: every prompt's response.
- eval: the held-out evaluation (metrics.held_out_accuracy) of 7 problems, 4 with a usable
  strategy, 3 sequences a call, with a teacher of its own (--teacher ema): ranks get different
  numbers of rows and of generate calls. Result: the accuracies and every graded text.
- auto: --generate_by_mode auto where rank 0's prompts alone would take one generate call and
  rank 1's a call per mode. Result: each rank's number of sample() calls.
- nokd, nokd_all, truncated, k2, ema: one scripted RL step (tests/scripted_step.py's Script) of 2
  problems per rank, rank r's responses 5r tokens longer (uneven tokens), trained: nokd, rank 0
  has no correct guided rollout (no KD target, no scoring forward) while the others have;
  nokd_all, no rank has one; truncated,
  --mask_truncated_completions with every autonomous rollout of rank 1 truncated (no GRPO row);
  k2, --steps_per_generation 2; ema, --teacher ema (rate 0.5). Result: metrics, alpha, the
  gradient of each optimizer step, the weights after (and the teacher's), and each rank's
  micro-batches: whether the teacher ran on each.
"""

import copy
import datetime
import os
import random
import sys
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import metrics  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.conftest import eval_rows, tiny_rows, tiny_setup  # noqa: E402
from tests.scripted_step import (Script, full, recorded_gradients,  # noqa: E402
                                 script_problem, scripted)

RL_CASES = ("nokd", "nokd_all", "truncated", "k2", "ema")


def make_policy(tok, model, cfg, teacher=False):
    """runtime.wrap as load_policy uses it (DDP under torchrun, FSDP with cfg.fsdp); teacher: a
    teacher of its own weights (a copy), wrapped like load_policy's."""
    ddp = dist.is_initialized()
    t_lm = copy.deepcopy(model).requires_grad_(False) if teacher else None
    policy = sgpo.Policy.of(model, tok, "cpu", lambda b: runtime.wrap(b, cfg, ddp, b.lm.device),
                            "false")
    if t_lm is not None:
        policy.teacher = sgpo.Policy.of(t_lm.eval(), tok, "cpu",
                                        lambda b: runtime.wrap(b, cfg, False, b.lm.device),
                                        "false")
    return policy


def share(items, rank):
    """Rank 0: items[:3]; the others 2 each, in rank order (one process: all of them)."""
    if not dist.is_initialized():
        return items
    return items[:3] if rank == 0 else items[3 + 2 * (rank - 1):5 + 2 * (rank - 1)]


def gathered(mine: dict) -> dict:
    """Every rank's dict, merged."""
    out = {}
    for part in runtime.all_gather_objects(mine):
        out.update(part)
    return out


def case_generate(tok, model, cfg, rank, world):
    problems = share(tiny_rows(1 + 2 * world), rank)
    policy = make_policy(tok, model, cfg)
    prompts = [engine.prompt_ids(tok, cfg, q, False) for q in problems]
    with runtime.full_weights(policy.wrapped):
        outs = engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 0.0,
                               cfg.max_completion_length, batch_size=2)
    return gathered({q["id"]: o["ids"] for q, o in zip(problems, outs)})


def case_eval(tok, model, cfg, rank, world):
    cfg.generation_batch_size, cfg.teacher = 3, "ema"
    policy = make_policy(tok, model, cfg, teacher=True)
    texts = []

    def grade(batch, answers):
        # a verdict that depends on every token: the text's length is even
        texts.extend(zip(answers, batch))
        return [float(len(t) % 2 == 0) for t in batch]

    state = {"step": 0, "eval_start": {}}
    result = metrics.held_out_accuracy(policy, eval_rows(), cfg, state, grade)
    return {"accuracy": result, "texts": sorted(sum(runtime.all_gather_objects(texts), []))}


def case_auto(tok, model, cfg, rank, world):
    """Rank 0's strategy is short, the others' 40 characters longer; the completion length is
    set so that one call is cheaper at rank 0's longest prompt and not at the others'."""
    cfg.num_generations, cfg.num_guided_generations, cfg.generation_batch_size = 2, 1, 1
    problems = tiny_rows(world)
    for r, q in enumerate(problems):
        q["strategy"] += " and check it" * (3 * (r > 0))
    longest = [len(engine.prompt_ids(tok, cfg, q, True)) for q in problems]
    policy = make_policy(tok, model, cfg)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    budget = (policy.backbone.weights + policy.head.weight.numel()) // per_token  # rows 1
    cfg.max_completion_length = budget - longest[0]
    assert 0 < cfg.max_completion_length and longest[-1] + cfg.max_completion_length > budget
    mine = [problems[rank]] if dist.is_initialized() else problems
    calls, real = [], sgpo.sample
    auto = [engine.prompt_ids(tok, cfg, q, False) for q in mine]
    guided = [engine.prompt_ids(tok, cfg, q, True) for q in mine]
    with mock.patch.object(sgpo, "sample", lambda *a, **k: calls.append(1) or real(*a, **k)), \
            runtime.full_weights(policy.wrapped):
        sgpo.sample_rollouts(policy, auto, guided, cfg)
    return gathered({rank: len(calls)})


class UnevenScript(Script):
    """Script, whose rollouts of the prompts in `truncated` come back truncated."""

    def __init__(self, tok):
        super().__init__(tok)
        self.truncated = set()

    def sample(self, policy, prompts, cfg, lm=None):
        out = super().sample(policy, prompts, cfg, lm)
        for p, r in zip(prompts, out):
            r["truncated"] = tuple(p) in self.truncated
        return out


def rank_problems(tok, cfg, script, name, r):
    """Rank r's 2 problems, their rollouts queued on script (scripted_step.script_problem; see
    the module's docstring), each response 5r tokens longer (the text still ends with its
    digit)."""
    problems = tiny_rows(100)[2 * r:2 * r + 2]
    rng = random.Random(r)
    patterns = [([1, 0, 0, 0], [1, 1]), ([1, 1, 1, 0], [0, 1])]
    if name == "nokd_all" or name == "nokd" and r == 0:
        patterns = [(auto, [0, 0]) for auto, _ in patterns]
    for q, (auto_correct, guided_correct) in zip(problems, patterns):
        script_problem(script, cfg, q, auto_correct, guided_correct, rng)
        for guided in (False, True):
            prompt = tuple(engine.prompt_ids(tok, cfg, q, guided))
            script.queue[prompt] = [ids[:1] * (5 * r) + ids for ids in script.queue[prompt]]
            if name == "truncated" and r == 1 and not guided:
                script.truncated.add(prompt)
    return problems


def case_rl(name, tok, model, cfg, rank, world):
    cfg.num_generations, cfg.num_guided_generations = 4, 2
    cfg.steps_per_generation = 2 if name == "k2" else 1
    cfg.mask_truncated_completions = name == "truncated"
    cfg.teacher, cfg.teacher_ema_rate = ("ema", 0.5) if name == "ema" else ("live", 0.05)
    script = UnevenScript(tok)
    per_rank = [rank_problems(tok, cfg, script, name, r) for r in range(world)]
    if dist.is_initialized():
        problems = per_rank[rank]
    else:
        # the order whose mini-batches (the split in order) are those of the ranks: first
        # problems first
        problems = [per_rank[r][j] for j in range(2) for r in range(world)]
    policy = make_policy(tok, model, cfg, teacher=name == "ema")
    opt = sgpo.make_optimizer(model, 1e-3, cfg)
    alpha, taught, real = {}, [], sgpo.micro_batch_loss
    with scripted(script, train=True), recorded_gradients() as grads, \
            mock.patch.object(torch, "randperm", lambda n: torch.arange(n)), \
            mock.patch.object(sgpo, "micro_batch_loss",
                              lambda *a: taught.append(a[4] is not None) or real(*a)):
        step, _ = sgpo.rl_step(problems, policy, opt, alpha, cfg, script.grade)
    teacher = policy.teacher.lm.named_parameters() if policy.teacher else []
    return {"metrics": step, "alpha": alpha, "grads": grads,
            "weights": {n: full(p).detach().clone() for n, p in model.named_parameters()},
            "teacher": {n: full(p).detach().clone() for n, p in teacher},
            "teacher_runs": gathered({rank: taught})}


def run_case(case, world):
    name, *flags = case.split()
    torch.manual_seed(0)
    tok, model, cfg = tiny_setup()
    cfg.fsdp = "fsdp" in flags and dist.is_initialized()
    rank = runtime.get_rank()
    if name in RL_CASES:
        result = case_rl(name, tok, model, cfg, rank, world)
    else:
        result = globals()[f"case_{name}"](tok, model, cfg, rank, world)
    # every rank at the same collective, with the same case
    assert set(runtime.all_gather_objects(case)) == {case}
    return result


if __name__ == "__main__":
    out, world, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
        assert dist.get_world_size() == world
    results = {case: run_case(case, world) for case in cases}
    if runtime.get_rank() == 0:
        torch.save(results, out)
    print(f"rank {runtime.get_rank()}: finished {len(cases)} cases", flush=True)
    if dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()
