"""Tests that need the tiny model: tokenizer round trip, masks, sampler/trainer log-prob agreement,
micro-batch invariance of the accumulated gradient."""
import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

import sgpo
from tests.conftest import tiny_rows, tiny_setup, training_rows
from toy.tiny import build_model, build_tokenizer


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    text = "Ball  at b;\n swaps 1ac\t\\boxed{3/4} ~"
    tok.save_pretrained(tmp_path)
    build_model(tok).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text  # spaces survive the reload
    msgs = [{"role": "user", "content": text}]
    assert (loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id


def test_first_eos_lengths_keep_eos_when_pad_is_eos():
    eos = 2
    completions = torch.tensor([[5, 7, eos, eos, eos], [5, 6, 7, 8, 9], [eos, eos, eos, eos, eos]])
    lengths, truncated = sgpo.first_eos_lengths(completions, [eos])
    assert lengths == [3, 5, 1]  # the real EOS is kept, the pads (== eos) after it are not
    assert truncated == [False, True, False]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampler_logps_equal_trainer_logps_left_padded(arch):
    torch.manual_seed(0)
    tok, model, cfg = tiny_setup(pad_is_eos=True, arch=arch)
    prompts = [sgpo.prompt_ids(tok, cfg, q, guided=g) for q in tiny_rows(3) for g in (False, True) for _ in range(2)]
    assert len({len(p) for p in prompts}) > 1  # a genuinely left-padded batch, each prompt twice (prefilled once)
    rollouts = sgpo.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", cfg.temperature,
                             cfg.max_completion_length)
    assert any(not r["truncated"] for r in rollouts) and any(r["truncated"] for r in rollouts)
    for r in rollouts:  # response = up to and including the first EOS
        assert r["truncated"] or (r["ids"][-1] == tok.eos_token_id and tok.eos_token_id not in r["ids"][:-1])
    rows = [(p, r["ids"]) for p, r in zip(prompts, rollouts)]
    with torch.no_grad():
        hidden, targets = sgpo.response_hidden(sgpo.Backbone(model), rows, tok.pad_token_id, "cpu")
        logp, _ = sgpo.token_logps(hidden, targets, model.lm_head, cfg.temperature, cfg.kd_chunk_size)
    sampler = torch.cat([r["sampler_logps"] for r in rollouts])
    assert (logp - sampler).abs().max() < 1e-4


def _grads(model, rows, cfg, tok, iterations=1):
    backbone = sgpo.Backbone(model)
    cache = {}
    for _ in range(iterations):
        model.zero_grad()
        sgpo.accumulate_gradients(backbone, backbone, model.lm_head, rows, cfg, tok.pad_token_id, "cpu", sgpo.Stats(), cache)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batching_invariance():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg)
    cfg.kl_clip = float("inf")
    full = _grads(model, rows, dataclasses.replace(cfg, micro_batch_size=len(rows)), tok)
    for mbs in (1, 2, 3):
        split = _grads(model, rows, dataclasses.replace(cfg, micro_batch_size=mbs), tok)
        for n in full:
            assert torch.allclose(full[n], split[n], atol=1e-7, rtol=1e-5), (mbs, n)
    assert any(g.abs().sum() > 0 for g in full.values())


def test_prompt_and_padding_positions_get_no_gradient():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg, n=4)
    backbone = sgpo.Backbone(model)
    captured = {}

    def keep(_, __, out):
        if out.requires_grad:  # the student pass, not the no-grad teacher pass
            out.retain_grad()
            captured["h"] = out
    handle = backbone.register_forward_hook(keep)
    loss = sgpo.micro_batch_loss(backbone, model.lm_head, backbone, rows, {}, cfg, tok.pad_token_id, "cpu", sgpo.Stats())
    loss.backward()
    handle.remove()
    grad = captured["h"].grad.abs().sum(-1)  # [B, L]
    for b, r in enumerate(rows):
        p, n = len(r["prompt"]), len(r["response"])
        assert (grad[b, :p - 1] == 0).all()  # positions that predict prompt tokens
        assert (grad[b, p - 1:p - 1 + n] > 0).all()  # positions that predict response tokens (EOS included)
        assert (grad[b, p - 1 + n:] == 0).all()  # the last token and right padding


def test_old_logps_are_frozen_across_iterations():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg)
    backbone = sgpo.Backbone(model)
    cache, stats = {}, sgpo.Stats()
    sgpo.accumulate_gradients(backbone, backbone, model.lm_head, rows, cfg, tok.pad_token_id, "cpu", stats, cache)
    first = {k: {kk: v.clone() for kk, v in d.items()} for k, d in cache.items()}
    assert stats.reduce("cpu")["clip_ratio"] == 0 and stats.reduce("cpu")["kd/ratio_out_frac"] == 0  # rho == 1
    with torch.no_grad():  # a second iteration on the same rollouts, after the policy moved
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    stats = sgpo.Stats()
    sgpo.accumulate_gradients(backbone, backbone, model.lm_head, rows, cfg, tok.pad_token_id, "cpu", stats, cache)
    assert all(torch.equal(first[k][kk], cache[k][kk]) for k in first for kk in first[k])  # pi_old kept
    metrics = stats.reduce("cpu")
    assert metrics["clip_ratio"] > 0 and metrics["kd/ratio_out_frac"] > 0


