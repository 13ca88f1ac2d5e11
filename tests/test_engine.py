"""engine.py on the tiny models: what a generate call holds (the KV cache's dtype under autocast,
the prefill's logits) and which transformers arguments it uses."""

import functools
import warnings

import pytest
import torch
from transformers import cache_utils

import engine
from tests.conftest import tiny_rows, tiny_setup


def _prompts(tok, cfg, n=3):
    # each prompt twice: the repeated ones are prefilled once, then copied
    return [engine.prompt_ids(tok, cfg, q, guided=False) for q in tiny_rows(n)] * 2


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_kv_cache_is_in_the_compute_dtype_under_autocast(arch, monkeypatch):
    """fp32 master weights under bf16 autocast: the residual stream is fp32, so rotary embeddings
    (and Qwen3's k_norm) give fp32 keys; the cache must hold bf16 keys and values (2 bytes per
    element, as docs/memory_and_speed.md counts)."""
    caches, real = [], engine._kv_cache
    monkeypatch.setattr(engine, "_kv_cache", lambda *a: caches.append(real(*a)) or caches[-1])
    tok, model, cfg = tiny_setup(arch=arch)
    prompts = _prompts(tok, cfg)

    def held():
        return {t.dtype for c in caches for layer in c.layers
                for t in (layer.keys, layer.values, *layer.buffers)}

    for distinct in (prompts, prompts[:3]):  # prefilled by us, and by HF's generate
        caches.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine.generate(model, distinct, tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 6)
        assert held() == {torch.bfloat16}
    caches.clear()
    engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 6)
    assert held() == {torch.float32}  # no autocast: nothing cast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_written_in_place_samples_as_hfs_own(dtype, monkeypatch):
    """The engine's cache (one buffer per layer of the call's final length, written in place)
    samples what HF's DynamicCache (grown by concatenation; here casting to the compute dtype as
    the engine's does) samples, bit for bit, with the same sampler log-probs; its buffers hold
    exactly prompt width + new tokens positions, and keys and values stay views of them."""
    tok, model, cfg = tiny_setup()
    prompts = _prompts(tok, cfg)
    width, new_tokens = max(map(len, prompts)), 12

    class Grown(cache_utils.DynamicCache):
        def update(self, keys, values, *args, **kwargs):
            return super().update(keys.to(dtype), values.to(dtype), *args, **kwargs)

    runs, caches, real = [], [], engine._kv_cache
    for make in (lambda m, d, n: Grown(config=m.config), real):
        monkeypatch.setattr(engine, "_kv_cache", lambda *a: caches.append(make(*a)) or caches[-1])
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            runs.append(engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id],
                                        "cpu", 1.0, new_tokens))
    grown, in_place = runs
    assert [r["ids"] for r in in_place] == [r["ids"] for r in grown]
    assert max(len(r["ids"]) for r in grown) > 1
    for a, b in zip(in_place, grown):
        assert torch.equal(a["sampler_logps"], b["sampler_logps"])
    for layer in caches[-1].layers:
        assert [b.shape[2] for b in layer.buffers] == [width + new_tokens] * 2
        assert layer.keys.data_ptr() == layer.buffers[0].data_ptr()
        assert layer.values.data_ptr() == layer.buffers[1].data_ptr()


def test_kv_cache_buffer_is_made_at_the_first_decode_step():
    """A layer of the engine's cache keeps the prompt's keys and values as they come (a buffer
    made before the prefill would sit beside its activations), makes its buffer of the final
    length at the first decode step, and then holds what HF's concatenation would: the prompt's
    and each step's keys, in order; batch_select_indices picks rows before and after."""
    layer = engine._in_place_layer()(capacity=9, dtype=None)
    prompt = [torch.randn(3, 2, 5, 4) for _ in range(2)]
    keys, values = layer.update(*prompt)
    assert layer.buffers is None and keys is prompt[0] and values is prompt[1]
    layer.batch_select_indices(torch.tensor([2, 0, 0]))
    grown = [t[[2, 0, 0]] for t in prompt]
    for _ in range(3):
        step = [torch.randn(3, 2, 1, 4) for _ in range(2)]
        keys, values = layer.update(*step)
        grown = [torch.cat([g, s], dim=2) for g, s in zip(grown, step)]
        assert [b.shape for b in layer.buffers] == [torch.Size([3, 2, 9, 4])] * 2
        assert torch.equal(keys, grown[0]) and torch.equal(values, grown[1])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, grown[0][[1]]) and layer.get_seq_length() == 8


