"""World size 2 (torchrun, gloo) equals world size 1 on the same rollouts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).with_name("ddp_grads.py")


def _run(args, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable] + args + [str(HELPER), str(out), *extra], capture_output=True, text=True,
        env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


ONE_RANK = {}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp tied shared", "ddp teacher", "fsdp teacher"])
def test_world_size_2_equals_1(tmp_path, parallel):
    """Rank 1 has no KD rows and fewer micro-batches: under FSDP its extra teacher and zero-loss
    forwards keep the collectives matched (a missing one hangs). Tied: the LM head is the input
    embedding, whose gradient comes from ChunkedHead and from the embedding lookup (FSDP with the
    live teacher; untied FSDP: with a teacher here, live in tests/test_minibatches.py). Teacher: a
    teacher of its own weights (--teacher base/ema; under FSDP sharded like the policy) gives the
    same gradient, and moves halfway to the policy (the EMA step) to the same weights. Shared:
    the loss's forwards with a prompt's rows in one sequence (a 4-D mask through FSDP) on both
    sides; the others a row each."""
    flags = parallel.split()
    # one process: the same for DDP and FSDP, run once per model
    key = tuple(flags[1:])
    if key not in ONE_RANK:
        ONE_RANK[key] = _run([], tmp_path / "one.pt", *flags[1:])
    one = ONE_RANK[key]
    two = _run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "two.pt",
        *flags
    )
    assert one["grads"].keys() == two["grads"].keys()
    assert (one["shared_forwards"] > 0) == (two["shared_forwards"] > 0) == ("shared" in flags)
    for name, g in one["grads"].items():
        assert g.abs().sum() > 0, name
        assert (g - two["grads"][name]).abs().max() < 1e-6, name
    # metrics are reduced over ranks too
    for key in ("loss/grpo", "loss/kd", "entropy", "kd/kl_mean"):
        assert abs(one["metrics"][key] - two["metrics"][key]) < 1e-6, key
    assert one["teacher"].keys() == two["teacher"].keys()
    assert bool(one["teacher"]) == ("teacher" in flags)
    for name, w in one["teacher"].items():
        assert torch.equal(w, two["teacher"][name]), name


def test_process_group_freed_by_destroy(tiny_dir):
    """After destroy_process_group() no gloo thread may survive into interpreter exit, where it can
    abort the process ("terminate called without an active exception"; seen in ~1 of 10 torchrun
    runs when transformers' loading imported torch.distributed.checkpoint after init_process_group
    and so kept the group alive)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(Path(__file__).with_name("ddp_teardown.py")), str(tiny_dir)
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"rank {r} gloo threads after destroy: []" in proc.stdout for r in (0, 1)), (
        proc.stdout
    )


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    """--ddp_timeout: how long a collective waits for a rank still generating (torch's NCCL default
    is 10 min)."""
    import datetime

    import torch.distributed as dist

    import runtime
    import sgpo

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert runtime.setup_distributed(sgpo.parse_args(["--ddp_timeout", "7200"]).ddp_timeout)[
        :3
    ] == (True, 0, 1)
    assert seen["timeout"] == datetime.timedelta(seconds=7200)
    assert sgpo.Config().ddp_timeout == 1800
