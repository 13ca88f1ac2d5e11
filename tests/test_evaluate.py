"""evaluate.py: avg@k / pass@k aggregation, end-to-end runs, resume, torchrun sharding, bad
input."""

import json
import os

import pytest

import evaluate
import reward
from tests.conftest import run_sgpo, write_jsonl


def _s(pid, mode, sample, correct, length=10, truncated=False, bench="b"):
    return dict(
        bench=bench, id=pid, mode=mode, sample=sample, correct=float(correct), length=length,
        truncated=truncated
    )


def test_aggregate_hand_labelled():
    samples = (
        [_s("p1", "unguided", i, c) for i, c in enumerate([1, 0, 0, 1])]
        + [_s("p2", "unguided", i, 0, length=30, truncated=True) for i in range(4)]
        + [_s("p3", "unguided", i, 1) for i in range(4)]
        + [_s("p1", "guided", i, c, length=20) for i, c in enumerate([1, 1, 1, 0])]
    )
    out = evaluate.aggregate(samples)["b"]
    assert out["unguided"]["avg@k"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["unguided"]["pass@k"] == pytest.approx(2 / 3)
    assert out["unguided"]["mean_length"] == pytest.approx((10 * 8 + 30 * 4) / 12)
    assert out["unguided"]["truncation_rate"] == pytest.approx(4 / 12)
    assert out["guided"]["avg@k"] == pytest.approx(0.75) and out["guided"]["pass@k"] == 1.0
    assert (
        out["unguided_same_problems"]["avg@k"] == pytest.approx(0.5)
        and out["unguided_same_problems"]["problems"] == 1
    )
    assert out["strategy_benefit"] == pytest.approx(0.25)
    table = evaluate.markdown(evaluate.aggregate(samples), {"b": 4})
    assert "| b | 4 | unguided | 3 | 50.0 | 66.7 | 17 | 33.3% |" in table and "+25.0" in table


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    rows = [
        {"id": f"e{i}", "problem": f"pick {'ab'[i % 2]}{i}", "answer": "37"[i % 2]}
        | ({"strategy": f"say {'37'[i % 2]}"} if i < 4 else {})
        for i in range(6)
    ]
    path = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    write_jsonl(path, rows)
    return path


def _run(args, nproc=0):
    return run_sgpo(args, nproc, script="evaluate.py")


def test_end_to_end_greedy_and_torchrun_agree(warm_dir, bench_file, tmp_path):
    args = [
        "--model", warm_dir, "--bench", f"tiny={bench_file}:1", "--temperature", 0,
        "--max_new_tokens", 12, "--guided", "--batch_size", 3
    ]
    one = _run(args + ["--output_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    samples = evaluate.read_samples(tmp_path / "one")
    assert len(samples) == 6 + 4  # unguided for all, guided for the 4 with a strategy
    for r in samples:  # the stored verdict is the shared grader's
        answer = "37"[int(r["id"][1:]) % 2]
        assert r["correct"] == reward.math_reward(r["response"], answer)
    summary = json.load(open(tmp_path / "one" / "summary.json"))["results"]
    assert summary == json.loads(json.dumps(evaluate.aggregate(samples)))
    assert "| tiny | 1 | unguided | 6 |" in (tmp_path / "one" / "summary.md").read_text()
    # 10 samples over 3 ranks: 4, 3 and 3, in 2, 1 and 1 generate calls
    three = _run(args + ["--output_dir", tmp_path / "three", "--ddp_timeout", 30], nproc=3)
    assert three.returncode == 0, three.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "three")) == [
        "samples-rank0.jsonl", "samples-rank1.jsonl", "samples-rank2.jsonl", "summary.json",
        "summary.md"
    ]
    assert [len(evaluate.read_samples(tmp_path / "three", r)) for r in range(3)] == [4, 3, 3]
    assert json.load(open(tmp_path / "three" / "summary.json"))["results"] == summary


def test_resume_skips_finished_samples(warm_dir, bench_file, tmp_path):
    out = tmp_path / "ev"
    args = [
        "--model", str(warm_dir), "--bench", f"tiny={bench_file}:3", "--max_new_tokens", "12",
        "--output_dir", str(out)
    ]
    assert evaluate.main(args) == 0
    path = out / "samples-rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 18
    path.write_text("".join(lines[:7]) + lines[7][:15])  # killed mid-write
    assert evaluate.main(args) == 2  # no --resume: refuses, touches nothing
    assert path.read_text().startswith("".join(lines[:7]))
    assert evaluate.main(args + ["--resume"]) == 0
    new = path.read_text().splitlines(keepends=True)
    assert new[:7] == lines[:7]  # finished samples kept as they were
    keys = [evaluate.item_key(r) for r in evaluate.read_samples(out)]
    # each missing sample generated once, the cut line ignored
    assert len(keys) == len(set(keys)) == 18
    # the same output_dir with k=2: the summary counts this configuration's samples only
    assert (
        evaluate.main(
            [a.replace(f"{bench_file}:3", f"{bench_file}:2") for a in args] + ["--resume"]
        )
        == 0
    )
    assert json.load(open(out / "summary.json"))["results"]["tiny"]["unguided"]["samples"] == 12


@pytest.mark.parametrize(
    "spec_or_content,message",
    [
        ("tiny={missing}:2", "missing.jsonl: file not found"),
        ('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n', ":2: answer: missing"),
        ('{"problem": "p", "answer": "1"}\nnope\n', ":2: line: not valid JSON"),
        ("tiny={path}:0", "k must be an integer >= 1"), ("tiny={path}", "expected NAME=PATH:K")
    ],
)
def test_bad_input(spec_or_content, message, tmp_path, capsys):
    path = tmp_path / "b.jsonl"
    if "{" in spec_or_content and "=" not in spec_or_content[:6]:
        path.write_text(spec_or_content)
        spec = f"b={path}:1"
    else:
        path.write_text('{"problem": "p", "answer": "1"}\n')
        spec = spec_or_content.format(path=path, missing=tmp_path / "missing.jsonl")
    assert evaluate.main(["--bench", spec, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
