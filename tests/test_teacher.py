"""--teacher base / ema: a teacher with weights of its own. base stays the policy as RL started
while the policy moves; ema is the closed-form moving average of the policy's weights after every
optimizer step; the KD term's divergence is taken from that teacher's guided distribution; the
guided rollouts come from the teacher under --teacher_samples_guided. (World size 2 == 1 with a
teacher: tests/test_ddp.py; FSDP, checkpoints and an exact resume: tests/test_fsdp.py.)"""

import copy
from unittest import mock

import pytest
import torch

import engine
import runtime
import sgpo
from tests.conftest import fresh, tiny_setup, training_rows


def _policy(teacher: str, rate=0.3):
    tok, model, cfg = tiny_setup()
    cfg.teacher, cfg.teacher_ema_rate, cfg.learning_rate = teacher, rate, 1e-2
    policy = sgpo.Policy.of(model, tok, "cpu")
    policy.teacher = sgpo.Policy.of(copy.deepcopy(model).requires_grad_(False), tok, "cpu")
    return policy, cfg


def _train(policy, cfg, steps):
    """`steps` rollout batches of the same rows, one optimizer step each; returns the policy's
    weights before and after each step."""
    rows = training_rows(policy.tokenizer, policy.lm, cfg)
    opt = sgpo.make_optimizer(policy.lm, cfg.learning_rate, cfg)
    weights = [[p.detach().clone() for p in policy.lm.parameters()]]
    for _ in range(steps):
        sgpo.update_policy(policy, opt, [fresh(rows, policy, cfg)], cfg, runtime.Stats())
        weights.append([p.detach().clone() for p in policy.lm.parameters()])
    return weights


@pytest.mark.parametrize("teacher", ["base", "ema"])
def test_teacher_weights_after_k_steps(teacher):
    """ema: theta_T,k = (1 - r)^k theta_0 + sum_i r (1 - r)^(k - i) theta_i (the closed form of
    theta_T += r (theta - theta_T) after each step i); base: theta_0 exactly. The policy moved."""
    policy, cfg = _policy(teacher, rate=0.3)
    k, r = 4, 0.3
    weights = _train(policy, cfg, k)
    for j, theta_t in enumerate(policy.teacher.lm.parameters()):
        thetas = [w[j] for w in weights]
        assert (thetas[-1] - thetas[0]).abs().max() > 1e-3  # the policy moved
        if teacher == "base":
            assert torch.equal(theta_t, thetas[0])
            continue
        closed = (1 - r) ** k * thetas[0]
        for i in range(1, k + 1):
            closed = closed + r * (1 - r) ** (k - i) * thetas[i]
        assert torch.allclose(theta_t, closed, atol=1e-6), (theta_t - closed).abs().max()
        # and not the policy's own weights, nor the start
        assert (theta_t - thetas[-1]).abs().max() > 1e-4
        assert (theta_t - thetas[0]).abs().max() > 1e-4


def _kd_divergence_by_hand(student, teacher_lm, rows, cfg):
    """Mean over the KD rows' tokens of KL(teacher(guided prompt) || student(unguided prompt)),
    from full logits of plain HF forwards."""
    divs = []
    for r in rows:
        if not isinstance(r, sgpo.KDRow):
            continue
        n = len(r.response)
        s_logits = student(torch.tensor([r.prompt + r.response])).logits[0, -n - 1:-1]
        t_logits = teacher_lm(torch.tensor([r.teacher_prompt + r.response])).logits[0, -n - 1:-1]
        divs.append(sgpo.per_token_kl(s_logits / cfg.temperature, t_logits / cfg.temperature))
    return torch.cat(divs).mean().item()


@pytest.mark.parametrize("chunked", [True, False])
def test_base_teacher_is_the_initial_model_after_training(chunked):
    """After training steps the KD term's kd/kl_mean is the divergence from the INITIAL model's
    guided distribution (base) to the moved policy's unguided one, and not the live policy's own:
    the teacher's hidden states and its head both come from the teacher's weights."""
    policy, cfg = _policy("base")
    cfg.chunked_head = chunked
    initial = copy.deepcopy(policy.lm).eval()
    _train(policy, cfg, 3)
    rows = fresh(training_rows(policy.tokenizer, policy.lm, cfg), policy, cfg)
    stats = runtime.Stats()
    sgpo.accumulate_gradients(policy, rows, cfg, stats)
    with torch.no_grad():
        policy.lm.eval()
        base = _kd_divergence_by_hand(policy.lm, initial, rows, cfg)
        live = _kd_divergence_by_hand(policy.lm, policy.lm, rows, cfg)
    measured = stats.sums["kd/kl_mean"] / stats.counts["kd/kl_mean"]
    assert measured == pytest.approx(base, abs=1e-5)
    assert abs(base - live) > 1e-2


@pytest.mark.parametrize("from_teacher", [False, True])
def test_guided_rollouts_sampled_by_the_teacher_when_asked(from_teacher):
    """--teacher_samples_guided: the G2 generate call runs the teacher's model, the G1 call the
    policy's; without it both run the policy's (and with --generate_by_mode false, in one call)."""
    policy, cfg = _policy("ema")
    cfg.teacher_samples_guided, cfg.generate_by_mode = from_teacher, "false"
    calls = []

    def record(lm, prompts, *args):
        calls.append((lm, len(prompts)))
        return [dict(ids=[1], truncated=False, sampler_logps=torch.zeros(1))] * len(prompts)

    with mock.patch.object(engine, "generate", record):
        auto, guided = sgpo.sample_rollouts(policy, [[5, 6]] * 2, [[7, 8]] * 2, cfg)
    assert len(auto) == 2 * cfg.num_generations and len(guided) == 2 * cfg.num_guided_generations
    g1, g2 = 2 * cfg.num_generations, 2 * cfg.num_guided_generations
    if from_teacher:
        assert calls == [(policy.lm, g1), (policy.teacher.lm, g2)]
    else:
        assert calls == [(policy.lm, g1 + g2)]