def test_prefill_computes_logits_at_one_position_only():
    """The prefill of distinct prompts needs no logits (generate recomputes the last position):
    at Qwen's V = 151,936, logits at every prompt position would be a multi-GB transient."""
    tok, model, cfg = tiny_setup()
    prompts = _prompts(tok, cfg)
    lengths = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 4)
    hook.remove()
    assert len(lengths) >= 2 and set(lengths) == {1}


def test_generate_uses_no_deprecated_cache_argument():
    """transformers 5.24 deprecates `past_key_values=` (the model forward drops it in 5.40,
    generate in 6.0, and the prefill's cache would then be ignored); engine.py passes `cache=`."""
    tok, model, cfg = tiny_setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(model, _prompts(tok, cfg), tok.pad_token_id, [tok.eos_token_id], "cpu",
                        1.0, 4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_head_gradient_is_summed_in_fp32_over_chunks():
    """Under FSDP the LM head's weight reaches ChunkedHead as the gathered bf16 parameter; its
    gradient over 64 chunks must be accumulated in fp32 and rounded once (bf16 accumulation: ~4x
    the error). Reference: the same bf16 inputs in fp64."""
    from chunked_head import kd_divergence

    torch.manual_seed(0)
    M, H, V, chunk = 2048, 64, 512, 32  # 64 chunks
    head = torch.nn.Linear(H, V, bias=False).to(torch.bfloat16)
    s_h = torch.randn(M, H, dtype=torch.bfloat16, requires_grad=True)
    t_h = torch.randn(M, H, dtype=torch.bfloat16)
    targets = torch.randint(V, (M,))
    div, logp = kd_divergence(s_h, t_h, targets, head, 1.0, "fkl", chunk_size=chunk)
    (div.sum() - logp.sum()).backward()
    w = head.weight.detach().double().requires_grad_(True)
    log_s = (s_h.detach().double() @ w.T).log_softmax(-1)
    log_t = (t_h.double() @ w.detach().T).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    (kl.sum() - log_s.gather(-1, targets[:, None]).sum()).backward()
    error = (head.weight.grad.double() - w.grad).norm() / w.grad.norm()
    assert head.weight.grad.dtype == torch.bfloat16
    assert error < 0.005, error  # measured: 0.0026 (accumulated in bf16: 0.0096)


def test_dtype_auto_is_fp32_where_bf16_is_only_emulated(monkeypatch):
    """V100 and T4 run bf16 only by emulation: `torch.cuda.is_bf16_supported()` says True unless
    asked including_emulation=False."""
    import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation)
    assert runtime.compute_dtype("auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.compute_dtype("auto") == torch.bfloat16
    assert runtime.compute_dtype("fp32") == torch.float32


def test_evaluate_passes_its_timeout_to_the_process_group(monkeypatch, tmp_path):
    """evaluate.py under torchrun: its final gather waits --ddp_timeout seconds for the slowest
    rank, not the process group's 30-minute default."""
    import evaluate
    import runtime

    seen = []

    def stop(timeout_s=1800):
        seen.append(timeout_s)
        raise SystemExit(0)

    monkeypatch.setattr(runtime, "setup_distributed", stop)
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"problem": "p", "answer": "1"}\n')
    for flags, expected in (([], 7200), (["--ddp_timeout", "60"], 60)):
        with pytest.raises(SystemExit):
            evaluate.main(["--bench", f"b={bench}:1", "--output_dir", str(tmp_path / "o")] + flags)
        assert seen.pop() == expected


def _config_only_model(folder, config):
    """A model folder with the tiny tokenizer and only a config: sgpo.py must refuse it before
    the weights load."""
    from toy.tiny import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gemma2_softcap", "cohere_scale", "granite_scaling",
                                  "gemma3_vision"])
