"""World size 2 (torchrun, gloo) equals world size 1 on the same rollouts."""
import os
import subprocess
import sys
from pathlib import Path

import torch

HELPER = Path(__file__).with_name("ddp_grads.py")


def _run(args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable] + args + [str(HELPER), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_world_size_2_equals_1(tmp_path):
    one = _run([], tmp_path / "one.pt")
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "two.pt")
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        assert g.abs().sum() > 0, name
        assert (g - two["grads"][name]).abs().max() < 1e-6, name
    for key in ("loss/grpo", "loss/kd", "entropy", "kd/kl_mean"):  # metrics are reduced over ranks too
        assert abs(one["metrics"][key] - two["metrics"][key]) < 1e-6, key
