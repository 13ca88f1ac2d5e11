"""The GPU check: what only a GPU can tell about sgpo.py (CUDA bf16 numerics, NCCL, memory, speed),
in parts that each pass or fail. Run by tests/gpu_check.sh, which runs every part under `timeout`,
keeps the log, exits non-zero at the first failure with its reason on the last line and ends with
one JSON summary line. Needs requirements.txt only (no pytest). On a CPU: the same parts at toy
sizes (training in fp32, the kernels and speed parts in bf16), the GPU-only ones reported as
skipped.

    bash tests/gpu_check.sh [DIR]
    GPU_CHECK_FAULT=nan bash tests/gpu_check.sh     # a NaN in the first RL step's GRPO loss: fails
    python tests/gpu_check.py PART DIR [ddp|fsdp]   # one part (train, resume: under torchrun)

Parts (each writes DIR/result-PART.json, read by `summary`):
- deps: the runtime packages import; the device, and whether it computes in bf16.
- build: the check's model (GPU: Qwen2.5 proportions at 4 layers with Qwen's 151,936-token
  vocabulary, so the LM head, the sampler's [N, V] log-softmax and the KD chunks have their real
  size; CPU: the tests' tiny model) and data.
- train: (torchrun, world 1, DDP then FSDP) the warm-up and RL steps in --dtype auto (bf16 on a
  GPU): every loss and gradient norm finite, KD targets found (kd/target_frac > 0), and the
  sampler's log-probs within DIFF_BOUND of the trainer's (rollout_probs_diff_max).
- kernels: under the run's autocast (bf16 on a GPU), the chunked LM head against the plain one
  (values, gradients); the engine's in-place KV cache against HF's DynamicCache (the same greedy
  tokens); the shared prompt layout against a row each (hidden states).
- resume: (torchrun, FSDP) 4 steps straight against 2 steps and 2 resumed: the first resumed
  step samples and scores exactly as the straight run (weights and RNG restored); the last step's
  metrics and the final weights are compared and the difference reported (CUDA's backward
  kernels add in an order that can change: bitwise equality is reported, not required).
- memory: (GPU only) a random-init Qwen2.5-1.5B-shaped model, one RL step at
  --max_completion_length 2048 (random weights never stop early: every rollout at full length),
  torch.cuda.max_memory_allocated and max_memory_reserved per phase; memory-sim: the same step
  simulated (`tests/memory_plan.py --simulate --world 1`, on the CPU) and the gap per phase.
- speed: generation tokens/s by the policy and by a base teacher (--teacher base), the teacher's
  forward from its working copy and from its fp32 weights under autocast.
- summary: one JSON line of every part's result.
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (R) the largest |sampler log-prob - trainer log-prob| allowed over a step's autonomous tokens: the
# same distribution computed twice, by generate's KV-cached decode steps and by the trainer's
# forward over the whole sequence; in fp32 they agree to ~1e-5, in bf16 to what bf16 matmuls
# differ by in another order (CPU bf16, the tiny model: 0.05-0.2 over a step's tokens)
DIFF_BOUND = 1.0
GPU = None  # set in main: torch.cuda.is_available()


def fail(message: str):
    print(f"gpu_check: FAIL: {message}", flush=True)
    sys.exit(1)


def write_result(folder: str, part: str, result: dict):
    with open(os.path.join(folder, f"result-{part}.json"), "w") as f:
        json.dump(result, f)
    print(f"gpu_check: {part}: {json.dumps(result)}", flush=True)


def deps(folder):
    missing = []
    for name in ("torch", "transformers", "math_verify", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        fail(f"missing package(s) {', '.join(missing)}: pip install -r requirements.txt")
    import torch
    import transformers
    import runtime
    device = torch.cuda.get_device_name() if GPU else "cpu"
    write_result(folder, "deps", {"torch": torch.__version__,
                                  "transformers": transformers.__version__, "device": device,
                                  "bf16": runtime.compute_dtype("auto") == torch.bfloat16})


def build(folder):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from toy.tiny import build_model, build_tokenizer, tiny_rows, write_jsonl
    tok = build_tokenizer()
    torch.manual_seed(0)
    if GPU:
        model = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=128,
            max_position_embeddings=8192, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False))
    else:
        model = build_model(tok, hidden=32, layers=2)
    model.save_pretrained(os.path.join(folder, "model"))
    tok.save_pretrained(os.path.join(folder, "model"))
    write_jsonl(os.path.join(folder, "train.jsonl"), tiny_rows(64))
    write_result(folder, "build", {"parameters": sum(p.numel() for p in model.parameters())})


def run_args(folder, out, *more):
    """sgpo.py's flags of the train and resume parts: a warm-up that teaches the answer format,
    then RL steps that find KD targets."""
    return [
        "--model", os.path.join(folder, "model"), "--data", os.path.join(folder, "train.jsonl"),
        "--output_dir", out, "--overwrite_output_dir", "--sft_epochs", "10" if GPU else "5",
        "--sft_learning_rate", "3e-3" if GPU else "1e-2", "--learning_rate", "1e-6",
        "--batch_size", "16" if GPU else "8", "--reward_workers", "-1" if GPU else "0",
        "--num_generations", "8",
        "--num_guided_generations", "4", "--max_completion_length", "64" if GPU else "12",
        "--generation_batch_size", "96" if GPU else "24", "--micro_batch_size", "16",
        "--gradient_checkpointing", "true", "--kl_clip", "1.0", "--eval_data", "",
        "--ddp_timeout", "300", *more]


def inject_fault():
    """GPU_CHECK_FAULT=nan: the first RL step's GRPO loss is NaN (the check must fail)."""
    if os.environ.get("GPU_CHECK_FAULT") != "nan":
        return
    import sgpo
    real = sgpo.grpo_token_loss

    def nan_loss(*args, **kwargs):
        loss, clipped = real(*args, **kwargs)
        return loss * math.nan, clipped

    sgpo.grpo_token_loss = nan_loss


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_finite(records, what):
    for r in records:
        for key in ("loss/sft", "loss/grpo", "loss/kd", "grad_norm"):
            if key in r and not math.isfinite(r[key]):
                fail(f"{what}: {key} is {r[key]} at {r.get('phase', 'rl')} step "
                     f"{r.get('sft_step', r.get('step'))}")