def test_models_the_loss_cannot_train_are_refused_in_one_line(kind, tmp_path, data_file, capsys):
    """A final logit soft-cap (Gemma-2, Gemma-3n), a logit_scale (Cohere) or logits_scaling
    (Granite) changes the distribution the model samples from, which ChunkedHead's h @ W.T / T does
    not apply; a multimodal checkpoint carries a vision tower DDP cannot train. One line, exit 2,
    nothing written."""
    import sgpo
    from transformers import CohereConfig, Gemma2Config, Gemma3Config, GraniteConfig

    config, expected = {
        "gemma2_softcap": (Gemma2Config(), "its logits are post-processed "
                           "(final_logit_softcapping = 30.0), which sgpo.py's loss does not apply"),
        "cohere_scale": (CohereConfig(), "(logit_scale = 0.0625)"),
        "granite_scaling": (GraniteConfig(logits_scaling=8.0), "(logits_scaling = 8.0)"),
        "gemma3_vision": (Gemma3Config(), "a multimodal checkpoint (gemma3, vision_config); "
                          "sgpo.py trains text-only causal LMs"),
    }[kind]
    model = _config_only_model(tmp_path / "model", config)
    out = tmp_path / "out"
    assert sgpo.main(["--model", str(model), "--data", str(data_file), "--output_dir", str(out),
                      "--eval_data", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {model}: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


def _gemma_like_tokenizer():
    """A character tokenizer whose chat template closes a turn with <end_of_turn>, while its eos
    token is <eos> (as Gemma's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from toy.tiny import CHARS

    specials = ["<pad>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + CHARS)}, "<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>",
                                  additional_special_tokens=specials[2:])
    tok.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return tok


def _gguf_like_tokenizer(template=None):
    """A ChatML character tokenizer built the way a GGUF conversion builds one: the chat markers
    are added tokens flagged special (tokenizer.added_tokens_decoder) but not named (not in
    all_special_ids); the eos token is <|endoftext|>, which the template never writes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from toy.tiny import CHARS, CHAT_TEMPLATE, SPECIALS

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + CHARS)},
                                      "<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = template or CHAT_TEMPLATE
    return tok


def test_turn_end_comes_from_the_chat_template():
    from toy.tiny import build_tokenizer

    chatml = build_tokenizer()
    assert engine.turn_end_ids(chatml) == [chatml.convert_tokens_to_ids("<|im_end|>")]
    gemma = _gemma_like_tokenizer()
    assert engine.turn_end_ids(gemma) == [gemma.convert_tokens_to_ids("<end_of_turn>")]
    assert gemma.eos_token_id != gemma.convert_tokens_to_ids("<end_of_turn>")
    # converted from GGUF: <|im_end|> is special only in added_tokens_decoder
    gguf = _gguf_like_tokenizer()
    im_end = gguf.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in gguf.all_special_ids and gguf.added_tokens_decoder[im_end].special
    assert engine.turn_end_ids(gguf) == [im_end] != [gguf.eos_token_id]
    # a template that writes text, then the marker: the turn end is all of it
    words = _gguf_like_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }} END<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert words.decode(engine.turn_end_ids(words)) == " END<|im_end|>"
    # a template that writes no special token after the content: the eos token
    plain = _gguf_like_tokenizer(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    assert engine.turn_end_ids(plain) == [plain.eos_token_id]


def test_data_fit_check_counts_the_turn_end_as_written(tmp_path):
    """The warm-up response is the solution and the template's turn end (here ' END<|im_end|>', 5
    tokens): a solution that fits with one end token but not with five is refused, naming its row
    and field."""
    import inputs
    import sgpo
    from tests.conftest import tiny_rows
    from toy.tiny import write_jsonl

    tok = _gguf_like_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }} END<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = tiny_rows(16)
    cfg = sgpo.Config(data=str(tmp_path / "d.jsonl"), eval_data="", sft_epochs=1)
    prompt = len(engine.prompt_ids(tok, cfg, rows[3], guided=False))
    config = type("Config", (), {"max_position_embeddings": 1024})()

    def check(solution_len):
        rows[3]["solution"] = "x" * solution_len
        write_jsonl(tmp_path / "d.jsonl", rows)
        _, _, _, check = inputs.load_train_data(
            cfg, lambda t, q, guided: len(engine.prompt_ids(t, cfg, q, guided)),
            lambda t: len(engine.turn_end_ids(t)))
        check(tok, config)

    with pytest.raises(inputs.UsageError, match=r"d.jsonl:4: solution: needs 1026 tokens"):
        check(1024 - prompt - 3)  # fits with 1 end token, not with 5
    check(1024 - prompt - 5)  # exactly the context: fits


