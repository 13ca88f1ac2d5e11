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
    """Every row of toy/ablation.py parses as sgpo.py flags; the SFT rows warm up on a strong
    model's solutions in their style; each size runs SGPO and its baselines from its own
    checkpoint; the two ablation rows of the paper the toy added switch what they name."""
    from toy.ablation import GROUPS, ROWS, SIZE_ROWS, SIZES, start_of
    from toy.cups import SOLUTION_STYLES

    paths = dict(small="small.jsonl", spread="spread", size_32="s32", size_128="s128")
    paths.update({f"strong_{style}": f"strong_{style}.jsonl" for style in SOLUTION_STYLES})
    for label, flags in ROWS.values():
        cfg = sgpo.parse_args([f.format(**paths) for f in flags])
        assert (cfg.sft_epochs > 0) == (cfg.sft_data.startswith("strong_")), label
    assert sgpo.parse_args(ROWS["no_proximal"][1]).kd_trust_region is False
    assert sgpo.parse_args(ROWS["no_grpo"][1]).use_grpo is False
    no_selection = sgpo.parse_args(ROWS["no_target_selection"][1])
    assert no_selection.target_selection is False and no_selection.kl_clip == float("inf")
    styles = {row: sgpo.parse_args([f.format(**paths) for f in ROWS[row][1]]).sft_data
              for row in ("sft_solutions", "sft_full", "sft_full_grpo", "sft_arrangement")}
    assert styles == dict(sft_solutions="strong_answer.jsonl", sft_full="strong_full.jsonl",
                          sft_full_grpo="strong_full.jsonl",
                          sft_arrangement="strong_arrangement.jsonl")
    for hidden in SIZES:
        for row in SIZE_ROWS:
            sized = sgpo.parse_args([f.format(**paths) for f in ROWS[f"{row}_h{hidden}"][1]])
            same = sgpo.parse_args([f.format(**paths) for f in ROWS[row][1]])
            assert vars(sized) == {**vars(same), "model": f"s{hidden}/model"}
        assert start_of(f"sgpo_h{hidden}") == f"the warm checkpoint of hidden {hidden}"
    assert start_of("sgpo") == "the warm checkpoint" and start_of("sft_full_h32") == ""
    for group in GROUPS.values():
        assert set(group) <= set(ROWS)
    assert len(GROUPS["sizes"]) == len(SIZE_ROWS) * (1 + len(SIZES))
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


def test_size_gain_is_sgpo_minus_its_best_baseline_seed_by_seed(capsys):
    """toy/ablation.py print_gain on hand-made results: the best baseline is the one with the best
    mean (SFT here, not the better seed-0 run of GRPO), the gain is paired by seed; a size whose
    rows did not all run prints nothing."""
    from toy.ablation import print_gain

    def ran(*accuracies):
        return [({}, {"eval/unguided_acc": a}, {}) for a in accuracies]

    results = {}
    for row, accuracies in {"sgpo": (0.9, 0.8), "grpo_only": (0.95, 0.1),
                            "sft_full": (1.0, 0.6)}.items():
        results.update({(row, seed): r for seed, r in enumerate(ran(*accuracies))})
    print_gain(64, "toy/cups_data/model", results, [0, 1])
    assert capsys.readouterr().out == (
        "hidden 64 (117,536 non-embedding parameters): SGPO 85.0, best baseline SFT on full "
        "worked solutions 80.0, gain +5.0 (per seed -10.0 / +20.0)\n"
    )
    print_gain(32, "toy/cups_data/model", results, [0, 1])
    assert capsys.readouterr().out == ""
