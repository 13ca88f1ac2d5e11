"""Per-GPU memory of a run, from a model's config (no download: parameters counted on the meta
device).

    python tests/memory_plan.py       # Qwen2.5-1.5B and 7B under paper.args, 8 GPUs
    python tests/memory_plan.py --config path/to/config.json --world 4 --generation_batch_size 32

Arithmetic (bytes): fp32 master weights 4/param, fp32 gradients 4, AdamW moments 8 (DDP: all on
every GPU; FSDP: divided by the world size); bf16 compute copy of the weights 2/param (DDP:
autocast's cast cache during a forward; FSDP: the full weights gathered for generation); KV cache of
one generate call = sequences x (prompt + new tokens) x 2 (K, V) x layers x kv_heads x head_dim x 2
(bf16); KD loss chunk = kd_chunk_size x vocab x 14 (3 fp32 and one bf16 [chunk, V] tensors live,
measured: tests/bench_kd_memory.py); activations under gradient checkpointing (estimate) =
micro-batch tokens x (hidden x layers + ~3 x intermediate + ~8 x hidden of the recomputed layer)
x 2.
"""

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# The published config.json values of the two models of the paper's table (hub, 2024-09), what
# matters for memory.
QWEN = dict(
    model_type="qwen2", max_position_embeddings=32768, rope_theta=1e6, torch_dtype="bfloat16"
)
CONFIGS = {
    "Qwen2.5-1.5B-Instruct": dict(
        QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True
    ),
    "Qwen2.5-7B-Instruct": dict(
        QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False
    ),
}
GB = 1e9


def plan(config, args) -> dict:
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    seq = args.prompt_tokens + args.max_completion_length
    calls = -(-args.batch_size * args.rollouts // args.generation_batch_size)
    mb_tokens = args.micro_batch_size * seq
    act = (
        mb_tokens
        * (
            config.hidden_size * config.num_hidden_layers
            + 3 * config.intermediate_size
            + 8 * config.hidden_size
        )
        * 2
    )
    kv_call = args.generation_batch_size * seq * kv_per_token
    kd_chunk = args.kd_chunk_size * config.vocab_size * 14
    out = {"parameters (B)": n / 1e9, "KV cache per token (KB)": kv_per_token / 1e3}
    for mode, shard in (("DDP", 1), (f"FSDP x{args.world}", args.world)):
        states = 16 * n / shard
        gen = states + 2 * n + kv_call
        train = (
            states
            + (2 * n if shard == 1 else 2 * 2 * n / config.num_hidden_layers)
            + act
            + kd_chunk
        )
        out[mode] = dict(
            weights_grads_adam=states / GB, bf16_weights=2 * n / GB, kv_cache_per_call=kv_call / GB,
            generate_calls=calls, kd_chunk=kd_chunk / GB, activations=act / GB,
            peak_generation=gen / GB, peak_update=train / GB
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--config", help="a config.json (default: the two Qwen2.5 models)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16, help="problems per GPU per step")
    p.add_argument("--rollouts", type=int, default=12, help="G1 + G2")
    p.add_argument("--generation_batch_size", type=int, default=64)
    p.add_argument(
        "--prompt_tokens", type=int, default=512, help="longest prompt (guided: problem + strategy)"
    )
    p.add_argument("--max_completion_length", type=int, default=8192)
    p.add_argument("--micro_batch_size", type=int, default=2)
    p.add_argument("--kd_chunk_size", type=int, default=256)
    args = p.parse_args()
    configs = (
        {args.config: AutoConfig.from_pretrained(args.config)}
        if args.config
        else {k: AutoConfig.for_model(**v) for k, v in CONFIGS.items()}
    )
    print(
        "| model | mode | weights + grads + AdamW | bf16 weights | KV cache / generate call "
        "(calls / step) | KD chunk "
        "| activations (est.) | peak in generation | peak in the update "
        "|\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, config in configs.items():
        out = plan(config, args)
        for mode in ("DDP", f"FSDP x{args.world}"):
            m = out[mode]
            print(
                f"| {name} ({out['parameters (B)']:.2f}B, {out['KV cache per token (KB)']:.0f} "
                f"KB/token) | {mode} | "
                f"{m['weights_grads_adam']:.1f} | {m['bf16_weights']:.1f} | "
                f"{m['kv_cache_per_call']:.1f} ({m['generate_calls']}) "
                f"| {m['kd_chunk']:.1f} | {m['activations']:.1f} | **{m['peak_generation']:.1f}** "
                f"| **{m['peak_update']:.1f}** |"
            )


if __name__ == "__main__":
    main()