@pytest.mark.parametrize("tied", [False, True])
def test_working_copy_computes_what_autocast_computes(tied, tmp_path):
    """--dtype bf16 with a teacher of its own (one process or DDP): the teacher computes from a
    working copy whose Linear weights are bf16 (autocast would cast its frozen fp32 weights again
    at every op), embeddings and a head tied to them fp32: its hidden states and KD divergences
    are those of the fp32 teacher under autocast, bit for bit; the fp32 weights are kept."""
    tok, model, cfg = tiny_setup(tied=tied)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg.model, cfg.teacher, cfg.dtype = str(tmp_path / "m"), "ema", "bf16"
    policy = engine.load_policy(cfg, None, False, "cpu")
    teacher = policy.teacher
    assert teacher.master is not None and teacher.master_weights() is teacher.master
    linear = [m.weight for m in teacher.lm.modules() if isinstance(m, torch.nn.Linear)]
    embedding = teacher.lm.get_input_embeddings().weight
    assert embedding.dtype == torch.float32
    assert {w.dtype for w in linear if w is not embedding} == {torch.bfloat16}
    assert {p.dtype for p in teacher.master.parameters()} == {torch.float32}
    frozen = sgpo.Policy.of(teacher.master, tok, "cpu")
    rows = [r for r in training_rows(tok, model, cfg) if isinstance(r, sgpo.KDRow)]
    pairs = [(r.teacher_prompt, r.response) for r in rows]
    out = []
    for view in (teacher, frozen):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden, targets = view.response_hidden(pairs, sync_grads=False)
            student, _ = policy.response_hidden([(r.prompt, r.response) for r in rows])
            _, div, _ = sgpo.head_outputs(policy.head, student, targets, cfg,
                                          (hidden, view.head))
        out.append((hidden, div))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_ema_moves_the_fp32_master_refreshes_the_copy_and_checkpoints_the_master(tmp_path):
    """An EMA step under bf16 moves the fp32 weights (an lr-1e-6-sized move survives), then the
    working copy is refreshed from them; a checkpoint's teacher/ holds the fp32 weights."""
    from safetensors.torch import load_file
    tok, model, cfg = tiny_setup()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg.model, cfg.teacher, cfg.dtype = str(tmp_path / "m"), "ema", "bf16"
    cfg.teacher_ema_rate, cfg.output_dir = 0.5, str(tmp_path / "out")
    policy = engine.load_policy(cfg, None, False, "cpu")
    teacher = policy.teacher
    with torch.no_grad():
        for p in policy.lm.parameters():
            p.add_(2e-6)
    before = {n: p.clone() for n, p in teacher.master.named_parameters()}
    sgpo.move_teacher(policy, cfg.teacher_ema_rate)
    for (name, master), working in zip(teacher.master.named_parameters(),
                                       teacher.lm.parameters()):
        assert torch.allclose(master - before[name], torch.full_like(master, 1e-6), atol=1e-7)
        assert torch.equal(working, master.to(working.dtype)), name
    opt = sgpo.make_optimizer(policy.lm, 1e-3, cfg)
    runtime.save_checkpoint(cfg, policy, opt, {"step": 1})
    saved = load_file(str(tmp_path / "out" / "checkpoint-1" / "teacher" / "model.safetensors"))
    for name, master in teacher.master.named_parameters():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), name


def test_bf16_ema_teacher_run_resumes_exactly(warm_dir, data_file, tmp_path):
    """--dtype bf16 --teacher ema sampling the guided rollouts (the working copy generates and
    teaches, the fp32 master is checkpointed): 3 steps straight, and steps 2-3 resumed from
    checkpoint-1, give the same metrics and final teacher weights."""
    from safetensors.torch import load_file
    from tests.conftest import read_metrics
    from tests.test_e2e import COMMON
    args = ["--model", warm_dir, "--data", data_file, "--max_steps", 3, "--save_steps", 1,
            "--dtype", "bf16", "--teacher", "ema", "--teacher_ema_rate", 0.5,
            "--teacher_samples_guided", "true", "--reward_workers", 0, *COMMON]
    runs = {"straight": [], "resumed": ["--resume", tmp_path / "straight" / "checkpoint-1"]}
    for name, extra in runs.items():
        argv = args + ["--output_dir", tmp_path / name] + extra
        assert sgpo.main([str(a) for a in argv]) == 0
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in runs)
    assert [m["step"] for m in b] == [2, 3] and a[0]["kd/target_frac"] > 0
    for x, y in zip(a[1:], b):
        assert {k: v for k, v in x.items() if not k.startswith(("time/", "perf/"))} == {
            k: v for k, v in y.items() if not k.startswith(("time/", "perf/"))}
    final = [load_file(str(tmp_path / name / "checkpoint-3" / "teacher" / "model.safetensors"))
             for name in runs]
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