def test_gradient_checkpointing_same_gradients_and_generation_still_works():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg)
    plain = _grads(model, rows, cfg, tok)
    greedy = lambda: [o["ids"] for o in sgpo.generate(model, [rows[0]["prompt"]] * 2, tok.pad_token_id, [tok.eos_token_id],  # noqa: E731
                                                      "cpu", 0.0, 8)]
    reference = greedy()
    sgpo.enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
    model.train()
    ckpt = _grads(model, rows, cfg, tok)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-7, rtol=1e-5), n
    assert greedy() == reference and model.training  # generation ran in eval mode (no checkpointing) and restored train mode
    assert model.is_activation_checkpointing


def test_prompts_substitute_in_one_pass():
    tok, _, cfg = tiny_setup()
    q = {"problem": "why {strategy}?", "strategy": "use {problem}"}
    text = tok.decode(sgpo.prompt_ids(tok, cfg, q, guided=True))
    assert "why {strategy}?" in text and "use {problem}" in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "use {problem}" not in tok.decode(sgpo.prompt_ids(tok, cfg, q, guided=False))


def _train(dtype_flag, weights_dtype, steps=5, lr=1e-6):
    tok, model, cfg = tiny_setup()
    cfg = dataclasses.replace(cfg, dtype=dtype_flag, learning_rate=lr)
    model = model.to(weights_dtype)
    rows = training_rows(tok, model, cfg)
    start = [p.detach().clone() for p in model.parameters()]
    backbone, (optimizer, scheduler), first_grads = sgpo.Backbone(model), sgpo.make_optimizer(model, lr, cfg), None
    for _ in range(steps):
        sgpo.accumulate_gradients(backbone, backbone, model.lm_head, rows, cfg, tok.pad_token_id, "cpu", sgpo.Stats(), {})
        first_grads = first_grads or {n: p.grad.float().clone() for n, p in model.named_parameters()}
        sgpo.optimizer_step(model, optimizer, scheduler, cfg)
    moved = {n: ((p != s).sum().item(), p.numel()) for (n, p), s in zip(model.named_parameters(), start)}
    return moved, first_grads


def test_bf16_compute_moves_weights_at_lr_1e6_and_matches_fp32():
    """Five steps at lr 1e-6: bf16 compute over fp32 weights moves as many weights as fp32 (93.6 % here, the rest get
    no gradient) and every norm weight; bf16 *weights* (the old --dtype bf16) move 1.7 % and no norm weight. The
    first step's gradient in bf16 compute is within 0.4 % (relative L2) of fp32's (measured; asserted: 2 %)."""
    fp32, fp32_grads = _train("fp32", torch.float32)
    bf16, bf16_grads = _train("bf16", torch.float32)
    stale, _ = _train("fp32", torch.bfloat16)
    share = lambda moved: sum(m for m, _ in moved.values()) / sum(n for _, n in moved.values())  # noqa: E731
    assert share(bf16) > 0.8 and share(bf16) == pytest.approx(share(fp32), abs=0.02)
    assert all(m > 0 for n, (m, _) in bf16.items() if "norm" in n)
    assert share(stale) < 0.1 and all(m == 0 for n, (m, _) in stale.items() if "norm" in n)  # the trap the test guards
    diff = sum(((bf16_grads[n] - g) ** 2).sum() for n, g in fp32_grads.items()).sqrt()
    assert diff / sum((g ** 2).sum() for g in fp32_grads.values()).sqrt() < 0.02
    assert any((bf16_grads[n] - g).abs().max() > 0 for n, g in fp32_grads.items())  # autocast did compute in bf16


def test_prefill_once_per_distinct_prompt_samples_what_hf_generate_samples():
    """generate() prefills a repeated prompt once and copies its KV cache: with the same seed it samples exactly what
    HF's own generate samples on the full left-padded batch (which prefills every copy)."""
    from transformers import GenerationConfig
    tok, model, cfg = tiny_setup()
    prompts = [sgpo.prompt_ids(tok, cfg, q, guided=g) for q in tiny_rows(3) for g in (False, True) for _ in range(3)]
    torch.manual_seed(5)
    ours = sgpo.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 12)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(5)
    out = model.eval().generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
                                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12,
                                    eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id))
    lengths, _ = sgpo.first_eos_lengths(out[:, width:], [tok.eos_token_id])
    assert [r["ids"] for r in ours] == [out[i, width:width + n].tolist() for i, n in enumerate(lengths)]
    assert len({tuple(r["ids"]) for r in ours}) > 3  # the copies of a prompt sample different continuations
