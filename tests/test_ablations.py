"""Each ablation row of the method sheet is one flag away, and the flag does what its row says."""

import json
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import runtime
import sgpo
from tests.conftest import fresh, read_metrics, tiny_setup, training_rows
from tests.test_e2e import COMMON

def run_row(flags, out, warm_dir, data_file):
    """2 RL steps of sgpo.py in this process with the row's flags -> (metrics per step, the rows
    each step trained on, counts of optimizer steps and of scoring passes). --kl_clip 1e-4: some
    tokens of the tiny model exceed it, so clipping is visibly on in the full run."""
    rows, calls = [], dict(steps=0, scoring=0)
    real, real_step, real_scoring = (sgpo.accumulate_gradients, sgpo.optimizer_step,
                                     sgpo.target_scores)

    def spy(policy, batch, *args):
        rows.append(list(batch))
        return real(policy, batch, *args)

    def step(*args):
        calls["steps"] += 1
        return real_step(*args)

    def scoring(*args):
        calls["scoring"] += 1
        return real_scoring(*args)

    args = (["--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 2]
            + COMMON + ["--kl_clip", 1e-4, "--num_guided_generations", 4] + flags)
    with mock.patch.object(sgpo, "accumulate_gradients", spy), \
            mock.patch.object(sgpo, "optimizer_step", step), \
            mock.patch.object(sgpo, "target_scores", scoring):
        assert sgpo.main([str(a) for a in args]) == 0
    return read_metrics(out / "metrics.jsonl"), rows, calls


def kd_rows(rows):
    return [r for r in rows if isinstance(r, sgpo.KDRow)]


def targets(rows):
    """Step rows -> {student prompt: KD target}."""
    return {tuple(r.prompt): tuple(r.response) for r in kd_rows(rows)}


def alphas(rows, n_problems=4):
    """The alpha(q) each KD row's weight carries: weight x |target| x problems."""
    return sorted(round(r.weight * len(r.response) * n_problems, 9) for r in kd_rows(rows))


# row -> its flags, and a check of (its run, the full run): what the flag names, changed. A run:
# (metrics per step, rows per step, call counts). Step 1 samples the same rollouts in every row
# (same seed, same weights), so step-1 values compare row to row. The warm model writes every
# correct answer the same way, so a random correct target equals the most likely one here: without
# target selection the check is that no scoring pass is made (tests/test_assembly.py checks the
# random pick itself).
ABLATIONS = {
    "w/o strategy distillation": (["--use_kd", "false"], lambda run, full: (
        not any(kd_rows(rows) for rows in run[1]) and kd_rows(full[1][0])
        and all(m["loss/kd"] == 0 and "kd/kl_mean" not in m for m in run[0]))),
    "w/o autonomous GRPO": (["--use_grpo", "false"], lambda run, full: (
        all(isinstance(r, sgpo.KDRow) for rows in run[1] for r in rows)
        and targets(run[1][0]) == targets(full[1][0]) and run[0][0]["loss/grpo"] == 0
        and "clip_ratio" not in run[0][0])),
    "w/o KL clipping": (["--kl_clip", "inf"], lambda run, full: (
        run[0][0]["kd/kl_clip_frac"] == 0 < full[0][0]["kd/kl_clip_frac"]
        and run[0][0]["kd/kl_mean"] == full[0][0]["kd/kl_mean"])),
    "w/o target selection": (["--target_selection", "false"], lambda run, full: (
        targets(run[1][0]).keys() == targets(full[1][0]).keys()
        and run[2]["scoring"] == 0 < full[2]["scoring"])),
    "fixed alpha": (["--adaptive_alpha", "false"], lambda run, full: (
        set(alphas(run[1][0])) == {0.5} and set(alphas(full[1][0])) <= {0.4, 0.6})),
    "direct SFT on selected targets": (["--kd_loss", "sft"], lambda run, full: (
        run[0][0]["kd/kl_mean"] == 0 < full[0][0]["kd/kl_mean"]
        and targets(run[1][0]) == targets(full[1][0])
        and run[0][0]["loss/kd"] > 10 * full[0][0]["loss/kd"])),
    "reverse KL": (["--kd_loss", "rkl"], lambda run, full: (
        targets(run[1][0]) == targets(full[1][0])
        and abs(run[0][0]["kd/kl_mean"] / full[0][0]["kd/kl_mean"] - 1) > 1e-3)),
    "w/o all proximal constraints": (
        ["--kl_clip", "inf", "--target_selection", "false", "--kd_trust_region", "false"],
        lambda run, full: (
            run[0][0]["kd/kl_clip_frac"] == 0 < full[0][0]["kd/kl_clip_frac"]
            and run[2]["scoring"] == 0 < full[2]["scoring"])),
    "several updates per batch": (["--num_iterations", "2"], lambda run, full: (
        run[2]["steps"] == 4 and full[2]["steps"] == 2 and len(run[1]) == 4
        and run[0][0]["loss/grpo"] != full[0][0]["loss/grpo"])),
    # the reference is the initial policy: KL 0 at step 1, > 0 once it moved
    "reference KL": (["--beta", "0.1"], lambda run, full: (
        run[0][0]["kl"] < 1e-6 < run[0][1]["kl"] and "kl" not in full[0][0])),
}


@pytest.fixture(scope="module")
def full_run(warm_dir, data_file, tmp_path_factory):
    return run_row([], tmp_path_factory.mktemp("full") / "out", warm_dir, data_file)


def test_full_run_has_every_term(full_run):
    metrics, rows, calls = full_run
    assert calls["steps"] == 2 and kd_rows(rows[0]) and metrics[0]["loss/grpo"] != 0
    assert metrics[0]["loss/kd"] > 0 and metrics[0]["kd/kl_clip_frac"] > 0


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_flag(name, full_run, warm_dir, data_file, tmp_path):
    """Each row's flag changes what it names, seen against the full run under the same seed."""
    flags, check = ABLATIONS[name]
    run = run_row(flags, tmp_path / "out", warm_dir, data_file)
    assert check(run, full_run), (run[0], full_run[0])


def test_reference_kl_term():
    tok, model, cfg = tiny_setup()
    rows = [r for r in training_rows(tok, model, cfg) if isinstance(r, sgpo.GRPORow)]
    policy = sgpo.Policy.of(model, tok, "cpu")
    # GRPO rows only: no teacher
    base = sgpo.micro_batch_loss(policy, fresh(rows, policy, cfg), cfg, runtime.Stats(), None)
    cfg.beta = 0.5
    policy.reference = sgpo.Policy.of(model, tok, "cpu")
    same = sgpo.micro_batch_loss(policy, fresh(rows, policy, cfg), cfg, runtime.Stats(), None)
    assert torch.allclose(base, same)  # reference == policy: k3 = 0
    policy.reference = sgpo.Policy.of(tiny_setup(seed=1)[1], tok, "cpu")
    stats = runtime.Stats()
    far = sgpo.micro_batch_loss(policy, fresh(rows, policy, cfg), cfg, stats, None)
    kl = stats.reduce("cpu")["kl"]
    assert kl > 0
    n_tok = sum(len(r.response) for r in rows)
    assert torch.allclose(far - base, torch.tensor(0.5 * kl * n_tok * rows[0].weight), rtol=1e-4)


def test_toy_ablation_rows_are_valid_sgpo_flags():
    """Every row of toy/ablation.py parses as sgpo.py flags; the SFT rows warm up on a strong
    model's solutions in their style; each size runs SGPO and its baselines from its own
    checkpoint, and each capability level from its own; the spread testbed's constraint rows are
    the proximal rows at k = 4 x 2 passes and their learning rate; the two ablation rows of the
    paper the toy added switch what they name."""
    from toy.ablation import (BUDGET_STEPS, CAPABILITIES, CAPABILITY_ROWS, GROUPS, PROXIMAL,
                              ROWS, SIZE_ROWS, SIZES, SPREAD_LRS, start_of)
    from toy.cups import SOLUTION_STYLES

    paths = dict(small="small.jsonl", spread="spread", spread_short="short", size_32="s32",
                 size_128="s128")
    paths.update({f"strong_{style}": f"strong_{style}.jsonl" for style in SOLUTION_STYLES})
    paths.update({f"strong_full_{16 * s}": f"strong_full_{16 * s}.jsonl" for s in BUDGET_STEPS})
    paths.update(strong_answer_1280="strong_answer_1280.jsonl", capability="c")
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
    # the budget matched: SGPO for SFT's 250 steps; SFT for one epoch of 16 x steps problems
    longer = sgpo.parse_args(ROWS["sgpo_250"][1])
    assert vars(longer) == {**vars(sgpo.parse_args([])), "max_steps": 250, "eval_steps": 20}
    for steps in BUDGET_STEPS:
        cut = sgpo.parse_args([f.format(**paths) for f in ROWS[f"sft_full_{steps}"][1]])
        full = sgpo.parse_args([f.format(**paths) for f in ROWS["sft_full"][1]])
        assert vars(cut) == {**vars(full), "sft_epochs": 1,
                             "sft_data": f"strong_full_{16 * steps}.jsonl"}
    for hidden in SIZES:
        for row in SIZE_ROWS:
            sized = sgpo.parse_args([f.format(**paths) for f in ROWS[f"{row}_h{hidden}"][1]])
            same = sgpo.parse_args([f.format(**paths) for f in ROWS[row][1]])
            assert vars(sized) == {**vars(same), "model": f"s{hidden}/model"}
        assert start_of(f"sgpo_h{hidden}") == f"the warm checkpoint of hidden {hidden}"
    assert start_of("sgpo") == "the warm checkpoint" and start_of("sft_full_h32") == ""
    answers = sgpo.parse_args([f.format(**paths) for f in ROWS["sft_answer_80"][1]])
    assert vars(answers) == {**vars(full), "sft_epochs": 1, "sft_data": "strong_answer_1280.jsonl"}
    for level in CAPABILITIES:
        for row in CAPABILITY_ROWS:
            weaker = sgpo.parse_args([f.format(**paths) for f in ROWS[f"{row}_g{level}"][1]])
            same = sgpo.parse_args([f.format(**paths) for f in ROWS[row][1]])
            assert vars(weaker) == {**vars(same), "model": f"c/guided-{level}"}
    assert start_of("sgpo_g60") == "the warm-up at guided 60 %"
    for lr in SPREAD_LRS:
        for row in PROXIMAL:
            spread = sgpo.parse_args([f.format(**paths) for f in ROWS[f"{row}_spread_lr{lr}"][1]])
            same = sgpo.parse_args([f.format(**paths) for f in ROWS[f"{row}_k4"][1]])
            assert vars(spread) == {
                **vars(same), "model": "spread/model", "data": "spread/train.jsonl",
                "eval_data": "spread/test.jsonl", "num_iterations": 2,
                "learning_rate": float(lr), "log_completions": 16}
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

    def echo(policy, prompts, cfg, lm=None):
        calls.append(len(prompts))
        return [{"ids": list(p)} for p in prompts]

    monkeypatch.setattr(sgpo, "sample", echo)
    auto, guided = [[1], [2]], [[10], [20]]
    for by_mode, expected_calls in (("true", [6, 4]), ("false", [10])):
        calls.clear()
        cfg = sgpo.Config(num_generations=3, num_guided_generations=2, generate_by_mode=by_mode)
        a, g = sgpo.sample_rollouts(SimpleNamespace(teacher=None, lm=None), auto, guided, cfg)
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


def test_budget_rows_train_on_the_first_problems_full_worked(tmp_path):
    """sft_full_<steps>'s data: the first 16 x steps training problems, each with the strong
    model's full worked solution, as sft_full's 2,000 have theirs."""
    from toy.ablation import BUDGET_STEPS, prepare_inputs
    from toy.cups import committed_problems, strong_solution

    paths = prepare_inputs(str(tmp_path), ["sft_full_20"])
    train = committed_problems("train.jsonl")
    for steps in BUDGET_STEPS:
        rows = [json.loads(line) for line in open(paths[f"strong_full_{16 * steps}"])]
        assert rows == [{**q, "solution": strong_solution(q, "full")} for q in train[:16 * steps]]


def test_size_rows_start_from_the_committed_warm_models(tmp_path, monkeypatch):
    """A size with a committed warm model (toy/cups_data/size-<hidden>) is not built again; its
    rows' --model names the committed folder."""
    from toy import ablation
    from toy.ablation import COMMITTED, ROWS, SIZES, prepare_inputs

    def build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(ablation, "sized_warmup", build)
    paths = prepare_inputs(str(tmp_path), [f"sgpo_h{hidden}" for hidden in SIZES])
    for hidden in SIZES:
        assert paths[f"size_{hidden}"] == f"{COMMITTED}/size-{hidden}"
        flags = [f.format(**paths) for f in ROWS[f"sgpo_h{hidden}"][1]]
        assert flags == ["--model", f"{COMMITTED}/size-{hidden}/model"]
    assert not list(tmp_path.glob("size-*"))


def test_each_teacher_with_spread_is_built_by_its_recipe_where_a_row_needs_it(
        tmp_path, monkeypatch):
    """sgpo_spread_short needs the teacher trained 300 steps at lr 1e-3 and only it."""
    from toy import ablation

    built = []

    def build(out, log, **recipe):
        built.append((out, recipe))
        os.makedirs(out)
        return {}

    monkeypatch.setattr(ablation, "spread_warmup", build)
    paths = ablation.prepare_inputs(str(tmp_path), ["sgpo", "sgpo_spread_short"])
    assert built == [(str(tmp_path / "spread_short"), {"steps": 300, "lr": 1e-3})]
    assert paths["spread_short"] == str(tmp_path / "spread_short")
    assert ablation.start_of("sgpo_spread_short") == "the teacher with spread trained 300 steps"
    assert ablation.start_of("sgpo_spread_lr3e-5") == "the teacher with spread"
    ablation.prepare_inputs(str(tmp_path), ["sgpo_spread_short"])  # built once
    assert len(built) == 1
