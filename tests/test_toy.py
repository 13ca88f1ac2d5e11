"""The ball-under-cups testbed (toy/): generator graded by the shared math-verify reward, held-out
test, the committed warm checkpoint, the warm-up script, and the default run that must transfer the
guided working."""

import json
import re
from pathlib import Path

import pytest
import torch

import reward
import engine
import sgpo
from toy.cups import STRATEGY, make_split


def _simulate(problem: str) -> int:
    start, swaps = re.match(
        r"Ball under cup (\d)\. Swaps: ([\d ]+)\. Which cup\?", problem
    ).groups()
    cup = int(start)
    for s in swaps.split():
        a, b = int(s[0]), int(s[1])
        cup = b if cup == a else a if cup == b else cup
    return cup


def test_cups_problems_are_consistent_and_graded_by_math_verify():
    rows = make_split(200, seed=5, prefix="t")
    assert len({r["id"] for r in rows}) == 200
    for r in rows:
        assert r["answer"] == str(_simulate(r["problem"]))
        # the worked solution earns the reward
        assert reward.math_reward(r["solution"], r["answer"]) == 1.0
        assert reward.math_reward(f"\\boxed{{{int(r['answer']) % 3 + 1}}}", r["answer"]) == 0.0
        steps = r["solution"].split(" \\boxed")[0].split()
        assert 4 <= len(steps) <= 6 and steps[-1].endswith(":" + r["answer"])
        assert r["strategy"] == STRATEGY
    assert {r["answer"] for r in rows} == {"1", "2", "3"}
    assert make_split(50, seed=5, prefix="t") == rows[:50]  # a fixed seed regenerates the same data


CUPS = Path(__file__).resolve().parents[1] / "toy" / "cups_data"


def test_committed_warm_checkpoint_is_in_the_regime():
    """Warm-up checkpoint: follows the strategy when given it, guesses without it; tokenizer
    round-trips."""
    from transformers import AutoTokenizer

    from toy.tiny import build_tokenizer

    model, tok = engine.load_model(str(CUPS / "model"), torch.float32, "cpu")
    text = "Ball under cup 2. Swaps: 13 12.  \\boxed{3}\tx\ny"
    assert (
        AutoTokenizer.from_pretrained(CUPS / "model")(text)["input_ids"]
        == build_tokenizer()(text)["input_ids"]
    )
    assert tok.decode(tok(text)["input_ids"]) == text
    test = [json.loads(line) for line in open(CUPS / "test.jsonl")]
    train = {json.loads(line)["problem"] for line in open(CUPS / "train.jsonl")}
    assert not any(q["problem"] in train for q in test)  # held-out instances
    acc = engine.greedy_accuracy(model, tok, test[:48], sgpo.Config(), "cpu")
    assert acc["eval/guided_acc"] >= 0.9 and acc["eval/unguided_acc"] <= 0.6
    torch.manual_seed(0)
    outs = engine.generate(
        model, [engine.prompt_ids(tok, sgpo.Config(), q, False) for q in test[:48]],
        tok.pad_token_id, [tok.eos_token_id], "cpu", 1.0, 48
    )
    # unguided samples never write the working
    assert not any(":" in tok.decode(o["ids"]) for o in outs)


def test_spread_working_draws_a_notation_per_step_and_keeps_the_answer():
    import random

    from toy.cups import NOTATIONS, spread_working

    rng, rows = random.Random(0), make_split(200, seed=5, prefix="t")
    seen = []
    for r in rows:
        text = spread_working(r["solution"], rng)
        seps = re.findall(r"\d\d(\D)\d", text)
        assert re.sub(r"(?<=\d\d)\D(?=\d)", ":", text) == r["solution"] and len(seps) == r[
            "solution"
        ].count(":")
        assert reward.math_reward(text, r["answer"]) == 1.0
        seen += seps
    assert set(seen) == set(NOTATIONS) and all(
        abs(seen.count(c) / len(seen) - 1 / 3) < 0.05 for c in NOTATIONS
    )
    assert spread_working(rows[0]["solution"], random.Random(1)) == spread_working(
        rows[0]["solution"], random.Random(1)
    )


def test_spread_warmup_writes_its_teacher_and_measures_its_spread(tmp_path):
    """2 steps (lr still in its warm-up): the teacher is the committed one, which writes ':' only
    (no spread)."""
    from toy.cups import SPREAD_STRATEGY, spread_warmup

    spread = spread_warmup(str(tmp_path), steps=2, log=lambda line: None)
    assert spread["separators"][">"] == spread["separators"]["="] == 0 < spread["separators"][":"]
    assert spread["rollouts_mixing_notations"] == 0 and 0 <= spread["mean_token_nll"] < 0.1
    for name in ("train.jsonl", "test.jsonl"):
        rows = [json.loads(line) for line in open(tmp_path / name)]
        original = [json.loads(line) for line in open(CUPS / name)]
        assert [{**r, "strategy": STRATEGY} for r in rows] == original and rows[0][
            "strategy"
        ] == SPREAD_STRATEGY
    model, tok = engine.load_model(str(tmp_path / "model"), torch.float32, "cpu")
    assert (
        tok("13>2 13=2")["input_ids"]
        == engine.load_model(str(CUPS / "model"), torch.float32, "cpu")[1]("13>2 13=2")["input_ids"]
    )


