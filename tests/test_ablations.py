"""Each ablation row of the method sheet is one flag away, and the flag does what its row says."""

import pytest
import torch

import runtime
import sgpo
from tests.conftest import fresh, read_metrics, tiny_setup, training_rows
from tests.test_e2e import COMMON

# flag -> check on the metrics of a 2-step run
ABLATIONS = {
    "full": ([], lambda m: m["loss/kd"] > 0 and m["loss/grpo"] != 0),
    "w/o strategy distillation": (
        ["--use_kd", "false"], lambda m: m["loss/kd"] == 0 and "kd/kl_mean" not in m
    ),
    "w/o autonomous GRPO": (
        ["--use_grpo", "false"],
        lambda m: m["loss/grpo"] == 0 and "clip_ratio" not in m and m["loss/kd"] > 0
    ),
    "w/o KL clipping": (["--kl_clip", "inf"], lambda m: m["kd/kl_clip_frac"] == 0),
    "w/o target selection": (["--target_selection", "false"], lambda m: m["kd/target_frac"] > 0),
    "fixed alpha": (["--adaptive_alpha", "false"], lambda m: m["alpha/mean"] == 0.5),
    "direct SFT on selected targets": (
        ["--kd_loss", "sft"], lambda m: m["kd/kl_mean"] == 0 and m["loss/kd"] > 0
    ),
    "reverse KL": (["--kd_loss", "rkl"], lambda m: m["kd/kl_mean"] > 0),
    "w/o all proximal constraints": (
        ["--kl_clip", "inf", "--target_selection", "false", "--kd_trust_region", "false"],
        lambda m: m["kd/kl_clip_frac"] == 0
    ),
    "several updates per batch": (
        ["--num_iterations", "2"], lambda m: m["kd/ratio_out_frac"] >= 0 and m["loss/kd"] > 0
    ),
    "reference KL": (["--beta", "0.1"], lambda m: "kl" in m),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_flag(name, warm_dir, data_file, tmp_path):
    flags, check = ABLATIONS[name]
    out = tmp_path / "out"
    # --kl_clip 1e-4: with the tiny model some tokens exceed it, so clipping is visibly on in the
    # full run
    args = (
        ["--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 2]
        + COMMON
        + ["--kl_clip", 1e-4]
        + flags
    )
    assert sgpo.main([str(a) for a in args]) == 0
    metrics = read_metrics(out / "metrics.jsonl")
    assert all(check(m) for m in metrics if m["kd/target_frac"] > 0), metrics
    if name == "full":
        assert any(m["kd/kl_clip_frac"] > 0 for m in metrics)
    # the reference is the initial policy: KL 0 at step 1, > 0 once it moved
    if name == "reference KL":
        assert metrics[0]["kl"] < 1e-6 < metrics[1]["kl"]
    if name == "w/o target selection":  # no scoring pass is made
        assert all(m["time/select"] < 1.0 for m in metrics)


def test_reference_kl_term():
    tok, model, cfg = tiny_setup()
    rows = [r for r in training_rows(tok, model, cfg) if isinstance(r, sgpo.GRPORow)]
    policy = sgpo.Policy.of(model, tok, "cpu")
    base = sgpo.micro_batch_loss(policy, fresh(rows), cfg, runtime.Stats())
    cfg.beta = 0.5
    same = sgpo.micro_batch_loss(policy, fresh(rows), cfg, runtime.Stats(), ref=policy)
    assert torch.allclose(base, same)  # reference == policy: k3 = 0
    ref = sgpo.Policy.of(tiny_setup(seed=1)[1], tok, "cpu")
    stats = runtime.Stats()
    far = sgpo.micro_batch_loss(policy, fresh(rows), cfg, stats, ref=ref)
    kl = stats.reduce("cpu")["kl"]
    assert kl > 0
    n_tok = sum(len(r.response) for r in rows)
    assert torch.allclose(far - base, torch.tensor(0.5 * kl * n_tok * rows[0].weight), rtol=1e-4)


def test_toy_ablation_rows_are_valid_sgpo_flags():
    """Every row of toy/ablation.py parses as sgpo.py flags, and the SFT rows warm up on answer-only
    solutions."""
    from toy.ablation import ROWS, SFT

    for label, flags in ROWS.values():
        cfg = sgpo.parse_args(
            [f.format(strong="strong.jsonl", small="small.jsonl", spread="spread") for f in flags]
        )
        assert (cfg.sft_epochs > 0) == (flags[: len(SFT)] == SFT), label
    assert sgpo.parse_args(ROWS["no_proximal"][1]).kd_trust_region is False
    spread = [
        sgpo.parse_args([f.format(spread="s") for f in ROWS[row][1]])
        for row in ("sgpo_spread", "direct_sft_spread")
    ]
    assert spread[0].model == spread[1].model == "s/model" and (
        spread[0].kd_loss, spread[1].kd_loss
    ) == ("fkl", "sft")


def test_generate_by_mode_or_together_gives_each_mode_its_rollouts(monkeypatch):
    """--generate_by_mode false samples both modes in one generate call; each problem still gets
    its G1 autonomous and G2 guided responses, in order."""
    calls = []

    def echo(policy, prompts, cfg):
        calls.append(len(prompts))
        return [{"ids": list(p)} for p in prompts]

    monkeypatch.setattr(sgpo, "sample", echo)
    auto, guided = [[1], [2]], [[10], [20]]
    for by_mode, expected_calls in ((True, [6, 4]), (False, [10])):
        calls.clear()
        cfg = sgpo.Config(num_generations=3, num_guided_generations=2, generate_by_mode=by_mode)
        a, g = sgpo.sample_rollouts(None, auto, guided, cfg)
        assert calls == expected_calls
        assert [r["ids"] for r in a] == [[1]] * 3 + [[2]] * 3
        assert [r["ids"] for r in g] == [[10]] * 2 + [[20]] * 2
