"""Shared fixtures: a tiny offline Qwen3 model with a character tokenizer, a small data set, and a
warm (SFT'd) copy of the model that answers in \\boxed{} often enough for every loss term to be
active."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402
from toy.tiny import build_model, build_tokenizer, tiny_rows, write_jsonl  # noqa: E402

# Under pytest-xdist (-n 2, README's test command) each worker runs its tests on one thread: the
# tiny models' matmuls gain little from a second thread (the toy's run: 22.5 s with 2, 25.4 s with
# 1), and two workers of two threads each oversubscribe 2 cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def eval_rows():
    """7 held-out rows (odd: ranks get different shares): 4 with a usable strategy, 1 rejected, 2
    without."""
    return [
        {"id": f"e{i}", "problem": f"pick {'ab'[i % 2]}{i + 40}", "answer": "37"[i % 2]}
        | ({"strategy": f"say {'37'[i % 2]}"} if i < 5 else {})
        | ({"strategy_status": "rejected"} if i == 4 else {})
        for i in range(7)
    ]


def tiny_setup(pad_is_eos=False, seed=0, arch="qwen3", tied=False):
    tok = build_tokenizer(pad_is_eos=pad_is_eos)
    model = build_model(tok, arch=arch, seed=seed, tied=tied)
    # 40 tokens at ~1/100 EOS probability each: some responses end early, others hit the limit
    cfg = sgpo.Config(
        max_completion_length=40, temperature=0.9, micro_batch_size=3, kd_chunk_size=5
    )
    return tok, model, cfg


def training_rows(tok, model, cfg, n=5):
    """Autonomous and KD rows of random responses (the update must not care where they came
    from)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, q in enumerate(tiny_rows(n)):
        auto, guided = engine.prompt_ids(tok, cfg, q, False), engine.prompt_ids(tok, cfg, q, True)
        resp = torch.randint(3, len(tok), (3 + i,), generator=g).tolist() + [tok.eos_token_id]
        rows.append(
            sgpo.GRPORow(auto, resp, 0.0, advantage=i - 1.5, sampler_logps=torch.zeros(len(resp)))
        )
        if i % 2:
            rows.append(sgpo.KDRow(auto, resp[::-1], 0.1 * i, teacher_prompt=guided))
    n_tok = sum(len(r.response) for r in rows if isinstance(r, sgpo.GRPORow))
    for r in rows:
        if isinstance(r, sgpo.GRPORow):
            r.weight = 1.0 / n_tok
    return rows


def fresh(rows, policy, cfg):
    """Copies of training rows with pi_old taken by policy (sgpo.take_pi_old): a new rollout
    batch, as rl_step makes each step."""
    rows = [dataclasses.replace(r, old_logps=None) for r in rows]
    sgpo.take_pi_old(policy, rows, cfg, runtime.Stats())
    return rows


def run_sgpo(args, nproc=0, timeout=300, script="sgpo.py"):
    """Run a script as a user would: `python sgpo.py` or `torchrun --nproc_per_node=N sgpo.py`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    return subprocess.run(
        launcher + [str(ROOT / script)] + [str(a) for a in args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env=env
    )


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = build_tokenizer()
    build_model(tok, hidden=32, layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, tiny_rows())
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory):
    """eval_rows() in a file."""
    rows = eval_rows()
    path = tmp_path_factory.mktemp("eval") / "test.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="session")
def warm_dir(tiny_dir, data_file, tmp_path_factory):
    """The SFT warm-up of sgpo.py itself (sft_epochs, max_steps 0) -> checkpoint-0."""
    out = tmp_path_factory.mktemp("warm")
    proc = run_sgpo(
        [
            "--model", tiny_dir, "--data", data_file, "--output_dir", out, "--sft_epochs", 30,
            "--sft_learning_rate", 1e-2, "--batch_size", 8, "--micro_batch_size", 16, "--max_steps",
            0, "--eval_data", ""
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint-0"


def run_scripted_step(out, settings, nproc=0):
    """tests/scripted_step.py over `settings` in one launch (python, or torchrun with nproc
    ranks); returns out, where each setting's files are (scripted_step.setting_dir)."""
    proc = run_sgpo([out, *settings], nproc, script="tests/scripted_step.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def scripted_two_ranks(tmp_path_factory):
    """The scripted step on 2 ranks, every setting test_assembly.py and test_minibatches.py
    compare: the rows only (""), and k = 2 trained under DDP and under FSDP."""
    return run_scripted_step(
        tmp_path_factory.mktemp("scripted"), ["", "train k2", "train k2 fsdp"], nproc=2
    )
