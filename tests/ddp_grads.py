"""Helper for test_ddp.py: accumulate the gradient of fixed rollouts with `python` (all rows) or
under `torchrun --nproc_per_node=2` (rows split unevenly over ranks, DDP over gloo, or FSDP2 with
the argument `fsdp`; with `tied`, a model whose LM head is its input embedding; with `teacher`, a
teacher of its own weights (--teacher base/ema), which then moves halfway to the policy by
sgpo.move_teacher); rank 0 saves it, and the teacher's weights."""

import copy
import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.conftest import tiny_setup, training_rows  # noqa: E402

out_path = sys.argv[1]
torch.manual_seed(0)
# arguments after the output path: fsdp (else DDP), tied (the LM head shares the input embedding),
# shared (--share_prompts true: a prompt's rows in one sequence; else a row each)
tok, model, cfg = tiny_setup(tied="tied" in sys.argv[2:])
share = "true" if "shared" in sys.argv[2:] else "false"
shared_forwards = []
engine.collate_shared = functools.partial(
    lambda real, *a: shared_forwards.append(1) or real(*a), engine.collate_shared)
cfg.micro_batch_size = 2
rows = training_rows(tok, model, cfg, n=6)  # identical on every rank; loss weights are global
teacher = None
if "teacher" in sys.argv[2:]:
    # the policy's weights, each moved by seeded noise: a teacher that is not the live policy
    teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape))
if "RANK" in os.environ:
    # imported before the process group, as runtime.setup_distributed does: imported after, it
    # holds the group, and gloo's threads can abort the interpreter's exit
    __import__("torch.distributed.checkpoint")
    dist.init_process_group("gloo")
    # rank 0: all KD rows and most autonomous ones (several passes); rank 1: two autonomous rows
    # (one pass, then zero-loss passes) and so no KD metrics at all
    last = [r for r in rows if isinstance(r, sgpo.GRPORow)][-2:]
    rows = [r for r in rows if all(r is not x for x in last)] if dist.get_rank() == 0 else last
    fsdp = "fsdp" in sys.argv[2:]
    wrap = (
        (lambda b: runtime.shard_fsdp(b, runtime.compute_dtype(cfg.dtype), torch.device("cpu")))
        if fsdp
        else DDP
    )
    policy = sgpo.Policy.of(model, tok, "cpu", wrap, share)
    if teacher is not None:
        policy.teacher = sgpo.Policy.of(teacher, tok, "cpu", wrap if fsdp else lambda b: b, share)
else:
    policy = sgpo.Policy.of(model, tok, "cpu", share=share)
    if teacher is not None:
        policy.teacher = sgpo.Policy.of(teacher, tok, "cpu", share=share)
stats = runtime.Stats()
sgpo.accumulate_gradients(policy, rows, cfg, stats, pi_old_now=True)
metrics = stats.reduce("cpu")
grads = {
    n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    for n, p in model.named_parameters()
}
teacher_weights = {}
if teacher is not None:
    sgpo.move_teacher(policy, cfg, rate=0.5)
    for n, p in teacher.named_parameters():
        teacher_weights[n] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({"grads": grads, "metrics": metrics, "teacher": teacher_weights,
                "shared_forwards": len(shared_forwards)}, out_path)
if dist.is_initialized():
    # DDP's reducer holds the process group: freed at interpreter exit, gloo's threads abort
    # ("terminate called without an active exception", 1 run in 5 here). Release it first.
    del policy
    dist.destroy_process_group()
