"""--steps_per_generation k: each rollout batch in k mini-batches of whole problems, one optimizer
step each, pi_old the sampling policy for all. Each step's gradient against one computed here by
plain forwards and the sheet's formulas, the constraints acting in the later mini-batch, world
size 2 == 1 (DDP, FSDP), exact resume, and k = 1 as before."""

import copy
import json
import random
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import engine
import sgpo
from tests.conftest import read_metrics, run_scripted_step
from tests.scripted_step import Script, script_problem, scripted, setting_dir
from tests.test_assembly import setup
from tests.test_e2e import COMMON, _comparable


def log_probs(model, prompt, response, temperature):
    """[len(response), V] log-softmax(logits / T) at the positions that predict the response."""
    logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    return logits[len(prompt) - 1:-1].log_softmax(-1)


def reference_loss(model, initial, rows, cfg, alpha):
    """The sheet's loss of one mini-batch, by hand: GRPO's clipped surrogate with pi_old = the
    initial (sampling) model, weights 1 / (GRPO tokens of the mini-batch); the KD term
    min(D_t, delta) of the forward KL from the guided teacher (the current model, no gradient),
    tokens outside the trust region without gradient, weights alpha(q) / (|target| x problems of
    the mini-batch); alpha: student prompt -> alpha(q). Returns (loss, the GRPO ratios)."""
    grpo = [r for r in rows if isinstance(r, sgpo.GRPORow)]
    kd = [r for r in rows if isinstance(r, sgpo.KDRow)]
    n_tokens = sum(len(r.response) for r in grpo)
    n_problems = len({tuple(r.prompt) for r in rows})
    loss, ratios = 0.0, []
    for r in grpo + kd:
        y = torch.tensor(r.response)[:, None]
        log_p = log_probs(model, r.prompt, r.response, cfg.temperature)
        logp = log_p.gather(-1, y).squeeze(-1)
        with torch.no_grad():
            old = log_probs(initial, r.prompt, r.response, cfg.temperature).gather(-1, y)
        ratio = torch.exp(logp - old.squeeze(-1))
        if isinstance(r, sgpo.GRPORow):
            ratios.append(ratio.detach())
            surrogate = torch.min(ratio * r.advantage, ratio.clamp(0.8, 1.28) * r.advantage)
            loss = loss - surrogate.sum() / n_tokens
        else:
            with torch.no_grad():
                teacher = log_probs(model, r.teacher_prompt, r.response, cfg.temperature)
            div = (teacher.exp() * (teacher - log_p)).sum(-1).clamp(max=cfg.kl_clip)
            outside = (ratio.detach() < 0.8) | (ratio.detach() > 1.28)
            div = torch.where(outside, div.detach(), div)
            loss = loss + alpha[tuple(r.prompt)] * div.sum() / (len(r.response) * n_problems)
    return loss, torch.cat(ratios)


