"""Helper of tests/test_fsdp_load.py: under torchrun with --fsdp, engine.load_policy as sgpo.py
calls it (a base teacher too); each rank prints its resident memory before loading and its peak
(VmHWM, reset first) up to the moment the policy's weights are sharded and in place (the first
forward, FSDP's root initialisation: on a CPU its gathered units are host memory too, on a GPU
not); rank 0 then compares the policy's and the teacher's weights (gathered) and the buffers with
from_pretrained's, bit for bit, and prints the verdict.

    torchrun --nproc_per_node=2 tests/fsdp_load.py MODEL_DIR [live|base]
"""

import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from tests.scripted_step import full  # noqa: E402


def memory_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


model_dir = sys.argv[1]
ddp, rank, world, device = runtime.setup_distributed(60)
cfg = sgpo.Config(model=model_dir, fsdp=True, teacher=sys.argv[2] if len(sys.argv) > 2 else "base")
# the tokenizer and config parsed, transformers' model classes imported: what loading adds is
# the weights
AutoTokenizer.from_pretrained(model_dir)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
runtime.barrier()
before = memory_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (the peak) to the current resident size
peaks, real_forward = [], engine.Backbone.forward


def forward(self, *args):
    peaks.append(memory_kb("VmHWM"))
    return real_forward(self, *args)


engine.Backbone.forward = forward
policy = engine.load_policy(cfg, None, ddp, device)
engine.Backbone.forward = real_forward
peak = peaks[0]
print(f"rank {rank}: rss_before_mb={before / 1024:.0f} load_peak_mb={peak / 1024:.0f} "
      f"added_mb={(peak - before) / 1024:.0f}", flush=True)
views = {"weights": policy.lm.named_parameters(), "buffers": policy.lm.named_buffers()}
if policy.teacher:
    views["teacher"] = policy.teacher.lm.named_parameters()
gathered = {kind: {n: full(t).detach() for n, t in view} for kind, view in views.items()}
if rank == 0:
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for kind, tensors in gathered.items():
        want = dict(ref.named_buffers() if kind == "buffers" else ref.named_parameters())
        same = tensors.keys() == want.keys() and all(
            torch.equal(tensors[n], want[n]) for n in want)
        print(f"rank 0: {kind} equal to from_pretrained's: {same}", flush=True)
runtime.barrier()
