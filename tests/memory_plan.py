"""Per-GPU memory of a run, from a model's config (no download: parameters counted on the meta
device): an arithmetic table, and a simulation of the project's own step (tests/simulate.py).

    python tests/memory_plan.py       # Qwen2.5-1.5B and 7B under paper.args, 8 GPUs
    python tests/memory_plan.py --config path/to/config.json --world 4 --generation_batch_size 32
    python tests/memory_plan.py --simulate    # 7B, paper.args, FSDP x 8: one step, fake tensors
    python tests/memory_plan.py --simulate --config Qwen2.5-1.5B-Instruct -- --fsdp false
    python tests/memory_plan.py --simulate --config out/smollm2/config.json --flags my.args \
        --world 2 -- --micro_batch_size 4   # any HF config; sgpo.py flags after --

Arithmetic (bytes): fp32 master weights 4/param, fp32 gradients 4, AdamW moments 8, with --teacher
base/ema the teacher's fp32 weights 4 (DDP: all on every GPU; FSDP: divided by the world size); bf16
compute copy of the weights 2/param (DDP: autocast's cast cache during a forward; FSDP: the full
weights gathered for generation); KV cache of one generate call = sequences x (prompt + new tokens)
x 2 (K, V) x layers x kv_heads x head_dim x 2 (bf16); KD loss chunk = kd_chunk_size x vocab x 14 (3
fp32 and one bf16 [chunk, V] tensors live, measured: tests/bench_kd_memory.py); activations under
gradient checkpointing (estimate) = micro-batch tokens x (hidden x layers + ~3 x intermediate + ~8 x
hidden of the recomputed layer) x 2.
"""

import argparse
import json
import os
import sys

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
        teacher = 0 if args.teacher == "live" else 4 * n / shard
        states = 16 * n / shard + teacher
        gen = states + 2 * n + kv_call
        train = (
            states
            + (2 * n if shard == 1 else 2 * 2 * n / config.num_hidden_layers)
            + act
            + kd_chunk
        )
        out[mode] = dict(
            weights_grads_adam=states / GB, teacher=teacher / GB, bf16_weights=2 * n / GB,
            kv_cache_per_call=kv_call / GB,
            generate_calls=calls, kd_chunk=kd_chunk / GB, activations=act / GB,
            peak_generation=gen / GB, peak_update=train / GB
        )
    return out


# What the time estimate assumes: H100 SXM 80 GB
PEAK_BF16 = 989e12  # dense bf16 FLOP/s
HBM = 3.35e12  # bytes/s
MFU = 0.4  # utilisation of the forward/backward passes (scoring, update, prefill)


def simulated(args, flags) -> dict:
    """One RL step of sgpo.py simulated (tests/simulate.py) for args.config under args.flags and
    the sgpo.py flags after --, on rank 0 of a fake process group of args.world ranks; printed per
    phase, with FLOPs and a time estimate; returns the JSON line's fields."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sgpo
    from tests.simulate import categories, fake_world, simulate
    name = args.config or "Qwen2.5-7B-Instruct"
    config = (AutoConfig.for_model(**CONFIGS[name]) if name in CONFIGS
              else AutoConfig.from_pretrained(name))
    with fake_world(args.world):
        cfg = sgpo.parse_args([f"@{args.flags}", "--model", "m", "--data", "d", *flags])
        # the GPU run's "auto"
        cfg.dtype = "bf16" if cfg.dtype == "auto" else cfg.dtype
        out = simulate(config, cfg, args.prompt_tokens)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    mode = f"FSDP x{args.world}" if cfg.fsdp else f"DDP x{args.world}"
    print(f"{name} ({n / 1e9:.2f}B parameters), {mode}, {args.flags} {' '.join(flags)}: "
          f"one step on rank 0, simulated")
    names = list(categories(out, "update"))
    print("| phase | peak GB | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2))
    for phase in ("generation", "scoring", "update"):
        parts = categories(out, phase)
        print(f"| {phase} | **{out[phase]['peak'] / GB:.1f}** | "
              + " | ".join(f"{parts[k] / GB:.1f}" for k in names) + " |")
    print(f"KV cache of a generate call at its final length: {out['kv_cache'] / GB:.1f} GB; "
          f"gradients {out['gradients'] / GB:.1f} GB, AdamW state "
          f"{out['resident']['optimizer_state'] / GB:.1f} GB")
    times = step_time(out, cfg, n, args.prompt_tokens)
    print(f"time of one step on {args.world} x H100 (estimate: bf16 {PEAK_BF16 / 1e12:.0f} "
          f"TFLOP/s at {MFU:.0%} for the passes, decoding bound by reading the bf16 weights and "
          f"the KV cache at {HBM / 1e12:.2f} TB/s, every response at max_completion_length): "
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; {cfg.max_steps} steps: {sum(times.values()) * cfg.max_steps / 3600:.0f} h "
          "(the paper: ~17 h for 7B on 32 GPUs, its lengths unpublished)")
    return dict(model=name, world=args.world, fsdp=cfg.fsdp,
                peak_gb=round(max(out[p]["peak"] for p in times) / GB, 2),
                **{f"{p}_gb": round(out[p]["peak"] / GB, 2) for p in times},
                **{f"{p}_tflop": round(out[p]["flops"] / 1e12, 1) for p in times},
                step_s=round(sum(times.values())))


def step_time(out, cfg, n: int, prompt_tokens: int) -> dict:
    """Seconds per phase of one step, from the simulated FLOPs, scaled to the step's counts: the
    generate calls (prefill at MFU, max_completion_length decode steps each reading the weights
    and the KV cache at half its final length), the scoring micro-batches (G2 candidates a
    problem at most), the update's micro-batches (G1 + 1 rows a problem, mu epochs)."""
    rollouts = cfg.batch_size * (cfg.num_generations + cfg.num_guided_generations)
    calls = -(-rollouts // (cfg.generation_batch_size or rollouts))
    decode = (2 * n + out["kv_cache"] / 2) / HBM * cfg.max_completion_length
    passes = out["generation"]["flops"] / (PEAK_BF16 * MFU)
    scoring = -(-cfg.batch_size * cfg.num_guided_generations // cfg.micro_batch_size)
    update = -(-cfg.batch_size * (cfg.num_generations + 1) // cfg.micro_batch_size)
    return dict(
        generation=calls * (decode + passes),
        scoring=scoring * out["scoring"]["flops"] / (PEAK_BF16 * MFU),
        update=cfg.num_iterations * update / 2 * out["update"]["flops"] / (PEAK_BF16 * MFU))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--simulate", action="store_true",
                   help="run one step of the project's code on fake tensors (tests/simulate.py)")
    p.add_argument("--flags", default="paper.args", help="--simulate: sgpo.py's flags file")
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
    p.add_argument("--teacher", default="live", choices=["live", "base", "ema"],
                   help="base/ema: the teacher's own fp32 weights (in the first column)")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.simulate:
        print(json.dumps(simulated(args, flags)))
        return
    configs = (
        {args.config: AutoConfig.from_pretrained(args.config)}
        if args.config
        else {k: AutoConfig.for_model(**v) for k, v in CONFIGS.items()}
    )
    print(
        "| model | mode | weights + grads + AdamW (+ teacher) | bf16 weights "
        "| KV cache / generate call "
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
