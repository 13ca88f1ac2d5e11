"""World size 2 (torchrun, gloo) equals world size 1 on the same rollouts."""

import pytest
import torch

from tests.conftest import run_sgpo

CASES = ["ddp", "fsdp tied shared", "ddp teacher", "fsdp teacher"]


def _run(nproc, out, model_dir, cases):
    """Every case in one launch of tests/ddp_grads.py: (its stdout, {case: result})."""
    proc = run_sgpo([out, model_dir, *cases], nproc, script="tests/ddp_grads.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, torch.load(out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_dir):
    """One process: the same for DDP and FSDP, run once per model."""
    models = sorted({" ".join(case.split()[1:]) for case in CASES})
    return _run(0, tmp_path_factory.mktemp("one") / "grads.pt", tiny_dir, models)[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_dir):
    """Two launches: the DDP cases (their teardown must free the group's threads) and the FSDP
    ones (fully_shard's device mesh stays in DTensor's caches, and with it the group, until the
    interpreter exits). Returns (the DDP launch's stdout, {case: result})."""
    launches = {}
    for kind in ("ddp", "fsdp"):
        cases = [case for case in CASES if case.startswith(kind)]
        launches[kind] = _run(2, tmp_path_factory.mktemp(kind) / "grads.pt", tiny_dir, cases)
    return launches["ddp"][0], {**launches["ddp"][1], **launches["fsdp"][1]}


@pytest.mark.parametrize("parallel", CASES)
def test_world_size_2_equals_1(one_rank, two_ranks, parallel):
    """Rank 1 has no KD rows and fewer micro-batches: under FSDP its extra teacher and filler
    forwards keep the collectives matched (a missing one hangs). Tied: the LM head is the input
    embedding, whose gradient comes from ChunkedHead and from the embedding lookup (FSDP with the
    live teacher; untied FSDP: with a teacher here, live in tests/test_minibatches.py). Teacher: a
    teacher of its own weights (--teacher base/ema; under FSDP sharded like the policy) gives the
    same gradient, and moves halfway to the policy (the EMA step) to the same weights. Shared:
    the loss's forwards with a prompt's rows in one sequence (a 4-D mask through FSDP) on both
    sides; the others a row each."""
    flags = parallel.split()
    one, two = one_rank[" ".join(flags[1:])], two_ranks[1][parallel]
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


def test_process_group_freed_by_destroy(two_ranks):
    """After destroy_process_group() no gloo thread may survive into interpreter exit, where it can
    abort the process ("terminate called without an active exception"; seen in ~1 of 10 torchrun
    runs when transformers' loading imported torch.distributed.checkpoint after init_process_group
    and so kept the group alive). The launch of the DDP cases ran DDP wrappers and a model loaded by
    transformers after the group existed, then the teardown sgpo.py makes (DDP: under FSDP the
    group lives until the interpreter exits, see two_ranks)."""
    stdout = two_ranks[0]
    assert all(f"rank {r} gloo threads after destroy: []" in stdout for r in (0, 1)), stdout


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