def test_warmup_script_runs(tmp_path):
    from toy.cups import make_split, warmup

    lines = []
    model, tok = warmup(
        make_split(32, 1, "a"), make_split(4, 2, "b"), steps=2, batch=4, log=lines.append
    )
    assert json.loads(lines[-1])["step"] == 2 and "eval/guided_acc" in json.loads(lines[-1])
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (
        engine.load_model(str(tmp_path), torch.float32, "cpu")[1]("a b")["input_ids"]
        == tok("a b")["input_ids"]
    )


def test_default_run_transfers_the_guided_working_to_the_unguided_policy(tmp_path):
    """`python sgpo.py` (the defaults are this testbed) cut to 50 of its 80 steps, ~1.5 min on 2
    cores. GRPO alone never makes the unguided policy write the working (0 % of its samples do);
    distillation from the guided self must. Measured at step 50 for seeds 0, 1, 2: greedy unguided
    accuracy 0.65, 0.69, 0.64 (0.35 before RL). Generalisation (toy/ablation.py's split "start
    written out": 'The ball starts under cup S.', a surface never trained on): the working transfers
    to it. Measured at step 50, seeds 0, 1, 2: written on 92 / 95 / 99 % of its problems, accuracy
    43.4 / 52.8 / 62.3 %; the warm model and the SFT-on-solutions rows write it on 0 % (35.8 %; 33.0
    / 32.1 / 34.0 %); at step 80 (toy/README.md) 69.8 / 68.9 / 75.5 %."""
    from toy.ablation import generalisation_splits

    out = tmp_path / "cups"
    assert sgpo.main(["--output_dir", str(out), "--max_steps", "50", "--eval_steps", "0"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    before, after = metrics[0], metrics[-1]
    assert (
        before["step"] == 0
        and before["eval/unguided_acc"] < 0.4
        and before["eval/guided_acc"] > 0.95
    )
    assert after["step"] == 50 and after["eval/unguided_acc"] >= 0.5
    # it writes the working now (10 before)
    assert sum(m["completions/mean_length"] for m in metrics[-5:]) / 5 > 25
    problems = generalisation_splits()["start written out"]
    for path, written_range, acc_range in (
        (CUPS / "model", (0, 0), (0, 0.4)), (out / "checkpoint-50", (0.8, 1), (0.4, 1))
    ):
        model, tok = engine.load_model(str(path), torch.float32, "cpu")
        outs = engine.generate(
            model,
            [engine.prompt_ids(tok, sgpo.Config(), {**q, "strategy": ""}, False) for q in problems],
            tok.pad_token_id, [tok.eos_token_id], "cpu", 0.0, 96
        )
        texts = [tok.decode(o["ids"], skip_special_tokens=True) for o in outs]
        written = sum(bool(re.search(r"\d\d:\d", t)) for t in texts) / len(texts)
        acc = sum(reward.math_reward(t, q["answer"]) for t, q in zip(texts, problems)) / len(texts)
        assert (
            written_range[0] <= written <= written_range[1] and acc_range[0] <= acc <= acc_range[1]
        ), (path, written, acc)


def test_strong_solutions_write_correct_workings_in_each_style():
    """The SFT baselines' targets (toy/cups.py strong_solution): every style earns the reward; the
    full working is the strategy's (the committed solution); the verbose one has a sentence per
    swap; the arrangement's rows are the cups' order after each swap, checked against a step by
    step simulation of all three cups, and it reads the ball's cup off the last row."""
    from toy.cups import SOLUTION_STYLES, strong_solution

    q = {"problem": "Ball under cup 2. Swaps: 13 12. Which cup?"}
    assert [strong_solution(q, style) for style in SOLUTION_STYLES] == [
        "\\boxed{1}", "13:2 12:1 \\boxed{1}",
        "swap 1 and 3, ball under 2. swap 1 and 2, ball under 1. so \\boxed{1}",
        "13>321 12>231 2@1 \\boxed{1}", "\\boxed{1} since 13:2 12:1",
    ]
    for r in make_split(200, seed=6, prefix="t"):
        swaps = r["problem"].split("Swaps: ")[1].split(".")[0].split()
        for style in SOLUTION_STYLES:
            assert reward.math_reward(strong_solution(r, style), r["answer"]) == 1.0
        assert strong_solution(r, "full") == r["solution"]
        answer, working = strong_solution(r, "answer_first").split(" since ")
        assert f"{working} {answer}" == r["solution"]
        assert strong_solution(r, "verbose").count("ball under") == len(swaps)
        steps = strong_solution(r, "arrangement").split()
        cups = {1: 1, 2: 2, 3: 3}  # position -> the cup that started there
        for swap, step in zip(swaps, steps):
            a, b = int(swap[0]), int(swap[1])
            cups[a], cups[b] = cups[b], cups[a]
            assert step == f"{swap}>{cups[1]}{cups[2]}{cups[3]}"
        start = int(r["problem"].split("cup ")[1][0])
        where = [p for p in cups if cups[p] == start][0]
        assert steps[len(swaps)] == f"{start}@{where}" and str(where) == r["answer"]


def test_sized_warmup_builds_the_testbed_at_another_model_size(tmp_path):
    """The same data and recipe from a fresh model of another width: 2 steps."""
    from transformers import AutoConfig

    from toy.cups import sized_warmup

    lines = []
    sized_warmup(str(tmp_path), 32, steps=2, log=lines.append)
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (32, 3, 8)
    assert json.loads(lines[-1])["step"] == 2
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_text() == (CUPS / name).read_text()
    model, tok = engine.load_model(str(tmp_path / "model"), torch.float32, "cpu")
    assert tok("13>321 2@1")["input_ids"] == engine.load_model(
        str(CUPS / "model"), torch.float32, "cpu")[1]("13>321 2@1")["input_ids"]
    # built again from the same seed: the same weights, bit for bit (at one thread count: another
    # splits floating-point sums otherwise)
    sized_warmup(str(tmp_path / "again"), 32, steps=2, log=lambda line: None)
    again = engine.load_model(str(tmp_path / "again" / "model"), torch.float32, "cpu")[0]
    weights = model.state_dict()
    assert all(torch.equal(weights[k], w) for k, w in again.state_dict().items())


@pytest.mark.parametrize("hidden", [32, 128])
def test_committed_size_checkpoints_are_the_ones_the_results_start_from(hidden):
    """toy/cups_data/size-<hidden>/model (toy/cups.py sized_warmup at one thread): a model of that
    width, whose greedy held-out accuracy is the step 0 of every kept run that starts from it."""
    from transformers import AutoConfig

    from toy import ablation, tables

    folder = CUPS / f"size-{hidden}" / "model"
    assert AutoConfig.from_pretrained(folder).hidden_size == hidden
    # (a row that warms up with SFT first evaluates after it)
    starts = [r["evals"][0] for (row, _), r in tables.load_results().items()
              if ablation.size_of(row) == hidden and ablation.start_of(row)]
    assert len(starts) >= 3
    model, tok = engine.load_model(str(folder), torch.float32, "cpu")
    test = [json.loads(line) for line in open(CUPS / "test.jsonl")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the results' thread count)
    try:
        accuracy = engine.greedy_accuracy(model, tok, test, sgpo.Config(), "cpu")
    finally:
        torch.set_num_threads(threads)
    for start in starts:
        assert (start["unguided"], start["guided"]) == (
            accuracy["eval/unguided_acc"], accuracy["eval/guided_acc"])


def test_watching_the_warmup_changes_nothing_and_saves_where_a_level_is_first_reached(
        tmp_path, monkeypatch):
    """warmup's watch is called after every step and changes nothing (4 steps watched give the
    unwatched weights bit for bit); capability_warmup evaluates every `every` steps and, where a
    level is newly reached, each step since the last evaluation from its kept weights, and saves
    the first step that reaches the level (here level 0: reached at the evaluation of step 2,
    first at step 1; the saved weights are step 1's)."""
    from toy import cups

    train, test = make_split(32, 1, "a"), make_split(4, 2, "b")
    seen, quiet = [], (lambda line: None)
    watched, _ = cups.warmup(train, test, steps=4, batch=4, log=quiet,
                             watch=lambda step, *_: seen.append(step))
    plain, _ = cups.warmup(train, test, steps=4, batch=4, log=quiet)
    assert seen == [1, 2, 3, 4]
    weights = plain.state_dict()
    assert all(torch.equal(weights[k], w) for k, w in watched.state_dict().items())
    step_1, _ = cups.warmup(train, test, steps=1, batch=64, log=quiet)
    # the committed recipe on 32 problems (64 examples: one batch) and 4 held-out ones
    monkeypatch.setattr(cups, "committed_problems", lambda name: train if "train" in name else test)
    lines = []
    saved = cups.capability_warmup(str(tmp_path), levels=(0,), log=lines.append, every=2)
    assert [json.loads(line)["step"] for line in lines] == [2, 1]
    assert saved == {0: (1, {k: v for k, v in json.loads(lines[1]).items() if k != "step"})}
    model = engine.load_model(str(tmp_path / "guided-0"), torch.float32, "cpu")[0]
    weights = step_1.state_dict()
    assert all(torch.equal(weights[k], w) for k, w in model.state_dict().items())


def test_plot_names_matplotlib_where_it_is_missing(tmp_path):
    """toy/plot.py needs matplotlib, which the project does not install: one line, exit 2."""
    import os
    import subprocess
    import sys
    from tests.conftest import ROOT
    (tmp_path / "matplotlib.py").write_text("raise ImportError('no')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "toy/plot.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("error: toy/plot.py needs matplotlib, which the project does not "
                           "install: pip install matplotlib\n")
