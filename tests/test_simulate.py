"""The full-size simulation (tests/simulate.py, `tests/memory_plan.py --simulate`) sees what the
code allocates: at the toy's size, fake tensors give the peaks that real tensors give, phase by
phase; the resident categories equal their closed forms; world sizes 1 and 2, FSDP and DDP."""

import functools
import json
import math
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import sgpo
from tests.conftest import ROOT
from tests.simulate import fake_world, simulate

CONFIG = ROOT / "toy" / "cups_data" / "model"


def _cfg(**kw):
    # responses long enough for the KV cache to hold most of generation's peak, as at full size
    # (at 40 tokens the prefill's transients decide it, and fake and real differ there by one
    # hidden-state tensor: 5 % of the toy's 1.2 MB)
    return sgpo.Config(**{**dict(max_completion_length=200, micro_batch_size=2,
                                 generation_batch_size=16, gradient_checkpointing=True), **kw})


@functools.cache
def _simulated(world: int, fake: bool = True, **flags) -> dict:
    """The toy's step simulated (30-token prompts), once per setting for the tests below."""
    config = AutoConfig.from_pretrained(CONFIG)
    if world == 1:
        return simulate(config, _cfg(**flags), prompt_tokens=30, fake=fake)
    with fake_world(world):
        return simulate(config, _cfg(**flags), prompt_tokens=30)


def test_fake_tensors_give_the_real_peaks():
    """One process, the toy's model: each phase's peak on fake tensors within 2 % of the same
    measurement on real ones."""
    real, fake = _simulated(1, fake=False), _simulated(1)
    for phase in ("generation", "scoring", "update"):
        assert fake[phase]["peak"] == pytest.approx(real[phase]["peak"], rel=0.02), phase
        assert fake[phase]["flops"] == real[phase]["flops"] > 0, phase
    assert fake["kv_cache"] == real["kv_cache"] > 0


# each value of each axis once (the four combinations took 28 s; the live/ema difference is the
# teacher's own bytes, which the closed forms below add alike under DDP and FSDP); FSDP with the
# live teacher is test_categories_add_up_to_the_peak's run too
@pytest.mark.parametrize("fsdp,teacher", [(False, "ema"), (True, "live")])
def test_resident_bytes_are_the_closed_forms(fsdp, teacher):
    """World 2, fake process group: parameters 4 bytes each, gradients 4, AdamW 8, all on every
    rank under DDP (plus its gradient buckets, 4), rank 0's shard of each under FSDP (FSDP2 gives
    rank 0 ceil(rows / 2) rows of every parameter); a teacher of its own (--teacher ema) 4 more,
    sharded alike, and with it the teacher gathered beside the policy where it samples."""
    config = AutoConfig.from_pretrained(CONFIG)
    with torch.device("meta"):
        shapes = [p.shape for p in AutoModelForCausalLM.from_config(config).parameters()]
    n = sum(math.prod(s) for s in shapes)
    shard = sum(math.ceil(s[0] / 2) * math.prod(s[1:]) for s in shapes)
    mine = shard if fsdp else n
    out = _simulated(2, fsdp=fsdp, teacher=teacher, teacher_samples_guided=True)
    assert out["resident"]["parameters"] == 4 * mine
    assert out["resident"]["teacher"] == (4 * mine if teacher == "ema" else 0)
    if fsdp:
        # generation gathers the sampling models' weights (fp32 compute here): 4 bytes each
        gathered = out["generation"]["at_peak"]["gathered weights"]
        assert gathered == 4 * n * (2 if teacher == "ema" else 1)
    assert out["gradients"] == 4 * mine
    assert out["resident"]["optimizer_state"] == 8 * mine
    # the update's peak holds at least the parameters, gradients and AdamW state
    assert out["update"]["peak"] >= 16 * mine
    if not fsdp:
        assert sum(v for k, v in out["update"]["at_peak"].items() if "DDP" in k) == 4 * n


def test_memory_plan_simulate_prints_phases_and_a_json_line(capsys, monkeypatch):
    """`python tests/memory_plan.py --simulate --config ... --world 2 -- <sgpo flags>`: the phase
    table and a last JSON line with the model, world, fsdp, the step's peak and each phase's."""
    from tests import memory_plan

    monkeypatch.setattr(sys, "argv", ["memory_plan.py", "--simulate", "--config", str(CONFIG),
                                      "--world", "2", "--prompt_tokens", "30", "--",
                                      "--max_completion_length", "200"])
    memory_plan.main()
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"model", "world", "fsdp", "peak_gb", "generation_gb", "scoring_gb",
            "update_gb"} <= set(result)
    assert (result["world"], result["fsdp"]) == (2, True)
    assert result["peak_gb"] == max(result[f"{p}_gb"] for p in ("generation", "scoring", "update"))
    assert any(line.startswith("| update | **") for line in lines)
    header = ("| phase | peak GB | parameters | teacher weights | gradients | optimizer state | "
              "gathered weights")
    assert any(line.startswith(header) for line in lines)


def test_categories_add_up_to_the_peak():
    """Each phase's peak is split into parameters, gradients, AdamW state, gathered weights, KV
    cache, DDP buckets, the activations saved for backward and the rest, the temporaries
    (>= 0); under FSDP generation holds the gathered weights (2 bytes a parameter at bf16 compute,
    here fp32: 4)."""
    from tests.simulate import categories

    config = AutoConfig.from_pretrained(CONFIG)
    # (the live teacher samples nothing of its own: the run of test_resident_bytes_are_the_...)
    out = _simulated(2, fsdp=True, teacher="live", teacher_samples_guided=True)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    for phase in ("generation", "scoring", "update"):
        parts = categories(out, phase)
        assert sum(parts.values()) == out[phase]["peak"]
        assert parts["temporaries"] >= 0, (phase, parts)
        # only the update keeps tensors for a backward
        assert (parts["saved activations"] > 0) == (phase == "update"), (phase, parts)
    assert categories(out, "generation")["gathered weights"] == 4 * n
    assert categories(out, "generation")["KV cache"] == out["kv_cache"] > 0


def test_saved_activations_shrink_under_activation_checkpointing():
    """The update's activations saved for backward: without activation checkpointing every layer
    keeps its own: several times the checkpointed layers' inputs, all that it keeps with it."""
    from tests.simulate import categories

    saved = {}
    for checkpointing in (False, True):
        out = _simulated(1) if checkpointing else _simulated(1, gradient_checkpointing=False)
        saved[checkpointing] = categories(out, "update")["saved activations"]
    assert saved[False] > 3 * saved[True] > 0, saved
