"""Tests that need the tiny model: tokenizer round trip, masks, sampler/trainer log-prob agreement,
micro-batch invariance of the accumulated gradient."""

import dataclasses
import itertools

import pytest
import torch
from transformers import AutoTokenizer

import chunked_head
import engine
import inputs
import runtime
import sgpo
from tests.conftest import fresh, tiny_rows, tiny_setup, training_rows
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
    assert loaded.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    ) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id


def test_first_eos_lengths_keep_eos_when_pad_is_eos():
    eos = 2
    completions = torch.tensor([[5, 7, eos, eos, eos], [5, 6, 7, 8, 9], [eos, eos, eos, eos, eos]])
    lengths, truncated = engine.first_eos_lengths(completions, [eos])
    assert lengths == [3, 5, 1]  # the real EOS is kept, the pads (== eos) after it are not
    assert truncated == [False, True, False]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampler_logps_equal_trainer_logps_left_padded(arch):
    torch.manual_seed(0)
    tok, model, cfg = tiny_setup(pad_is_eos=True, arch=arch)
    prompts = [
        engine.prompt_ids(tok, cfg, q, guided=g)
        for q in tiny_rows(3)
        for g in (False, True)
        for _ in range(2)
    ]
    # a genuinely left-padded batch, each prompt twice (prefilled once)
    assert len({len(p) for p in prompts}) > 1
    rollouts = engine.generate(
        model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", cfg.temperature,
        cfg.max_completion_length
    )
    assert any(not r["truncated"] for r in rollouts) and any(r["truncated"] for r in rollouts)
    for r in rollouts:  # response = up to and including the first EOS
        assert r["truncated"] or (
            r["ids"][-1] == tok.eos_token_id and tok.eos_token_id not in r["ids"][:-1]
        )
    rows = [(p, r["ids"]) for p, r in zip(prompts, rollouts)]
    with torch.no_grad():
        hidden, targets = sgpo.Policy.of(model, tok, "cpu").response_hidden(rows)
        logp, _ = chunked_head.token_logps(
            hidden, targets, model.lm_head, cfg.temperature, cfg.kd_chunk_size
        )
    sampler = torch.cat([r["sampler_logps"] for r in rollouts])
    assert (logp - sampler).abs().max() < 1e-4


def _grads(model, rows, cfg, tok, share="auto"):
    model.zero_grad()
    policy = sgpo.Policy.of(model, tok, "cpu", share=share)
    sgpo.accumulate_gradients(policy, fresh(rows, policy, cfg), cfg, runtime.Stats())
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
    # in micro_batch_loss's order, the rows by kind: [B, L] below is in this order
    rows = sorted(training_rows(tok, model, cfg, n=4), key=lambda r: isinstance(r, sgpo.KDRow))
    # a row each ([B, L] below); the shared layout: test_shared_prompts_same_states_and_gradients
    policy = sgpo.Policy.of(model, tok, "cpu", share="false")
    captured = {}

    def keep(_, __, out):
        if out.requires_grad:  # the student pass, not the no-grad teacher pass
            out.retain_grad()
            captured["h"] = out

    handle = policy.backbone.register_forward_hook(keep)
    loss = sgpo.micro_batch_loss(policy, fresh(rows, policy, cfg), cfg, runtime.Stats(),
                                 policy.teacher_view())
    loss.backward()
    handle.remove()
    grad = captured["h"].grad.abs().sum(-1)  # [B, L]
    for b, r in enumerate(rows):
        p, n = len(r.prompt), len(r.response)
        assert (grad[b, : p - 1] == 0).all()  # positions that predict prompt tokens
        # positions that predict response tokens (EOS included)
        assert (grad[b, p - 1 : p - 1 + n] > 0).all()
        assert (grad[b, p - 1 + n :] == 0).all()  # the last token and right padding


