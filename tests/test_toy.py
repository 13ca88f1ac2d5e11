"""The ball-under-cups testbed generator (toy/cups.py): graded by the shared math-verify reward, held-out test."""
import re
from pathlib import Path

import sgpo
from toy.cups import STRATEGY, make_split


def _simulate(problem: str) -> int:
    start, swaps = re.match(r"Ball under cup (\d)\. Swaps: ([\d ]+)\. Which cup\?", problem).groups()
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
        assert sgpo.math_reward(r["solution"], r["answer"]) == 1.0  # the worked solution earns the reward
        assert sgpo.math_reward(f"\\boxed{{{int(r['answer']) % 3 + 1}}}", r["answer"]) == 0.0
        steps = r["solution"].split(" \\boxed")[0].split()
        assert 4 <= len(steps) <= 6 and steps[-1].endswith(":" + r["answer"])
        assert r["strategy"] == STRATEGY
    assert {r["answer"] for r in rows} == {"1", "2", "3"}
    assert make_split(50, seed=5, prefix="t") == rows[:50]  # a fixed seed regenerates the same data


CUPS = Path(__file__).resolve().parents[1] / "toy" / "cups_data"


def test_committed_warm_checkpoint_is_in_the_regime():
    """Warm-up checkpoint: follows the strategy when given it, guesses without it; tokenizer round-trips."""
    import json

    import torch
    from transformers import AutoTokenizer

    from toy.cups import accuracy
    from toy.tiny import build_tokenizer
    model, tok = sgpo.load_model(str(CUPS / "model"), torch.float32, "cpu")
    text = "Ball under cup 2. Swaps: 13 12.  \\boxed{3}"
    assert AutoTokenizer.from_pretrained(CUPS / "model")(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    test = [json.loads(line) for line in open(CUPS / "test.jsonl")][:32]
    train = {json.loads(line)["problem"] for line in open(CUPS / "train.jsonl")}
    assert not any(q["problem"] in train for q in test)  # held-out instances
    cfg = sgpo.Config()
    assert accuracy(model, tok, test, True, cfg) >= 0.9
    assert accuracy(model, tok, test, False, cfg) <= 0.6


def test_sgpo_transfers_the_guided_working_to_the_unguided_policy(tmp_path):
    """80 RL steps on the cups testbed (~2.4 min on 2 cores): GRPO alone stays at chance there (0.36 mean reward, answers
    without working); distillation from the guided self must make the unguided policy write the working
    and win (measured 0.76 and 0.82 for seeds 0 and 1)."""
    import json
    out = tmp_path / "cups"
    args = ["--model", CUPS / "model", "--data", CUPS / "train.jsonl", "--output_dir", out, "--batch_size", 16,
            "--micro_batch_size", 32, "--max_completion_length", 48, "--max_steps", 80, "--save_steps", 80,
            "--kd_chunk_size", 4096, "--learning_rate", 1e-4, "--kl_clip", "inf"]
    assert sgpo.main([str(a) for a in args]) == 0
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-10:]
    assert sum(m["reward/autonomous_mean"] for m in last) / 10 >= 0.55
    assert sum(m["completions/mean_length"] for m in last) / 10 > 20  # it writes the working now
