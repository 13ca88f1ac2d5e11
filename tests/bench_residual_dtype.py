"""The bf16 step under DDP and under FSDP, measured: one micro-batch's token log-probs and
gradient (GRPO and KD rows, tests/conftest.training_rows) under DDP (autocast over fp32 weights)
and under FSDP2 (weights gathered in bf16), each against the fp32 step, and the dtype of the
hidden states (the residual stream; docs/memory_and_speed.md, "Mixed precision").

    torchrun --nproc_per_node=1 tests/bench_residual_dtype.py [MODEL_DIR]   # default: tiny model
"""

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.conftest import tiny_setup, training_rows  # noqa: E402
from tests.scripted_step import full  # noqa: E402


def step(model_dir, mode, dtype):
    """(the rows' token log-probs, {name: gradient}, the hidden states' dtype) of one
    micro-batch."""
    torch.manual_seed(0)
    if model_dir:
        lm, tok = engine.load_model(model_dir, torch.float32, "cpu")
        cfg = sgpo.Config(micro_batch_size=64, kd_chunk_size=64)
    else:
        tok, lm, cfg = tiny_setup()
        cfg.micro_batch_size = 64
    cfg.dtype = dtype
    if mode == "fsdp":
        wrap = lambda b: runtime.shard_fsdp(b, runtime.compute_dtype(dtype),  # noqa: E731
                                            torch.device("cpu"))
    else:
        wrap = DDP
    policy = sgpo.Policy.of(lm, tok, "cpu", wrap, "false")
    rows = training_rows(tok, lm, cfg, n=6)
    seen = []
    hook = policy.backbone.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    stats = runtime.Stats()
    sgpo.take_pi_old(policy, rows, cfg, stats)
    sgpo.accumulate_gradients(policy, rows, cfg, stats)
    hook.remove()
    grads = {n: full(p.grad).detach().clone() for n, p in lm.named_parameters()}
    return torch.cat([r.old_logps for r in rows]), grads, seen[0]


def relative(a, b):
    num = sum(((a[n] - b[n]) ** 2).sum() for n in a) ** 0.5
    return float(num / sum((b[n] ** 2).sum() for n in b) ** 0.5)


if __name__ == "__main__":
    model_dir = sys.argv[1] if len(sys.argv) > 1 else None
    runtime.setup_distributed()
    ref_logp, ref_grads, _ = step(model_dir, "ddp", "fp32")
    runs = {mode: step(model_dir, mode, "bf16") for mode in ("ddp", "fsdp")}
    for mode, (logp, grads, hidden) in runs.items():
        gap = (logp - ref_logp).abs()
        print(f"{mode} bf16: hidden states {hidden}; token log-probs vs fp32: mean |diff| "
              f"{gap.mean():.2e}, max {gap.max():.2e}; gradient's relative L2 gap to fp32 "
              f"{relative(grads, ref_grads):.2e}")
    (l0, g0, _), (l1, g1, _) = runs["ddp"], runs["fsdp"]
    gap = (l0 - l1).abs()
    print(f"ddp vs fsdp bf16: token log-probs mean |diff| {gap.mean():.2e}, max {gap.max():.2e}; "
          f"gradient's relative L2 gap {relative(g1, g0):.2e}")
