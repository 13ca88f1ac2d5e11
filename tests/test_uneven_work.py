"""Ranks with uneven work (torchrun, gloo; world sizes 2 and 3; DDP and FSDP): every launch
finishes within its 20-second collective timeout, and what the ranks compute together equals one
process doing all the work (the cases: tests/uneven_work.py)."""

import pytest
import torch

from tests import uneven_work
from tests.conftest import run_sgpo

CASES = ("generate", "eval", "auto", "nokd", "nokd_all", "truncated", "k2", "ema")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def launches(request, tmp_path_factory):
    """(world, one process's results, the ranks' results): every case in one torchrun launch,
    under DDP and under FSDP."""
    world, out = request.param, tmp_path_factory.mktemp(f"uneven{request.param}")
    # one process: in this one (what `python tests/uneven_work.py` runs)
    one = {case: uneven_work.run_case(case, world) for case in CASES}
    cases = [*CASES, *(f"{case} fsdp" for case in CASES)]
    ranks = run_sgpo([out / "ranks.pt", world, *cases], nproc=world, timeout=240,
                     script="tests/uneven_work.py")
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    for rank in range(world):
        assert f"rank {rank}: finished {len(cases)} cases" in ranks.stdout
    return world, one, torch.load(out / "ranks.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max([(a[k] - b[k]).abs().max().item() for k in a] or [0.0])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", CASES)
def test_uneven_work_finishes_and_equals_one_process(launches, case, parallel):
    """generate and eval: greedy responses and accuracies equal (rank 0 makes more generate calls
    than the others: transformers' implicit synced_gpus under FSDP would pair one rank's extra
    decode steps with another's next collective). auto: every rank chooses as one process does,
    from the longest prompt over ranks. RL cases: each optimizer step's gradient within 1e-6 (float
    sums in another order), alpha and metrics equal; the weights after the step (lr 1e-3) and the
    teacher's EMA within 1e-4: AdamW's first step moves a weight by ~lr g / |g|, so a gradient near
    0 that differs by 1e-9 moves it by a fraction of lr. The teacher runs on every micro-batch of
    every rank where some rank has a KD row (nokd: not rank 0), on none where no rank has one."""
    world, one, ranks = launches
    mine = ranks[case if parallel == "ddp" else f"{case} fsdp"]
    ref = one[case]
    if case == "generate":
        assert mine == ref and len(ref) == 1 + 2 * world
    elif case == "eval":
        assert mine == ref
        assert 0 < ref["accuracy"]["eval/unguided_acc"] < 1 and len(ref["texts"]) == 7 + 4 + 4
    elif case == "auto":
        # one process sees every prompt: a call per mode; so does every rank
        assert ref == {0: 2} and mine == {rank: 2 for rank in range(world)}
    else:
        assert len(mine["grads"]) == len(ref["grads"]) == (2 if case == "k2" else 1)
        for a, b in zip(mine["grads"], ref["grads"]):
            assert _max_diff(a, b) < 1e-6
        assert _max_diff(mine["weights"], ref["weights"]) < 1e-4
        assert _max_diff(mine["teacher"], ref["teacher"]) < 1e-4
        assert bool(ref["teacher"]) == (case == "ema")
        assert mine["alpha"] == ref["alpha"]
        for key, value in ref["metrics"].items():
            if not key.startswith(("time/", "perf/gen_tokens_per_s")):
                assert mine["metrics"][key] == pytest.approx(value, abs=1e-6), key
        # the case's point holds: some problems without a KD target, or masked rollouts
        frac = ref["metrics"]["kd/target_frac"]
        expected = {"nokd": 1 - 1 / world, "nokd_all": 0.0}.get(case, 1.0)
        assert frac == pytest.approx(expected)
        runs = mine["teacher_runs"]
        assert set(runs) == set(range(world)) and len({len(f) for f in runs.values()}) == 1
        assert set().union(*runs.values()) == {case != "nokd_all"}
        assert set(ref["teacher_runs"][0]) == {case != "nokd_all"}
        clipped = ref["metrics"]["completions/clipped_ratio"]
        assert clipped == pytest.approx(1 / world if case == "truncated" else 0.0)