def test_each_minibatch_gradient_is_the_hand_computed_one():
    """k = 2 on 4 scripted problems, lr 0.05 (AdamW moves every weight by ~lr at its first
    step): the two optimizer steps' gradients equal the hand-computed ones; each mini-batch holds
    whole problems; the first mini-batch's ratios are 1, the second's leave the clip range and
    the clipped fraction of the later passes is > 0."""
    problems, policy, _, cfg = setup(4, g1=3, g2=2, steps_per_generation=2, kl_clip=1.0)
    opt = sgpo.make_optimizer(policy.lm, 0.05, cfg)
    script, rng = Script(policy.tokenizer), random.Random(6)
    pattern = [([1, 0, 0], [1, 1]), ([1, 1, 0], [0, 1]), ([0, 1, 0], [1, 0]), ([1, 1, 1], [1, 1])]
    alpha = {}
    for q, (auto_correct, guided_correct) in zip(problems, pattern):
        script_problem(script, cfg, q, auto_correct, guided_correct, rng)
        gap = sum(guided_correct) / 2 - sum(auto_correct) / 3
        prompt = engine.prompt_ids(policy.tokenizer, cfg, q, False)
        alpha[tuple(prompt)] = 0.6 if gap > 0 else 0.4
    initial = copy.deepcopy(policy.lm)
    steps, real_step = [], sgpo.optimizer_step

    def recorded_step(lm, opt, cfg):
        steps.append(({n: p.detach().clone() for n, p in lm.named_parameters()},
                      {n: p.grad.clone() for n, p in lm.named_parameters()}))
        return real_step(lm, opt, cfg)

    with scripted(script, train=True) as captured, \
            mock.patch.object(sgpo, "optimizer_step", recorded_step):
        metrics, _ = sgpo.rl_step(problems, policy, opt, {}, cfg, script.grade)
    assert len(captured) == len(steps) == 2
    prompt_of = {tuple(engine.prompt_ids(policy.tokenizer, cfg, q, False)): q["id"]
                 for q in problems}
    seen = []
    for m, (rows, (params, grads)) in enumerate(zip(captured, steps)):
        ids = {prompt_of[tuple(r.prompt)] for r in rows}
        seen += sorted(ids)
        # whole problems: all 3 GRPO rows, and the KD row, of each of its 2 problems
        assert len(ids) == 2 and sum(isinstance(r, sgpo.GRPORow) for r in rows) == 6
        assert sum(isinstance(r, sgpo.KDRow) for r in rows) == 2
        model = copy.deepcopy(initial)
        model.load_state_dict(params)
        loss, ratios = reference_loss(model, initial, rows, cfg, alpha)
        loss.backward()
        for name, p in model.named_parameters():
            err = (p.grad - grads[name]).norm() / p.grad.norm()
            assert err < 1e-4, (m, name, err.item())
        if m == 0:
            assert (ratios - 1).abs().max() < 1e-5
        else:
            assert ((ratios < 0.8) | (ratios > 1.28)).any()
    assert sorted(seen) == ["q0", "q1", "q2", "q3"]
    assert metrics["late/clip_ratio"] > 0


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return Path(setting_dir(run_scripted_step(tmp_path_factory.mktemp("one"), ["train k2"]),
                            "train k2"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_world_size_2_equals_1_with_two_minibatches(parallel, one_rank, scripted_two_ranks):
    """The same 4 scripted problems on 1 process and on 2 ranks (2 each, unequal lengths), k = 2:
    both optimizer steps' gradients, and the step's metrics, agree."""
    two_ranks = Path(setting_dir(scripted_two_ranks, "train k2" + " fsdp" * (parallel == "fsdp")))
    one, two = (torch.load(path / "grads-rank0.pt") for path in (one_rank, two_ranks))
    assert len(one) == len(two) == 2
    for step_one, step_two in zip(one, two):
        for name, g in step_one.items():
            assert g.abs().sum() > 0, name
            assert (g - step_two[name]).abs().max() < 1e-6, name
    metrics = [json.load(open(path / "rank0.json"))["metrics"] for path in (one_rank, two_ranks)]
    assert metrics[0]["late/clip_ratio"] > 0
    for key in ("loss/grpo", "loss/kd", "kd/kl_mean", "late/clip_ratio", "late/kd/ratio_out_frac"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-6), key


def test_resume_is_exact_with_two_minibatches(warm_dir, data_file, tmp_path):
    """k = 2: 4 steps straight, and 2 steps resumed from checkpoint-2 of that run into another
    folder: the same metrics and the same final weights (the split's order comes from the
    restored RNG)."""
    args = ["--model", warm_dir, "--data", data_file, "--max_steps", 4, "--save_steps", 2,
            *COMMON, "--steps_per_generation", 2]
    assert sgpo.main([str(a) for a in args + ["--output_dir", tmp_path / "ref"]]) == 0
    resumed = ["--output_dir", tmp_path / "resumed", "--resume", tmp_path / "ref" / "checkpoint-2"]
    assert sgpo.main([str(a) for a in args + resumed]) == 0
    a = {m["step"]: _comparable(m) for m in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in b] == [3, 4]
    assert any(m["late/clip_ratio"] > 0 or m["late/kd/ratio_out_frac"] > 0 for m in a.values())
    for m in b:
        assert _comparable(m) == pytest.approx(a[m["step"]], abs=1e-6), m["step"]
    final = [load_file(str(tmp_path / run / "checkpoint-4" / "model.safetensors"))
             for run in ("ref", "resumed")]
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