def train(folder, mode):
    import sgpo
    inject_fault()
    out = os.path.join(folder, f"train-{mode}")
    steps = "3" if GPU else "2"
    what = f"train {mode}"
    try:
        code = sgpo.main(run_args(folder, out, "--fsdp", str(mode == "fsdp").lower(),
                                  "--max_steps", steps))
    except Exception as e:
        # a NaN loss ends in a sampling error a step later: name the first bad value first
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            check_finite(read_metrics(out), what)
        fail(f"{what}: sgpo.py raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if code != 0:
        fail(f"{what}: sgpo.py exited with {code}")
    if int(os.environ.get("RANK", 0)):
        return
    records = read_metrics(out)
    rl = [r for r in records if r.get("phase") != "sft"]
    check_finite(records, what)
    if not any(r["kd/target_frac"] > 0 for r in rl):
        fail(f"{what}: no KD target in {len(rl)} RL steps (kd/target_frac 0)")
    gap = max(r["rollout_probs_diff_max"] for r in rl)
    if not gap < DIFF_BOUND:
        fail(f"{what}: sampler vs trainer log-prob gap {gap:.3g} >= {DIFF_BOUND}")
    last = rl[-1]
    keys = ("kd/target_frac", "reward/autonomous_mean", "reward/guided_mean", "loss/grpo",
            "loss/kd", "grad_norm", "rollout_probs_diff_max", "time/generate", "time/update",
            "perf/gen_tokens_per_s")
    result = {k: last[k] for k in keys}
    result["rollout_probs_diff_max"] = gap
    if GPU:
        import torch
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    write_result(folder, f"train-{mode}", result)


def kernels(folder):
    import torch
    from transformers import cache_utils
    from toy.tiny import tiny_rows
    import engine
    import runtime
    import sgpo
    device = torch.device("cuda" if GPU else "cpu")
    dtype = runtime.compute_dtype("auto" if GPU else "bf16")
    model, tok = engine.load_model(os.path.join(folder, "model"), torch.float32, device)
    cfg = sgpo.Config(kd_chunk_size=64)
    result = {"dtype": str(dtype)}
    # the chunked head against the plain one, under the run's autocast
    torch.manual_seed(0)
    head = model.get_output_embeddings()
    h = model.config.hidden_size
    hidden = torch.randn(200, h, device=device, requires_grad=True)
    t_hidden = torch.randn(200, h, device=device)
    targets = torch.randint(0, 100, (200,), device=device)
    outs = {}
    for chunked in (True, False):
        cfg.chunked_head = chunked
        hidden.grad = head.weight.grad = None
        with torch.autocast(device.type, dtype=dtype):
            logp, div, _ = sgpo.head_outputs(head, hidden, targets, cfg, (t_hidden, head))
        (logp.sum() + div.sum()).backward()
        outs[chunked] = (logp.detach(), div.detach(), hidden.grad.clone(), head.weight.grad.clone())
    diffs = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
             for a, b in zip(outs[True], outs[False])]
    result["chunked_head_rel_diff"] = dict(zip(("logp", "kd", "grad_hidden", "grad_head"), diffs))
    if not max(diffs) < 3e-2:
        fail(f"kernels: chunked head vs plain differ by {max(diffs):.3g} (relative) under {dtype}")
    # the engine's in-place KV cache against HF's DynamicCache (cast to the compute dtype, as the
    # engine's is): the same greedy tokens
    prompts = [engine.prompt_ids(tok, cfg, q, g) for q in tiny_rows(4) for g in (False, True)]

    class Grown(cache_utils.DynamicCache):
        def update(self, keys, values, *args, **kwargs):
            return super().update(keys.to(dtype), values.to(dtype), *args, **kwargs)

    runs, real = [], engine._kv_cache
    for make in (lambda m, d, n: Grown(config=m.config), real):
        engine._kv_cache = make
        with torch.autocast(device.type, dtype=dtype):
            runs.append([r["ids"] for r in engine.generate(
                model, prompts, tok.pad_token_id, model.generation_config.eos_token_id, device,
                0.0, 32)])
    engine._kv_cache = real
    result["kv_cache_greedy_equal"] = runs[0] == runs[1]
    if runs[0] != runs[1]:
        fail(f"kernels: the engine's KV cache and HF's give other greedy tokens under {dtype}")
    # the shared prompt layout against a row each: hidden states
    pairs = [(p, list(range(3, 3 + n))) for p in prompts[:2] for n in (5, 9, 13)]
    states = []
    for share in ("true", "false"):
        policy = sgpo.Policy.of(model, tok, device, share=share)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            states.append(policy.response_hidden(pairs, sync_grads=False)[0].float())
    rel = ((states[0] - states[1]).abs().max() / states[1].abs().max()).item()
    result["shared_layout_rel_diff"] = rel
    if not rel < 3e-2:
        fail(f"kernels: shared prompt layout vs a row each differ by {rel:.3g} under {dtype}")
    write_result(folder, "kernels", result)