def test_old_logps_are_frozen_across_iterations():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg)
    policy, stats = sgpo.Policy.of(model, tok, "cpu"), runtime.Stats()
    # pi_old, then the update's first pass on these rows
    sgpo.take_pi_old(policy, rows, cfg, stats)
    sgpo.accumulate_gradients(policy, rows, cfg, stats)
    first = [r.old_logps.clone() for r in rows]
    # rho == 1
    assert stats.reduce("cpu")["clip_ratio"] == 0 and stats.reduce("cpu")["kd/ratio_out_frac"] == 0
    with torch.no_grad():  # a second iteration on the same rollouts, after the policy moved
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    stats = runtime.Stats()
    sgpo.accumulate_gradients(policy, rows, cfg, stats)
    assert all(torch.equal(old, r.old_logps) for old, r in zip(first, rows))  # pi_old kept
    metrics = stats.reduce("cpu")
    assert metrics["clip_ratio"] > 0 and metrics["kd/ratio_out_frac"] > 0


def test_gradient_checkpointing_same_gradients_and_generation_still_works():
    tok, model, cfg = tiny_setup()
    rows = training_rows(tok, model, cfg)
    plain = _grads(model, rows, cfg, tok)
    def greedy():
        outs = engine.generate(model, [rows[0].prompt] * 2, tok.pad_token_id, [tok.eos_token_id],
                               "cpu", 0.0, 8)
        return [o["ids"] for o in outs]

    reference = greedy()
    engine.enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
    model.train()
    ckpt = _grads(model, rows, cfg, tok)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-7, rtol=1e-5), n
    # generation ran in eval mode (no checkpointing) and restored train mode
    assert greedy() == reference and model.training
    assert model.is_activation_checkpointing


def test_prompts_substitute_in_one_pass():
    tok, _, cfg = tiny_setup()
    q = {"problem": "why {strategy}?", "strategy": "use {problem}"}
    text = tok.decode(engine.prompt_ids(tok, cfg, q, guided=True))
    assert "why {strategy}?" in text and "use {problem}" in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "use {problem}" not in tok.decode(engine.prompt_ids(tok, cfg, q, guided=False))


def _train(dtype_flag, weights_dtype, steps=5, lr=1e-6):
    tok, model, cfg = tiny_setup()
    cfg = dataclasses.replace(cfg, dtype=dtype_flag, learning_rate=lr)
    model = model.to(weights_dtype)
    rows = training_rows(tok, model, cfg)
    start = [p.detach().clone() for p in model.parameters()]
    policy, opt, first_grads = (
        sgpo.Policy.of(model, tok, "cpu"), sgpo.make_optimizer(model, lr, cfg), None
    )
    for _ in range(steps):
        sgpo.accumulate_gradients(policy, fresh(rows, policy, cfg), cfg, runtime.Stats())
        first_grads = first_grads or {
            n: p.grad.float().clone() for n, p in model.named_parameters()
        }
        sgpo.optimizer_step(model, opt, cfg)
    moved = {
        n: ((p != s).sum().item(), p.numel()) for (n, p), s in zip(model.named_parameters(), start)
    }
    return moved, first_grads


def test_bf16_compute_moves_weights_at_lr_1e6_and_matches_fp32():
    """Five steps at lr 1e-6: bf16 compute over fp32 weights moves as many weights as fp32 (93.6 %
    here, the rest get no gradient) and every norm weight; bf16 *weights* (the old --dtype bf16)
    move 1.7 % and no norm weight. The first step's gradient in bf16 compute is within 0.4 %
    (relative L2) of fp32's (measured; asserted: 2 %)."""
    fp32, fp32_grads = _train("fp32", torch.float32)
    bf16, bf16_grads = _train("bf16", torch.float32)
    stale, _ = _train("fp32", torch.bfloat16)

    def share(moved):
        return sum(m for m, _ in moved.values()) / sum(n for _, n in moved.values())

    assert share(bf16) > 0.8 and share(bf16) == pytest.approx(share(fp32), abs=0.02)
    assert all(m > 0 for n, (m, _) in bf16.items() if "norm" in n)
    # the trap the test guards
    assert share(stale) < 0.1 and all(m == 0 for n, (m, _) in stale.items() if "norm" in n)
    diff = sum(((bf16_grads[n] - g) ** 2).sum() for n, g in fp32_grads.items()).sqrt()
    assert diff / sum((g**2).sum() for g in fp32_grads.values()).sqrt() < 0.02
    # autocast did compute in bf16
    assert any((bf16_grads[n] - g).abs().max() > 0 for n, g in fp32_grads.items())