def test_warmup_teaches_the_templates_turn_end_and_generation_stops_there(
        tmp_path, data_file, monkeypatch):
    """A template whose turn end is not the eos token: the SFT warm-up must append <end_of_turn>
    (appending <eos> would teach an ending the chat format never uses), and generation must stop
    at it."""
    import sgpo
    from toy.tiny import build_model

    tok = _gemma_like_tokenizer()
    build_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    seen, real = [], sgpo.accumulate_gradients
    monkeypatch.setattr(sgpo, "accumulate_gradients",
                        lambda *a, **k: seen.extend(a[1]) or real(*a, **k))
    args = ["--model", tmp_path / "model", "--data", data_file, "--output_dir", tmp_path / "out",
            "--sft_epochs", 1, "--max_steps", 0, "--batch_size", 8, "--eval_data", ""]
    assert sgpo.main([str(a) for a in args]) == 0
    assert len(seen) == 16 and all(r.response[-1] == end for r in seen)
    assert all(tok.eos_token_id not in r.response for r in seen)
    model, _ = engine.load_model(str(tmp_path / "model"), torch.float32, "cpu")
    assert end in model.generation_config.eos_token_id


@pytest.mark.parametrize("tied", [False, True])
def test_one_call_or_a_call_per_mode_by_what_a_decode_step_reads(tied):
    """--generate_by_mode auto: both modes in one call while the weights a decode step reads (all
    but an untied input embedding) are at least the KV cache of a call's rows at full length
    (rows x (longest prompt + new tokens) x 2 x layers x kv heads x head dim elements), a call
    per mode past that; generation_batch_size bounds a call's rows; true / false force."""
    tok, model, cfg = tiny_setup(tied=tied)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    weights = sum(p.numel() for p in model.parameters())
    if not tied:
        weights -= c.vocab_size * c.hidden_size
    cfg.max_completion_length, rows = 10, 4
    fits = weights // (rows * per_token) - cfg.max_completion_length  # longest prompt that fits
    assert fits > 1
    policy = engine.Policy.of(model, tok, "cpu")
    decide = functools.partial(engine.sample_in_one_call, policy, cfg=cfg)
    assert decide([[5] * fits] * rows)
    assert not decide([[5] * (fits + 1)] * rows)
    assert not decide([[5]] * (rows - 1) + [[5] * (fits + 1)])  # the longest prompt counts
    cfg.generation_batch_size = rows // 2
    assert decide([[5] * (fits + 1)] * rows)
    for forced, one in (("true", False), ("false", True)):
        cfg.generate_by_mode = forced
        assert decide([[5]]) == decide([[5] * 10 * fits] * rows) == one


@pytest.mark.parametrize("eos", [5, [6, 7]])
def test_warmup_falls_back_on_the_first_eos_id_an_int_or_a_list(eos, monkeypatch):
    """A tokenizer whose chat template writes no special token after a turn and that has no eos
    token: the warm-up's solutions end with the model's first eos id, given as an id or a list."""
    import sgpo
    tok, model, cfg = tiny_setup()
    model.generation_config.eos_token_id = eos
    cfg.sft_epochs, cfg.batch_size = 1, 4
    seen, real = [], sgpo.accumulate_gradients
    monkeypatch.setattr(sgpo, "turn_end_ids", lambda tokenizer: [None])
    monkeypatch.setattr(sgpo, "accumulate_gradients",
                        lambda *a, **k: seen.extend(a[1]) or real(*a, **k))
    policy = sgpo.Policy.of(model, tok, "cpu")
    sgpo.sft_warmup(tiny_rows(4), policy, cfg, lambda record: None)
    first = eos if isinstance(eos, int) else eos[0]
    assert len(seen) == 4 and all(r.response[-1] == first for r in seen)
