"""--fsdp (FSDP2 over gloo, 2 ranks): the same training as DDP, HF checkpoints, exact resume after a
kill; with an EMA teacher (--teacher ema), sharded like the policy, saved and resumed with it (the
live teacher under FSDP: tests/test_ddp.py, test_simulate.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import runtime
import sgpo
from tests.conftest import ROOT, read_metrics, run_sgpo
from tests.test_e2e import COMMON, _comparable

STEPS = 3


def _args(warm_dir, data_file, eval_file, out):
    """A warm-up epoch, RL steps with held-out evaluations on the way: every phase that runs
    forwards; with paper.args' activation checkpointing and several generate calls a step; an EMA
    teacher that samples the guided rollouts (rate 0.5: it moves visibly in 3 steps)."""
    return (
        [
            "--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", STEPS,
            "--save_steps", 1, "--sft_epochs", 1, "--sft_learning_rate", 1e-3
        ]
        + COMMON
        + [
            "--eval_data", eval_file, "--eval_steps", 2, "--gradient_checkpointing", "true",
            "--generation_batch_size", 10, "--teacher", "ema", "--teacher_ema_rate", 0.5,
            "--teacher_samples_guided", "true"
        ]
    )


def _weights(path):
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())  # a plain HF load


@pytest.fixture(scope="module")
def fsdp_run(warm_dir, data_file, eval_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = run_sgpo(_args(warm_dir, data_file, eval_file, out) + ["--fsdp", "true"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp_equals_ddp(fsdp_run, warm_dir, data_file, eval_file, tmp_path):
    ddp = run_sgpo(_args(warm_dir, data_file, eval_file, tmp_path / "ddp"), nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = (
        read_metrics(fsdp_run / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    )
    # 2 warm-up steps
    assert [m.get("step") for m in a] == [m.get("step") for m in b] == [None, None, 0, 1, 2, 3]
    assert any(m.get("loss/kd", 0) > 0 for m in a) and "eval/unguided_acc" in a[-1]
    for x, y in zip(a, b):
        assert _comparable(x) == pytest.approx(_comparable(y), abs=1e-5)
    for step in range(STEPS + 1):
        fsdp, plain = (
            _weights(fsdp_run / f"checkpoint-{step}"),
            _weights(tmp_path / "ddp" / f"checkpoint-{step}")
        )
        assert max((fsdp[n] - plain[n]).abs().max().item() for n in plain) < 1e-5, step
        t_fsdp, t_plain = (
            _weights(fsdp_run / f"checkpoint-{step}" / "teacher"),
            _weights(tmp_path / "ddp" / f"checkpoint-{step}" / "teacher")
        )
        assert max((t_fsdp[n] - t_plain[n]).abs().max().item() for n in t_plain) < 1e-5, step
        # the teacher starts as the policy after the warm-up, then lags behind it
        gap = max((t_fsdp[n] - fsdp[n]).abs().max().item() for n in fsdp)
        assert gap == 0.0 if step == 0 else gap > 1e-5, (step, gap)
    assert all(p.dtype == torch.float32 for p in fsdp.values())
    assert all(p.dtype == torch.float32 for p in t_fsdp.values())
    start = _weights(warm_dir)
    assert max((fsdp[n] - start[n]).abs().max().item() for n in start) > 1e-4  # it trained
    assert os.path.isdir(fsdp_run / "checkpoint-1" / "optimizer")  # sharded optimizer state (DCP)
    # before the first RL step there is none
    assert not os.path.exists(fsdp_run / "checkpoint-0" / "optimizer")


def test_fsdp_kill_and_resume(fsdp_run, warm_dir, data_file, eval_file, tmp_path):
    """SIGKILL the whole torchrun job after a checkpoint, resume it: the later steps and the final
    weights are those of the uninterrupted run. Also an explicit resume from checkpoint-0 (fresh
    optimizer) into another directory."""
    out = tmp_path / "killed"
    args = [str(a) for a in _args(warm_dir, data_file, eval_file, out) + ["--fsdp", "true"]]
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "sgpo.py")
        ]
        + args,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-1").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(runtime.latest_checkpoint(str(out)).rsplit("-", 1)[1])
    assert 1 <= killed_at < STEPS, "the run finished before it could be killed"
    resumed = run_sgpo(args + ["--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from_zero = run_sgpo(
        args[: args.index("--output_dir") + 1]
        + [str(tmp_path / "from0")]
        + args[args.index("--output_dir") + 2 :]
        + ["--resume", str(fsdp_run / "checkpoint-0")],
        nproc=2,
    )
    assert from_zero.returncode == 0, from_zero.stderr[-3000:]
    reference = {
        m["step"]: _comparable(m) for m in read_metrics(fsdp_run / "metrics.jsonl") if "step" in m
    }
    final = _weights(fsdp_run / f"checkpoint-{STEPS}")
    final_teacher = _weights(fsdp_run / f"checkpoint-{STEPS}" / "teacher")
    for run, first in ((out, killed_at + 1), (tmp_path / "from0", 1)):
        metrics = [m for m in read_metrics(run / "metrics.jsonl") if m.get("step", 0) >= first]
        assert [m["step"] for m in metrics] == list(range(first, STEPS + 1))
        for m in metrics:
            assert _comparable(m) == pytest.approx(reference[m["step"]], abs=1e-6), (run, m["step"])
        weights = _weights(run / f"checkpoint-{STEPS}")
        assert max((weights[n] - final[n]).abs().max().item() for n in final) == 0.0
        teacher = _weights(run / f"checkpoint-{STEPS}" / "teacher")
        assert max((teacher[n] - final_teacher[n]).abs().max().item() for n in final) == 0.0


def test_fsdp_checkpoint_needs_fsdp_to_resume(fsdp_run, data_file, tmp_path, capsys):
    assert (
        sgpo.main(
            [
                "--model", "unused", "--data", str(data_file), "--output_dir", str(tmp_path),
                "--resume", str(fsdp_run / "checkpoint-1")
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr().err
        == f"error: --resume {fsdp_run / 'checkpoint-1'}: written with --fsdp true; resume with "
           f"it\n"
    )
    assert (
        sgpo.main(["--data", str(data_file), "--output_dir", str(tmp_path), "--fsdp", "true"]) == 2
    )
    assert "--fsdp: needs a process group; launch with torchrun" in capsys.readouterr().err
    assert json.load(open(fsdp_run / "checkpoint-1" / "sgpo_config.json"))["fsdp"] is True


def test_bf16_residual_stream_is_fp32_under_ddp_and_fsdp():
    """--dtype bf16: FSDP gathers the weights in bf16 but, as DDP's autocast over fp32 weights,
    keeps the residual stream fp32 (runtime.shard_fsdp: no cast of a layer's inputs, the embedding's
    output back to fp32); the two modes' gradients then agree to bf16 precision (measured 0.5 %
    relative L2 on the tiny model; SmolLM2: docs/memory_and_speed.md)."""
    proc = run_sgpo([], nproc=1, script="tests/bench_residual_dtype.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines()}
    for mode in ("ddp", "fsdp"):
        assert "hidden states torch.float32" in lines[f"{mode} bf16"]
    gap = float(lines["ddp vs fsdp bf16"].split("relative L2 gap ")[1])
    assert 0 < gap < 2e-2