def test_prefill_once_per_distinct_prompt_samples_what_hf_generate_samples():
    """generate() prefills a repeated prompt once and copies its KV cache: with the same seed it
    samples exactly what HF's own generate samples on the full left-padded batch (which prefills
    every copy)."""
    from transformers import GenerationConfig

    tok, model, cfg = tiny_setup()
    prompts = [
        engine.prompt_ids(tok, cfg, q, guided=g)
        for q in tiny_rows(3)
        for g in (False, True)
        for _ in range(3)
    ]
    torch.manual_seed(5)
    ours = engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 12)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(5)
    out = model.eval().generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12,
            eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id
        ),
    )
    lengths, _ = engine.first_eos_lengths(out[:, width:], [tok.eos_token_id])
    assert [r["ids"] for r in ours] == [
        out[i, width : width + n].tolist() for i, n in enumerate(lengths)
    ]
    # the copies of a prompt sample different continuations
    assert len({tuple(r["ids"]) for r in ours}) > 3


def _loss_and_grads(policy, rows, cfg):
    policy.lm.zero_grad()
    stats = runtime.Stats()
    sgpo.accumulate_gradients(policy, fresh(rows, policy, cfg), cfg, stats)
    grads = {n: p.grad.clone() for n, p in policy.lm.named_parameters()}
    return stats.reduce("cpu"), grads


