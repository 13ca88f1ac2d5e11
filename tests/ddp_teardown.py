"""Helper for test_ddp.py: under torchrun, sgpo's DDP preamble, a model loaded by transformers, a
collective, and the teardown; prints the gloo threads still alive after destroy_process_group (there
must be none)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402

ddp, rank, world, device = runtime.setup_distributed()
model, tok = engine.load_model(sys.argv[1], torch.float32, device)
runtime.all_gather_objects(rank)
dist.destroy_process_group()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(
    f"rank {rank} gloo threads after destroy: {[t for t in threads if 'gloo' in t]}\n", end="",
    flush=True
)
