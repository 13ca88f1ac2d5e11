"""Tiny, fully offline models with a character tokenizer: the test fixtures, and the architecture of
the cups testbed (toy/cups.py). The tokenizer round-trips through save_pretrained /
from_pretrained."""

import json

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per character, chat markers registered as special tokens
    first."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    # every char, spaces too
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_is_eos else "<|endoftext|>",
        additional_special_tokens=SPECIALS[1:]
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, arch: str = "qwen3", hidden: int = 32, layers: int = 2, seed: int = 0,
                tied: bool = False):
    """A tiny Qwen3 or Llama; tied: the LM head shares the input embedding (as SmolLM2, Gemma)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=tied
    )
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def tiny_rows(n=16):
    """The tests' problems for the tiny model: 'pick a0' -> 3, 'pick b1' -> 7; the strategy says
    the answer, the solution is the boxed answer."""
    return [
        {
            "id": f"q{i}", "problem": f"pick {'ab'[i % 2]}{i}", "answer": "37"[i % 2],
            "strategy": f"say {'37'[i % 2]}", "solution": f"\\boxed{{{'37'[i % 2]}}}"
        }
        for i in range(n)
    ]