@pytest.mark.parametrize("kd_loss", ["fkl", "rkl", "sft"])
def test_plain_full_logit_loss_equals_the_chunked_head_on_the_toy(kd_loss):
    """--chunked_head false runs the readable formulas (head(h) / T, log-softmax, per_token_kl) on
    full [M, V] logits: the same losses, metrics and gradients as ChunkedHead, on the committed toy
    model and its own problems (GRPO and KD rows; the KL clip and the trust region active)."""
    model, tok = engine.load_model("toy/cups_data/model", torch.float32, "cpu")
    cfg = sgpo.Config(kd_loss=kd_loss, kl_clip=0.5, micro_batch_size=3, kd_chunk_size=7,
                      temperature=0.7)
    problems = inputs.load_problems("toy/cups_data/train.jsonl")[:4]
    rows = []
    for i, q in enumerate(problems):
        auto = engine.prompt_ids(tok, cfg, q, guided=False)
        guided = engine.prompt_ids(tok, cfg, q, guided=True)
        working = tok(q["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        answer = tok(f"\\boxed{{{i % 3 + 1}}}", add_special_tokens=False)["input_ids"]
        rows.append(sgpo.GRPORow(auto, answer + [tok.eos_token_id], 0.05, advantage=i - 1.5,
                                 sampler_logps=torch.zeros(len(answer) + 1)))
        rows.append(sgpo.KDRow(auto, working, 0.1 + 0.05 * i, teacher_prompt=guided))
    policy = sgpo.Policy.of(model, tok, "cpu")
    chunked, chunked_grads = _loss_and_grads(policy, rows, cfg)
    plain, plain_grads = _loss_and_grads(
        policy, rows, dataclasses.replace(cfg, chunked_head=False)
    )
    assert chunked.keys() == plain.keys()
    for k in chunked:
        assert plain[k] == pytest.approx(chunked[k], rel=1e-5, abs=1e-6), k
    if kd_loss != "sft":  # the divergence is there to clip and to learn from
        assert chunked["kd/kl_mean"] > 0.5 and 0 < chunked["kd/kl_clip_frac"] < 1
    for n in chunked_grads:
        scale = chunked_grads[n].abs().max()
        assert scale > 0, n
        assert torch.allclose(plain_grads[n], chunked_grads[n], atol=1e-5 * scale, rtol=1e-4), n


def _shared_pairs(tok, cfg):
    """Rows as a micro-batch holds them: a problem's responses (of several lengths) under one
    prompt, a problem with one row, a response of one token, a second prompt shared."""
    g = torch.Generator().manual_seed(3)
    qs = [engine.prompt_ids(tok, cfg, q, guided=False) for q in tiny_rows(3)]
    pairs = []
    for prompt, lengths in zip(qs, ([5, 1, 9, 4], [7], [3, 6])):
        for n in lengths:
            pairs.append((prompt, torch.randint(3, len(tok), (n,), generator=g).tolist()))
    order = torch.randperm(len(pairs), generator=g).tolist()  # rows of a prompt not adjacent
    return [pairs[i] for i in order]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_shared_prompts_same_states_and_gradients(arch):
    """collate_shared (each prompt once, a response seeing its prompt and itself) gives the hidden
    states, targets and parameter gradients of collate (a row each), row by row, padding
    included; and the whole micro-batch loss (GRPO and KD terms) with them."""
    tok, model, cfg = tiny_setup(arch=arch)
    pairs = _shared_pairs(tok, cfg)
    ids, mask, _, pred_idx, _ = engine.collate_shared(pairs, tok.pad_token_id)
    assert ids.shape[0] == 3 and mask.shape == (3, 1, ids.shape[1], ids.shape[1])
    # every predicting position is one row's alone (a deterministic backward of the gather)
    assert len(set(pred_idx.tolist())) == len(pred_idx)
    out = {}
    for share in ("false", "true"):
        policy = sgpo.Policy.of(model, tok, "cpu", share=share)
        assert policy.backbone.shares_prompts(pairs) == (share == "true")
        model.zero_grad()
        hidden, targets = policy.response_hidden(pairs)
        weights = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
        (hidden * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        out[share] = hidden.detach(), targets, grads
    (h0, t0, g0), (h1, t1, g1) = out["false"], out["true"]
    assert torch.equal(t0, t1) and t0.tolist() == [t for _, r in pairs for t in r]
    assert torch.allclose(h0, h1, atol=1e-5) and h0.abs().max() > 0.1
    assert len(g0) == len(g1) == len(list(model.parameters())) - 1  # all but the LM head
    for a, b in zip(g0, g1):  # (float sums in another order: relative to the largest entry)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    # the loss and gradient of a micro-batch of GRPO and KD rows (KD rows share the GRPO rows'
    # prompts), each layout
    rows = training_rows(tok, model, cfg)
    a, b = _grads(model, rows, cfg, tok, "false"), _grads(model, rows, cfg, tok, "true")
    for n in a:
        assert (a[n] - b[n]).abs().max() <= 1e-5 * a[n].abs().max(), n


def test_share_prompts_where_it_costs_fewer_multiply_adds():
    """--share_prompts auto: the shared layout where tokens x weights + (query, key) pairs x
    2 x layers x heads x head_dim is smaller for its padded batch than for a row each (weights:
    all but the embeddings; SDPA computes masked pairs too); true / false force it; a model with
    another attention or a sliding window never shares (its own masks)."""
    tok, model, cfg = tiny_setup()
    c = model.config
    weights = sum(p.numel() for p in model.parameters()) - 2 * c.vocab_size * c.hidden_size
    per_pair = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    backbone = sgpo.Policy.of(model, tok, "cpu").backbone

    def cost(rows, length):
        return rows * length * (weights + length * per_pair)

    seen = set()
    for p, r, n in itertools.product((1, 20, 200), (1, 10, 60), (1, 2, 8)):
        pairs = [([5] * p, [6] * r)] * n
        # shared: the prompt but its last token once, then each row's last prompt token + response
        shared = n > 1 and cost(1, p - 1 + n * r) < cost(n, p + r)
        assert backbone.shares_prompts(pairs) == shared, (p, r, n)
        seen.add(shared)
    assert seen == {True, False}
    assert not backbone.shares_prompts([([5] * 200, [6]), ([7] * 200, [6])])  # prompts differ
    # the widest row sets a row each's padded width
    wide = [([5] * 20, [6] * 10)] * 2 + [([7], [6] * 200)]
    assert backbone.shares_prompts(wide)
    for share in ("true", "false"):
        backbone.share = share
        assert backbone.shares_prompts([([5], [6] * 60)] * 8) == (share == "true")
    with pytest.raises(inputs.UsageError, match="^--share_prompts: must be auto, true or false$"):
        inputs.check_train_config(sgpo.Config(share_prompts="yes"))
    for change in ({"_attn_implementation": "eager"}, {"sliding_window": 4}):
        other = build_model(tok)
        for name, value in change.items():
            setattr(other.config, name, value)
        backbone = engine.Backbone(other, share="true")
        assert not backbone.can_share and not backbone.shares_prompts([([5] * 200, [6])] * 8)
