"""End to end: sgpo.py as users run it, on the tiny model (warm-started by sgpo.py's own SFT
warm-up)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import reward
import engine
import inputs
import runtime
import sgpo
from tests.conftest import ROOT, read_metrics, run_sgpo, tiny_rows
from toy.tiny import build_model, build_tokenizer

COMMON = [
    "--batch_size", 4, "--num_generations", 4, "--num_guided_generations", 2,
    "--max_completion_length", 12, "--learning_rate", 1e-3, "--micro_batch_size", 6, "--kl_clip",
    1.0, "--eval_data", ""
]
REQUIRED = [
    "reward/autonomous_mean", "reward/guided_mean", "pass_gap", "alpha/mean", "kd/target_frac",
    "loss/grpo", "loss/kd", "clip_ratio", "kd/kl_clip_frac", "entropy", "completions/mean_length",
    "completions/clipped_ratio", "frac_reward_zero_std", "rollout_probs_diff_max",
    "perf/gen_tokens_per_s", "time/generate", "time/grade", "time/select", "time/update"
]
TIMING = ("perf/gen_tokens_per_s", "time/generate", "time/grade", "time/select", "time/update")


def test_warmup_learned_the_format(warm_dir):
    sft = [m for m in read_metrics(warm_dir.parent / "metrics.jsonl") if m.get("phase") == "sft"]
    assert sft[-1]["loss/sft"] < 0.5 * sft[0]["loss/sft"]  # the SFT warm-up trains
    state = torch.load(warm_dir / "trainer_state.pt", weights_only=False)
    assert state["sft_done"] and state["step"] == 0


def test_python_run_metrics_and_checkpoint(warm_dir, data_file, tmp_path):
    out = tmp_path / "run"
    proc = run_sgpo(
        [
            "--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 3,
            "--save_steps", 2
        ]
        + COMMON
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last line says where the outputs are
    last = f"done: 3 RL steps; checkpoints and metrics.jsonl in {out}"
    assert proc.stdout.strip().splitlines()[-1] == last
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(REQUIRED) <= set(m), set(REQUIRED) - set(m)
        assert m["rollout_probs_diff_max"] < 1e-4
    # distillation happened
    assert any(m["kd/target_frac"] > 0 and m["loss/kd"] > 0 for m in metrics)
    assert any(m["reward/autonomous_mean"] > 0 for m in metrics)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    before = AutoModelForCausalLM.from_pretrained(warm_dir)
    # it trained
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["config"]["max_steps"] == 3 and len(state["alpha"]) > 0
    assert json.load(open(out / "checkpoint-3" / "sgpo_config.json"))["kd_loss"] == "fkl"


def _usable_strategy(q):
    return bool(q.get("strategy")) and q.get("strategy_status", "kept") == "kept"


def _accuracy_one_at_a_time(model, tok, rows, cfg, guided):
    rows = [q for q in rows if not guided or _usable_strategy(q)]
    correct = 0.0
    for q in rows:  # no batching, no padding
        out = engine.generate(
            model, [engine.prompt_ids(tok, cfg, q, guided)], tok.pad_token_id, [tok.eos_token_id],
            "cpu", 0.0, cfg.max_completion_length
        )[0]
        correct += reward.math_reward(tok.decode(out["ids"], skip_special_tokens=True), q["answer"])
    return correct / len(rows)


def test_held_out_accuracy_equals_one_problem_at_a_time(warm_dir, eval_file):
    """evaluate_accuracy (greedy, batched and left-padded, sharded over ranks) == each problem
    decoded alone; the guided accuracy counts only rows with a usable strategy."""
    model, tok = engine.load_model(str(warm_dir), torch.float32, "cpu")
    rows = inputs.load_problems(str(eval_file), ("problem", "answer"), skip_unkept=False)
    # 3 a batch
    cfg = sgpo.Config(
        batch_size=1, num_generations=2, num_guided_generations=1, max_completion_length=12
    )
    expected = {
        f"eval/{m}_acc": _accuracy_one_at_a_time(model, tok, rows, cfg, m == "guided")
        for m in ("unguided", "guided")
    }
    assert engine.greedy_accuracy(model, tok, rows, cfg, "cpu") == pytest.approx(expected)
    assert 0 < expected["eval/unguided_acc"] < 1  # the case discriminates
    # no process group: per shard
    shards = [engine.greedy_accuracy(model, tok, rows, cfg, "cpu", (r, 2)) for r in (0, 1)]
    assert shards[0]["eval/unguided_acc"] * 4 + shards[1]["eval/unguided_acc"] * 3 == pytest.approx(
        7 * expected["eval/unguided_acc"]
    )
    assert shards[0]["eval/guided_acc"] * 2 + shards[1]["eval/guided_acc"] * 2 == pytest.approx(
        4 * expected["eval/guided_acc"]
    )


def test_torchrun_two_ranks(warm_dir, data_file, eval_file, tmp_path):
    """DDP over 2 ranks, with a base teacher: the held-out evaluation counts both ranks' shares,
    and the teacher stays the warm model (its guided accuracy and its saved weights) while the
    policy moves."""
    out = tmp_path / "ddp"
    proc = run_sgpo(
        ["--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 2]
        + COMMON
        + ["--eval_data", eval_file, "--eval_steps", 1, "--teacher", "base"],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    # rank 0 alone writes; step 0: the evaluation before RL
    assert [m["step"] for m in metrics] == [0, 1, 2]
    model, tok = engine.load_model(str(warm_dir), torch.float32, "cpu")
    rows = inputs.load_problems(str(eval_file), ("problem", "answer"), skip_unkept=False)
    cfg = sgpo.parse_args(["--max_completion_length", "12"])
    expected = engine.greedy_accuracy(model, tok, rows, cfg, "cpu")
    expected["eval/teacher_guided_acc"] = expected["eval/guided_acc"]
    # both ranks' shares counted
    assert {k: v for k, v in metrics[0].items() if k != "step"} == pytest.approx(expected)
    assert metrics[2]["eval/teacher_guided_acc"] == pytest.approx(expected["eval/guided_acc"])
    warm = dict(model.named_parameters())
    teacher = engine.load_weights(str(out / "checkpoint-2" / "teacher"), "cpu")
    trained = engine.load_weights(str(out / "checkpoint-2"), "cpu")
    for name, w in teacher.named_parameters():
        assert torch.equal(w, warm[name]), name
    assert any(not torch.equal(w, warm[n]) for n, w in trained.named_parameters())
    assert all("eval/unguided_acc" in m and "eval/guided_acc" in m for m in metrics)
    assert (
        f"step 2, greedy accuracy on 7 problems of {eval_file}: unguided "
        f"{100 * expected['eval/unguided_acc']:.1f}% -> "
        in proc.stderr + proc.stdout
    )
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    # 2 steps x 4 problems x 2 ranks: both ranks' updates reach the table
    assert len(state["alpha"]) == 16
    assert len(state["rng"]) == 2
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")


def _comparable(m):
    return {k: v for k, v in m.items() if k not in TIMING}


def test_kill_and_resume_reproduces_next_steps(warm_dir, data_file, eval_file, tmp_path):
    """With evaluations on the way (greedy: they must not shift the sampling of the steps after
    them) and a base teacher (its weights saved and reloaded: the warm model's, exactly)."""
    args = (
        ["--model", warm_dir, "--data", data_file, "--max_steps", 8, "--save_steps", 1]
        + COMMON
        + ["--eval_data", eval_file, "--eval_steps", 3, "--teacher", "base",
           "--log_completions", 2]
    )
    ref = run_sgpo(args + ["--output_dir", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {
        m["step"]: _comparable(m) for m in read_metrics(tmp_path / "ref" / "metrics.jsonl")
    }

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sgpo.py")] + [str(a) for a in args + ["--output_dir", out]],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (out / "checkpoint-99.tmp").mkdir()  # a checkpoint whose write was interrupted is ignored
    last = runtime.latest_checkpoint(str(out))
    killed_at = int(last.rsplit("-", 1)[1])
    assert 2 <= killed_at < 8, "the run finished before it could be killed"

    resumed = run_sgpo(args + ["--output_dir", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(0, 9))  # no duplicated steps
    assert [m["step"] for m in metrics if "eval/unguided_acc" in m] == [0, 3, 6, 8]
    for m in metrics[killed_at + 1 :]:
        for k, v in _comparable(m).items():
            assert v == pytest.approx(reference[m["step"]][k], abs=1e-6), (m["step"], k)
    assert "eval/teacher_guided_acc" in metrics[-1]
    # the killed run's samples after its checkpoint dropped, then sampled again alike
    samples = read_metrics(out / "completions.jsonl")
    assert [s["step"] for s in samples] == [step for step in range(1, 9) for _ in range(2)]
    assert samples == read_metrics(tmp_path / "ref" / "completions.jsonl")
    warm = dict(AutoModelForCausalLM.from_pretrained(warm_dir).named_parameters())
    for run in (tmp_path / "ref", out):
        teacher = AutoModelForCausalLM.from_pretrained(run / "checkpoint-8" / "teacher")
        for name, w in teacher.named_parameters():
            assert torch.equal(w, warm[name]), (run, name)


def test_warmup_evaluated_once_across_a_resume(tiny_dir, data_file, eval_file, tmp_path):
    """The evaluation before RL follows the SFT warm-up and is saved with checkpoint-0: resuming
    from it does not repeat it, and the printed before -> after compares with it."""
    args = (
        ["--model", tiny_dir, "--data", data_file, "--output_dir", tmp_path, "--sft_epochs", 1]
        + COMMON
        + ["--eval_data", eval_file, "--eval_steps", 0]
    )
    assert sgpo.main([str(a) for a in args + ["--max_steps", 0]]) == 0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0", "metrics.jsonl"]
    state = torch.load(tmp_path / "checkpoint-0" / "trainer_state.pt", weights_only=False)
    proc = run_sgpo(args + ["--max_steps", 1, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "step" in m]
    assert [m["step"] for m in lines] == [0, 1] and "eval/guided_acc" in lines[1]
    assert {k: v for k, v in lines[0].items() if k != "step"} == state["eval_start"]
    assert (
        f"unguided {100 * state['eval_start']['eval/unguided_acc']:.1f}% -> "
        in proc.stderr + proc.stdout
    )


BAD = [
    (
        '{"problem": "p", "answer": "1", "strategy": "s"}\nnot json\n',
        ":2: line: not valid JSON (Expecting value)"
    ),
    ('{"problem": "p", "answer": "1"}\n', ":1: strategy: missing"),
    ('{"problem": "p", "answer": "", "strategy": "s"}\n', ":1: answer: empty"),
    ('{"problem": "p", "answer": 1, "strategy": "s"}\n', ":1: answer: expected a string, got int"),
    (
        '{"id": 1, "problem": "p", "answer": "1", "strategy": "s"}\n{"id": 1, "problem": "q", '
        '"answer": "2", "strategy": "s"}\n',
        ":2: id: duplicate of line 1",
    ),
    ("[1, 2]\n", ":1: line: expected a JSON object"),
    ("", ": no problems (empty file)"),
    (
        '{"problem": "p", "answer": "1", "strategy": "s", "solution": 3}\n',
        ":1: solution: expected a string, got int"
    ),
    (
        '{"problem": "p", "answer": "1", "strategy": "s", "id": [1]}\n',
        ":1: id: expected a string or an integer"
    ),
    (b'{"problem": "p\xff", "answer": "1", "strategy": "s"}\n', ":1: line: not valid UTF-8"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_data_one_line_exit_2(content, message, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert sgpo.main(["--data", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}{message}\n"
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_arguments_exit_2(tmp_path, capsys, data_file, warm_dir):
    cases = [
        (["--kd_loss", "jsd"], "--kd_loss: must be fkl, rkl or sft"),
        (["--save_total_limit", "-1"], "--save_total_limit: must be >= 0"),
        (["--max_steps", "ten"], "--max_steps: invalid int value: 'ten'"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
        (["--resume", str(tmp_path / "nope")], "--resume"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
        (
            ["--sft_epochs", "1", "--sft_data", str(tmp_path / "nosol.jsonl")],
            ":1: solution: missing"
        ),
        (["--eval_data", str(tmp_path / "nosol.jsonl")], ":2: answer: missing"),
        (["@" + str(tmp_path / "missing.args")], "missing.args"),
        (["--batch_size", "6", "--steps_per_generation", "4"],
         "--steps_per_generation: 4 mini-batches do not divide the global batch of 6 x 1 "
         "problems into 4 x 1 equal parts (--batch_size must be a multiple of 4)"),
    ]
    (tmp_path / "nosol.jsonl").write_text(
        '{"problem": "p", "answer": "1", "strategy": "s"}\n{"problem": "q"}\n'
    )
    for args, message in cases:
        assert sgpo.main(args + ["--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_exit_code_and_existing_run_protected(warm_dir, data_file, tmp_path):
    proc = run_sgpo(
        ["--model", tmp_path / "no-such-model", "--data", data_file, "--output_dir", tmp_path / "o"]
    )
    assert (
        proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no-such-model" in proc.stderr
    ), proc.stderr
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_sgpo(["--model", warm_dir, "--data", data_file, "--output_dir", out])
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    other = tmp_path / "other"  # checkpoints of some other run, no metrics file: protected too
    (other / "checkpoint-7").mkdir(parents=True)
    assert (
        sgpo.main(["--model", str(warm_dir), "--data", str(data_file), "--output_dir", str(other)])
        == 2
    )
    assert (other / "checkpoint-7").is_dir()


def test_paper_args_file():
    """paper.args holds the method sheet's hyper-parameters; later flags override it; '#' comments
    and quotes."""
    cfg = sgpo.parse_args(
        ["@" + str(ROOT / "paper.args"), "--model", "m", "--data", "d.jsonl", "--max_steps", "7"]
    )
    sheet = dict(
        num_generations=8, num_guided_generations=4, epsilon=0.2, epsilon_high=0.28, beta=0.0,
        kd_loss="fkl", kl_clip=1.0, target_selection=True, adaptive_alpha=True, alpha_0=0.5,
        alpha_gamma=0.1, alpha_max=0.8, teacher="live"
    )
    assert {k: getattr(cfg, k) for k in sheet} == sheet
    assert (cfg.model, cfg.data, cfg.max_steps, cfg.eval_data, cfg.gradient_checkpointing) == (
        "m", "d.jsonl", 7, "", True
    )
    # what fits 7B on 80 GB (docs/memory_and_speed.md)
    assert (cfg.fsdp, cfg.generation_batch_size, cfg.dtype) == (True, 64, "auto")
    # veRL's mini-batches: 4 optimizer steps per rollout batch of 16 problems a rank
    assert (cfg.steps_per_generation, cfg.batch_size % cfg.steps_per_generation) == (4, 0)
    # ~92 GB a 7B checkpoint: the newest 2 kept
    assert (cfg.save_steps, cfg.save_total_limit) == (50, 2)
    # paper.args never falls back on the toy's data
    with pytest.raises(inputs.UsageError, match="--data: required"):
        sgpo.parse_args(["@" + str(ROOT / "paper.args"), "--model", "m"])
    toy = sgpo.parse_args([])  # the defaults are the CPU testbed's
    assert (toy.model, toy.eval_data, toy.kl_clip) == (
        "toy/cups_data/model", "toy/cups_data/test.jsonl", float("inf")
    )


def test_bf16_compute_run_trains_at_lr_1e6_and_saves_fp32(warm_dir, data_file, tmp_path):
    """--dtype bf16 (the GPU default) on CPU: autocast over fp32 weights. At the paper's RL lr of
    1e-6 one step moves most weights, and the checkpoint keeps those fp32 master weights (a bf16
    copy would round the moves away)."""
    out = tmp_path / "bf16"
    args = [
        "--model", warm_dir, "--data", data_file, "--output_dir", out, "--max_steps", 1, "--dtype",
        "bf16"
    ] + COMMON
    assert sgpo.main([str(a) for a in args + ["--learning_rate", 1e-6]]) == 0
    m = read_metrics(out / "metrics.jsonl")[0]
    assert m["rollout_probs_diff_max"] < 0.1 and m["entropy"] > 0 and m["loss/kd"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    before = AutoModelForCausalLM.from_pretrained(warm_dir)
    assert model.config.dtype == torch.float32 and all(
        p.dtype == torch.float32 for p in model.parameters()
    )
    moved = sum((a != b).sum().item() for a, b in zip(model.parameters(), before.parameters()))
    # the rest: embedding rows of unused characters
    assert moved / sum(p.numel() for p in model.parameters()) > 0.5
    for (name, a), b in zip(model.named_parameters(), before.parameters()):
        # |w| ~ 1: a 1e-6 step is below bf16's resolution (4e-3), well above fp32's (1e-7)
        if "norm" in name:
            assert (a != b).any() and (a - b).abs().max() < 1e-5, name


def test_warmup_ends_with_turn_end_token_and_resume_loads_to_cpu(tmp_path, data_file, monkeypatch):
    """Qwen2.5's generation EOS list is [<|endoftext|>, <|im_end|>] (sorted); the chat template
    closes a turn with <|im_end|> (tokenizer.eos_token), so the warm-up must teach that one, not the
    list's first id. And resume reads trainer_state.pt to the CPU (without map_location every rank
    would load it onto the GPU it was saved from)."""
    tok = build_tokenizer()
    model = build_model(tok)
    model.generation_config.eos_token_id = [
        tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id
    ]
    # the trap: the smaller id is not the turn end
    assert model.generation_config.eos_token_id[0] < tok.eos_token_id
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    seen, loads, real_accumulate, real_load = [], [], sgpo.accumulate_gradients, torch.load
    monkeypatch.setattr(
        sgpo, "accumulate_gradients", lambda *a, **k: seen.extend(a[1]) or real_accumulate(*a, **k)
    )
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append(k.get("map_location")) or real_load(*a, **k)
    )
    args = [
        "--model", tmp_path / "model", "--data", data_file, "--output_dir", tmp_path / "out",
        "--sft_epochs", 1
    ] + COMMON
    assert sgpo.main([str(a) for a in args + ["--max_steps", 0]]) == 0
    sft = [r for r in seen if type(r) is sgpo.Row]
    assert len(sft) == 16 and all(r.response[-1] == tok.eos_token_id for r in sft)
    assert all(
        tok.decode(r.response[:-1])
        == next(
            q["solution"]
            for q in tiny_rows()
            if r.prompt == engine.prompt_ids(tok, sgpo.Config(), q, False)
        )
        for r in sft
    )
    assert sgpo.main([str(a) for a in args + ["--max_steps", 1, "--resume"]]) == 0
    assert loads == ["cpu"]


def test_generation_batch_size_bounds_each_call(warm_dir, eval_file):
    """generate(batch_size=B): at most B sequences per HF generate call (the KV cache of a call),
    same greedy output as one call; the held-out evaluation follows --generation_batch_size."""
    model, tok = engine.load_model(str(warm_dir), torch.float32, "cpu")
    rows = inputs.load_problems(str(eval_file), ("problem", "answer"), skip_unkept=False)
    cfg = sgpo.Config(max_completion_length=12)
    prompts = [engine.prompt_ids(tok, cfg, q, False) for q in rows]
    calls, real = [], model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw)
    one = engine.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 0.0, 12)
    split = engine.generate(
        model, prompts, tok.pad_token_id, [tok.eos_token_id], "cpu", 0.0, 12, batch_size=3
    )
    assert calls == [7, 3, 3, 1]
    assert [o["ids"] for o in one] == [o["ids"] for o in split]
    assert all(
        (a["sampler_logps"] - b["sampler_logps"]).abs().max() < 1e-5 for a, b in zip(one, split)
    )
    calls.clear()
    expected = engine.greedy_accuracy(model, tok, rows, cfg, "cpu")
    assert (
        engine.greedy_accuracy(model, tok, rows, dataclasses.replace(cfg, generation_batch_size=2),
                               "cpu")
        == expected
    )
    assert calls == [7, 4] + [2, 2, 2, 1] + [2, 2]  # default (0): all in one call; then 2 at a time


def test_flags_take_both_spellings():
    """--max_steps and --max-steps, as HF's parser takes them (and @files' lines)."""
    for spelling in ("--max_steps", "--max-steps"):
        cfg = sgpo.parse_args([spelling, "7", "--learning-rate", "3e-6"])
        assert (cfg.max_steps, cfg.learning_rate) == (7, 3e-6)