def resume(folder):
    from safetensors.torch import load_file
    import sgpo
    straight, resumed = (os.path.join(folder, f"resume-{n}") for n in ("straight", "resumed"))
    common = ["--fsdp", "true", "--max_steps", "4", "--save_steps", "2", "--sft_epochs", "0",
              "--learning_rate", "1e-4"]
    # the warm model of the train part: KD targets and a non-trivial update
    warm = os.path.join(folder, "train-fsdp", "checkpoint-0")
    args = run_args(folder, straight, *common, "--model", warm)
    if sgpo.main(args) != 0:
        fail("resume: the straight run exited non-zero")
    resumed_args = run_args(folder, resumed, *common, "--model", warm, "--resume",
                            os.path.join(straight, "checkpoint-2"))
    if sgpo.main(resumed_args) != 0:
        fail("resume: the resumed run exited non-zero")
    if int(os.environ.get("RANK", 0)):
        return
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    exact = ("reward/autonomous_mean", "reward/guided_mean", "kd/target_frac",
             "completions/mean_length", "perf/generated_tokens")
    for key in exact:
        if a[3][key] != b[3][key]:
            fail(f"resume: step 3's {key} {b[3][key]} after the resume, {a[3][key]} straight")
    for key in ("loss/grpo", "loss/kd"):
        if not abs(a[3][key] - b[3][key]) <= 1e-3 * max(abs(a[3][key]), 1e-3):
            fail(f"resume: step 3's {key} {b[3][key]} after the resume, {a[3][key]} straight")
    weights = [load_file(os.path.join(run, "checkpoint-4", "model.safetensors"))
               for run in (straight, resumed)]
    diff = max((weights[0][k].float() - weights[1][k].float()).abs().max().item()
               for k in weights[0])
    result = {"step3_equal": True, "final_weights_max_abs_diff": diff,
              "final_weights_bitwise": diff == 0,
              "step4_loss_diff": abs(a[4]["loss/grpo"] - b[4]["loss/grpo"])}
    # fp32 on a CPU: deterministic, the same bits
    if not GPU and diff != 0:
        fail(f"resume: final weights differ by {diff:.3g} on the CPU (must be bitwise)")
    write_result(folder, "resume", result)


