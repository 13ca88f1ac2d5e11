"""Helper for test_ddp.py: accumulate the gradient of fixed rollouts with `python` (all rows) or
under `torchrun --nproc_per_node=2` (rows split unevenly over ranks), once per case, in one launch
(each launch costs seconds of imports on 2 cores); rank 0 saves every case's gradient, metrics and
teacher weights. Then the teardown: the process group destroyed, each rank prints the gloo threads
still alive (after DDP there must be none; see test_ddp.py).

    python tests/ddp_grads.py OUT MODEL_DIR "" "tied shared" "teacher"
    torchrun --nproc_per_node=2 tests/ddp_grads.py OUT MODEL_DIR "ddp" "fsdp tied shared" ...

A case's words: fsdp (FSDP2, else DDP), tied (the LM head is the input embedding), shared
(--share_prompts true: a prompt's rows in one sequence; else a row each), teacher (a teacher of its
own weights, as --teacher base/ema, which then moves halfway to the policy by sgpo.move_teacher).
MODEL_DIR: a saved model that transformers loads after the process group exists, as sgpo.py does
(the case the teardown guards)."""

import copy
import functools
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.conftest import tiny_setup, training_rows  # noqa: E402
from tests.scripted_step import full  # noqa: E402

shared_forwards = []
engine.collate_shared = functools.partial(
    lambda real, *a: shared_forwards.append(1) or real(*a), engine.collate_shared)


def run_case(flags):
    torch.manual_seed(0)
    shared_forwards.clear()
    tok, model, cfg = tiny_setup(tied="tied" in flags)
    share = "true" if "shared" in flags else "false"
    cfg.micro_batch_size = 2
    rows = training_rows(tok, model, cfg, n=6)  # identical on every rank; loss weights are global
    teacher = None
    if "teacher" in flags:
        # the policy's weights, each moved by seeded noise: a teacher that is not the live policy
        teacher = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn(p.shape))
    wrap = teacher_wrap = lambda b: b  # noqa: E731 (Policy.of's default: no wrapper)
    if dist.is_initialized():
        # rank 0: all KD rows and most autonomous ones (several passes); rank 1: two autonomous
        # rows (one pass, then passes on the zero-weight filler) and so no KD metrics at all
        last = [r for r in rows if isinstance(r, sgpo.GRPORow)][-2:]
        rows = [r for r in rows if all(r is not x for x in last)] if dist.get_rank() == 0 else last
        wrap = DDP
        if "fsdp" in flags:
            wrap = teacher_wrap = functools.partial(
                runtime.shard_fsdp, param_dtype=runtime.compute_dtype(cfg.dtype),
                device=torch.device("cpu"))
    policy = sgpo.Policy.of(model, tok, "cpu", wrap, share)
    if teacher is not None:
        policy.teacher = sgpo.Policy.of(teacher, tok, "cpu", teacher_wrap, share)
    stats = runtime.Stats()
    sgpo.take_pi_old(policy, rows, cfg, stats)
    sgpo.accumulate_gradients(policy, rows, cfg, stats)
    result = {
        "metrics": stats.reduce("cpu"),
        "grads": {n: full(p.grad) for n, p in model.named_parameters()},
        "teacher": {},
        "shared_forwards": len(shared_forwards),
    }
    if teacher is not None:
        sgpo.move_teacher(policy, 0.5)
        result["teacher"] = {n: full(p).detach().clone() for n, p in teacher.named_parameters()}
    return result


def gloo_threads():
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    return [t for t in names if "gloo" in t]


out_path, model_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
ddp, rank, _, _ = runtime.setup_distributed()
if ddp:
    engine.load_model(model_dir, torch.float32, "cpu")
results = {case: run_case(case.split()) for case in cases}
if rank == 0:
    torch.save(results, out_path)
if ddp:
    # DDP's reducer holds the process group: freed at interpreter exit, gloo's threads can abort it
    # ("terminate called without an active exception"). The cases' wrappers are gone by now.
    gc.collect()
    dist.destroy_process_group()
    # The transport thread is joined when the group's last reference goes, which can be a moment
    # after destroy returns (seen once: rank 1 still listed gloo_tcp_loop); a leak stays for good.
    deadline = time.monotonic() + 10
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"rank {rank} gloo threads after destroy: {gloo_threads()}\n", end="", flush=True)
