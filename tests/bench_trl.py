"""TRL's GRPO and SDPO trainers on a model (the toy's by default), timed per step, then sgpo's step
(tests/bench_step.py) in the same process and thread count: the comparison of
docs/memory_and_speed.md "Speed". TRL is not a dependency: `pip install trl` to run it.

    python tests/bench_trl.py        # 8 problems a step x 8 rollouts (sgpo: 8 + 4), 48 tokens
    python tests/bench_trl.py --threads 2 --steps 8
    python tests/bench_trl.py --model out/smollm2 --data math.jsonl --problems 4 --generations 4 \
        --guided 2                   # a real model (tests/smollm2.py)
Per trainer: the mean step time after the first step and its generation part (TRL's own
`_generate`, timed by a wrapper), on the same problems and reward (reward.math_reward); SDPO
distils full logits, as sgpo does.
"""

import argparse
import shlex
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reward  # noqa: E402
from inputs import load_problems  # noqa: E402


# TRL's reward-function signature: dataset columns come as keyword lists
def correctness(completions, answer, **_):
    return [reward.math_reward(c[0]["content"], a) for c, a in zip(completions, answer)]


def bench(name: str, args) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import sgpo

    problems = load_problems(args.data)[: args.problems * (args.steps + 1)]
    cfg = sgpo.Config()
    data = Dataset.from_list(
        [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": cfg.prompt_template.replace("{problem}", q["problem"])
                    }
                ],
                "answer": q["answer"],
            }
            for q in problems
        ]
    )
    common = dict(
        per_device_train_batch_size=args.problems * args.generations,
        num_generations=args.generations, max_completion_length=args.max_completion_length,
        temperature=1.0, top_k=0, top_p=1.0, learning_rate=1e-4,
        max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, shuffle_dataset=False, output_dir=tempfile.mkdtemp(), epsilon_high=0.28,
        beta=0.0, disable_tqdm=True, logging_strategy="no", log_level="error"
    )
    if name == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl.experimental.sdpo import SDPOConfig as Config, SDPOTrainer as Trainer

        common.update(distillation_mode="full_logits")
    model, tok = (
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
        AutoTokenizer.from_pretrained(args.model)
    )
    steps, gen = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t)

    trainer = Trainer(
        model=model, reward_funcs=correctness, args=Config(**common), train_dataset=data,
        processing_class=tok, callbacks=[Clock()]
    )
    inner = trainer._generate

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        gen.append(time.perf_counter() - t)
        return out

    trainer._generate = timed
    trainer.train()
    s, g = sum(steps[1:]) / len(steps[1:]), sum(gen[1:]) / len(gen[1:])
    print(
        f"| TRL {name.upper()} | {len(steps) - 1} | {s:.2f} | {g:.2f} | {s - g:.2f} |", flush=True
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--generations", type=int, default=8, help="TRL's rollouts a problem (G1)")
    p.add_argument("--guided", type=int, default=4, help="sgpo's guided rollouts per problem (G2)")
    p.add_argument("--problems", type=int, default=8, help="problems a step")
    p.add_argument("--max_completion_length", type=int, default=48)
    p.add_argument("--trainers", nargs="*", default=["grpo", "sdpo"], help="TRL's, to time")
    p.add_argument("--sgpo", default="", help='more sgpo.py flags, one string: "--flag value"')
    p.add_argument("--model", default=os.path.join(ROOT, "toy/cups_data/model"))
    p.add_argument("--data", default=os.path.join(ROOT, "toy/cups_data/train.jsonl"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| trainer | steps after the first | step s | generation s | rest s "
        "|\n|---|---|---|---|---|"
    )
    for name in args.trainers:
        bench(name, args)
    import bench_step

    print(f"\nsgpo, the same problems, {args.generations} + {args.guided} rollouts each:")
    bench_step.main([
        "--steps", str(args.steps), "--reward_workers", "0", "--model", args.model, "--data",
        args.data, "--batch_size", str(args.problems), "--num_generations", str(args.generations),
        "--num_guided_generations", str(args.guided), "--max_completion_length",
        str(args.max_completion_length), *shlex.split(args.sgpo)
    ])