# the memory part's step: a random-init Qwen2.5-1.5B-shaped model (random weights never stop early:
# every rollout at full length) at paper.args with these flags
MEMORY_MODEL = "Qwen2.5-1.5B-Instruct"
MEMORY_FLAGS = ["--batch_size", "1", "--num_generations", "4", "--num_guided_generations", "2",
                "--max_completion_length", "2048", "--generation_batch_size", "6",
                "--micro_batch_size", "2", "--steps_per_generation", "1", "--fsdp", "true"]


def memory(folder):
    """GPU only (gpu_check.sh skips it on a CPU): one RL step, peak memory per phase."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from tests.memory_plan import CONFIGS
    import sgpo
    path = os.path.join(folder, "qwen1.5b")
    if not os.path.isdir(path):
        from toy.tiny import build_tokenizer
        tok = build_tokenizer()
        config = AutoConfig.for_model(**{**CONFIGS[MEMORY_MODEL], "eos_token_id": tok.eos_token_id,
                                         "pad_token_id": tok.pad_token_id})
        torch.manual_seed(0)
        # made on the GPU (initialising 1.5B parameters on a CPU takes long) and stored in bf16
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config)
        model.to(torch.bfloat16).save_pretrained(path)
        del model
        torch.cuda.empty_cache()
        tok.save_pretrained(path)
    peaks = {}

    def measured(phase, fn):
        def run(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            peaks[phase] = {"allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                            "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
            return out
        return run

    for phase, fn in (("generation", "sample_rollouts"), ("scoring", "make_kd_rows"),
                      ("update", "update_policy")):
        setattr(sgpo, fn, measured(phase, getattr(sgpo, fn)))
    # half the rollouts graded correct: KD targets exist, so scoring and the KD term run
    sgpo.Grader.__call__ = lambda self, texts, answers: [float(i % 2) for i in range(len(texts))]
    # the step's memory, not a 1.5B checkpoint's minute of writing
    sgpo.save_checkpoint = lambda *args, **kwargs: None
    args = ["@paper.args", "--model", path, "--data", os.path.join(folder, "train.jsonl"),
            "--output_dir", os.path.join(folder, "memory-run"), "--overwrite_output_dir",
            "--max_steps", "1", "--eval_data", "", *MEMORY_FLAGS]
    if sgpo.main(args) != 0:
        fail("memory: sgpo.py exited non-zero")
    if int(os.environ.get("RANK", 0)) == 0:
        if set(peaks) != {"generation", "scoring", "update"}:
            fail(f"memory: phases measured: {sorted(peaks)} (no KD target: no scoring?)")
        write_result(folder, "memory", peaks)


def memory_sim(folder):
    """The memory part's step simulated on this machine's CPU (tests/memory_plan.py --simulate,
    world 1, the prompts' length) to set beside what the GPU measured."""
    import subprocess
    prompt = 160  # (R) the check's longest guided prompt in the tiny tokenizer's characters
    sim = subprocess.run(
        [sys.executable, "tests/memory_plan.py", "--simulate", "--config", MEMORY_MODEL,
         "--world", "1", "--prompt_tokens", str(prompt), "--", *MEMORY_FLAGS],
        capture_output=True, text=True)
    if sim.returncode != 0:
        fail(f"memory-sim: memory_plan.py --simulate failed: {sim.stderr.strip()[-300:]}")
    simulated = json.loads(sim.stdout.strip().splitlines()[-1])
    measured = {}
    path = os.path.join(folder, "result-memory.json")
    if os.path.exists(path):
        with open(path) as f:
            measured = json.load(f)
    # measured (allocated) minus simulated, per phase
    gap = {p: round(measured[p]["allocated_gb"] - simulated[f"{p}_gb"], 2) for p in measured}
    write_result(folder, "memory-sim", {"simulated": simulated, "measured_minus_simulated_gb": gap})


def speed(folder):
    import torch
    import engine
    import runtime
    import sgpo
    from toy.tiny import tiny_rows
    device = torch.device("cuda" if GPU else "cpu")
    # bf16 on a CPU too: the teacher's recast under autocast is what is measured
    cfg = sgpo.Config(model=os.path.join(folder, "model"), teacher="base", dtype="bf16",
                      max_completion_length=128 if GPU else 16, temperature=1.0)
    policy = engine.load_policy(cfg, None, False, device)
    rows = tiny_rows(32 if GPU else 8)
    prompts = [engine.prompt_ids(policy.tokenizer, cfg, q, True) for q in rows]
    result = {}
    # generation under the run's autocast: the policy (fp32 master weights, requiring grad: their
    # casts cached for the call) and the base teacher (its working copy)
    for name, lm in (("policy", policy.lm), ("teacher", policy.teacher.lm)):
        with runtime.autocast(cfg.dtype, device):
            engine.sample(policy, prompts[:2], cfg, lm)  # warm-up
            if GPU:
                torch.cuda.synchronize()
            start = time.time()
            outs = engine.sample(policy, prompts, cfg, lm)
            if GPU:
                torch.cuda.synchronize()
        result[f"{name}_gen_tokens_per_s"] = sum(len(o["ids"]) for o in outs) / (
            time.time() - start)
    # a teacher forward (the KD term's): from its working copy (what a run uses at a bf16 --dtype,
    # engine.with_working_copy), and from its frozen fp32 weights, cast under autocast at every op
    pairs = [(p, list(range(3, 3 + 60))) for p in prompts]
    frozen = engine.Policy.of(policy.teacher.master_weights(), policy.tokenizer, device)
    for name, view in (("teacher_forward_working_copy_s", policy.teacher),
                       ("teacher_forward_fp32_weights_s", frozen)):
        with torch.no_grad(), runtime.autocast(cfg.dtype, device):
            view.response_hidden(pairs, sync_grads=False)
            if GPU:
                torch.cuda.synchronize()
            start = time.time()
            for _ in range(5):
                view.response_hidden(pairs, sync_grads=False)
            if GPU:
                torch.cuda.synchronize()
        result[name] = (time.time() - start) / 5
    write_result(folder, "speed", result)


def summary(folder):
    results = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("result-"):
            with open(os.path.join(folder, name)) as f:
                results[name[7:-5]] = json.load(f)
    skipped = ["memory", "memory-sim"] if results["deps"]["device"] == "cpu" else []
    print(json.dumps({"gpu_check": "passed", "skipped": skipped, **results}))


def main():
    global GPU
    part, folder = sys.argv[1], sys.argv[2]
    if part == "summary":  # (no torch to import)
        return summary(folder)
    import torch
    GPU = torch.cuda.is_available()
    if part == "deps":
        deps(folder)
    elif part == "build":
        build(folder)
    elif part == "train":
        train(folder, sys.argv[3])
    elif part == "kernels":
        kernels(folder)
    elif part == "resume":
        resume(folder)
    elif part == "memory":
        memory(folder)
    elif part == "memory-sim":
        memory_sim(folder)
    elif part == "speed":
        speed(folder)
    else:
        fail(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
