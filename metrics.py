"""
What a run reports, kept out of the method: each RL step's metrics (from what it sampled and
trained on, reduced over ranks, with the time of each phase), the held-out accuracy, and where they
go: metrics.jsonl and, with --report_to, a live tracker (TensorBoard, Weights & Biases, trackio),
rank 0 only.
"""
import itertools
import json
import os

import torch
from tqdm import tqdm

from engine import greedy_accuracy
from runtime import full_weights, get_rank, prepare_output_dir, world_size

def rollout_metrics(stats, batch, alpha, minibatches, cfg, pass_gap):
    """What the step sampled (batch: sgpo.Batch) and trained on (the update's mini-batches):
    rewards, pass gap ([B] p_guided - p_auto), alpha, KD target fraction, lengths, into stats."""
    g1, n = cfg.num_generations, len(batch.problems)
    r_auto, r_guided = batch.rewards[:, :g1], batch.rewards[:, g1:]  # [B, G1], [B, G2]
    auto = [r for rollouts in batch.rollouts for r in rollouts[:g1]]
    guided = [r for rollouts in batch.rollouts for r in rollouts[g1:]]
    rows = list(itertools.chain.from_iterable(minibatches))
    stats.add("reward/autonomous_mean", r_auto, r_auto.numel())
    stats.add("reward/guided_mean", r_guided, r_guided.numel())
    stats.add("pass_gap", pass_gap, n)
    stats.add("alpha/mean", sum(alpha[q["id"]] for q in batch.problems), n)
    # KD rows are the ones with a teacher
    stats.add("kd/target_frac", sum(hasattr(r, "teacher_prompt") for r in rows), n)
    zero_std = (r_auto.std(1) == 0).float() if g1 > 1 else torch.ones(n)
    stats.add("frac_reward_zero_std", zero_std, n)
    stats.add("completions/mean_length", sum(len(r["ids"]) for r in auto), n * g1)
    stats.add("completions/clipped_ratio", sum(r["truncated"] for r in auto), n * g1)
    # up to the first EOS
    stats.add("perf/generated_tokens", sum(len(r["ids"]) for r in auto + guided), 0)
    stats.add("perf/trained_tokens", sum(len(r.response) for r in rows), 0)


# a sample's text in completions.jsonl, at most (an 8K-token response is ~30K characters)
MAX_SAMPLE_CHARS = 4000


def _clip(text: str) -> str:
    cut = len(text) - MAX_SAMPLE_CHARS
    return text if cut <= 0 else text[:MAX_SAMPLE_CHARS] + f" [... {cut} more characters]"


def completion_samples(batch, kd_rows, alpha, tokenizer, cfg) -> list:
    """--log_completions N: rank 0's first N problems of the step as the model wrote them (batch:
    sgpo.Batch; kd_rows: each problem's KD row or None): its first autonomous and first guided
    sample with their rewards, every rollout's reward, the KD target chosen (its index among the
    guided rollouts and its text) or why there is none, and alpha(q) after the step's update (the
    KD weight's under the default --alpha_update before)."""
    if not cfg.log_completions or get_rank() != 0:
        return []
    g1, out = cfg.num_generations, []
    for b, q in enumerate(batch.problems[:cfg.log_completions]):
        rollouts, rewards = batch.rollouts[b], batch.rewards[b].tolist()
        record = {"problem_id": q["id"], "problem": q["problem"], "answer": q["answer"],
                  "alpha": alpha[q["id"]], "autonomous_rewards": rewards[:g1],
                  "guided_rewards": rewards[g1:]}
        for mode, first in (("autonomous", 0), ("guided", g1)):
            # (G2 = 0: no guided sample)
            if first == len(rollouts):
                record[f"{mode}_sample"] = record[f"{mode}_reward"] = None
                continue
            text = tokenizer.decode(rollouts[first]["ids"], skip_special_tokens=True)
            record[f"{mode}_sample"], record[f"{mode}_reward"] = _clip(text), rewards[first]
        row, guided = kd_rows[b], [r["ids"] for r in rollouts[g1:]]
        record["kd_target"] = guided.index(row.response) if row else None
        record["kd_target_text"] = (
            _clip(tokenizer.decode(row.response, skip_special_tokens=True)) if row else None)
        record["kd_target_why"] = ("chosen" if row else "--use_kd false" if not cfg.use_kd
                                   else "no guided rollouts" if not guided
                                   else "no correct guided rollout")
        out.append(record)
    return out


def step_metrics(stats, times, grad_norm, opt, cfg, device) -> dict:
    """The step's metrics over all ranks, with the time of each phase (times: when each ended).
    stats: (the update's first pass and the rest of the step, the update's other passes); the
    constraints' fractions of the passes after the first optimizer step also as late/<name>."""
    first, late = stats
    steps = cfg.num_iterations * cfg.steps_per_generation
    metrics = {}
    if steps > 1:
        late_metrics = late.reduce(device)
        for k in ("clip_ratio", "kd/ratio_out_frac", "kd/kl_clip_frac"):
            if k in late_metrics:
                metrics[f"late/{k}"] = late_metrics[k]
        first.merge(late)
    metrics = {"loss/grpo": 0.0, "loss/kd": 0.0, **first.reduce(device), **metrics}
    # summed over the optimizer steps: their mean
    for k in ("loss/grpo", "loss/kd"):
        metrics[k] = metrics[k] / steps
    t_gen = times["generate"] - times["start"]
    metrics.update({
        "grad_norm": grad_norm, "lr": opt[1].get_last_lr()[0], "time/generate": t_gen,
        "perf/gen_tokens_per_s": metrics["perf/generated_tokens"] / t_gen,
        "time/grade": times["grade"] - times["generate"],
        "time/select": times["select"] - times["grade"],
        "time/update": times["update"] - times["select"]})
    return metrics


def held_out_accuracy(policy, problems, cfg, state, grade) -> dict:
    """Greedy held-out accuracy (engine.greedy_accuracy, each rank its share), printed by rank 0
    next to the one before RL (kept in state["eval_start"]); with a teacher of its own
    (--teacher base/ema), its guided accuracy too (eval/teacher_guided_acc)."""
    shard = get_rank(), world_size()
    with full_weights(policy.wrapped):
        result = greedy_accuracy(policy.lm, policy.tokenizer, problems, cfg, policy.device,
                                 shard, grade)
    if policy.teacher:
        with full_weights(policy.teacher.wrapped):
            guided = greedy_accuracy(policy.teacher.lm, policy.tokenizer, problems, cfg,
                                     policy.device, shard, grade, modes=("guided",))
        result.update({f"eval/teacher_{k[5:]}": v for k, v in guided.items()})
    start = state["eval_start"] = state["eval_start"] or result
    parts = []
    for k, v in result.items():
        before = f"{100 * start[k]:.1f}% -> " if state["step"] else ""
        parts.append(f"{k[5:-4]} {before}{100 * v:.1f}%")
    if get_rank() == 0:
        tqdm.write(f"step {state['step']}, greedy accuracy on {len(problems)} problems of "
                   f"{cfg.eval_data}: " + ", ".join(parts))
    return result


class RunLog:
    """Rank 0's records: a line each in <output_dir>/metrics.jsonl (prepared as
    runtime.prepare_output_dir says) and, with --report_to, the same numbers to a tracker:
    TensorBoard (<output_dir>/runs), Weights & Biases or trackio (project 'sgpo'; WANDB_MODE=offline
    and the like work as usual), the run's flags as its config. Warm-up records go under sft/ at
    their sft_step, RL records at their step. Other ranks: nothing."""

    def __init__(self, cfg, resumed_step, master: bool):
        self.master, self.kind, self.tracker = master, cfg.report_to, None
        self.output_dir = cfg.output_dir
        if not master:
            return
        self.path = prepare_output_dir(cfg.output_dir, resumed_step)
        config = vars(cfg)
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tracker = SummaryWriter(os.path.join(cfg.output_dir, "runs"))
            self.tracker.add_text("config", json.dumps(config, indent=1))
        elif self.kind == "wandb":
            import wandb
            self.tracker = wandb.init(project="sgpo", dir=cfg.output_dir, config=config)
        elif self.kind == "trackio":
            import trackio
            self.tracker = trackio.init(project="sgpo", config=config)

    def __call__(self, record: dict):
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is None:
            return
        sft = record.get("phase") == "sft"
        step = record["sft_step"] if sft else record["step"]
        values = {("sft/" if sft else "") + k: v for k, v in record.items()
                  if isinstance(v, (int, float)) and k not in ("step", "sft_step", "phase")}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.tracker.add_scalar(k, v, step)
        else:
            self.tracker.log({**values, "sft_step" if sft else "step": step})

    def completions(self, step: int, samples: list):
        """--log_completions: a line per sampled problem in <output_dir>/completions.jsonl and,
        with --report_to tensorboard or wandb, the step's samples as a text table."""
        if not (self.master and samples):
            return
        lines = [{"step": step, **s} for s in samples]
        with open(os.path.join(self.output_dir, "completions.jsonl"), "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        columns = ["problem_id", "alpha", "autonomous_reward", "autonomous_sample",
                   "guided_reward", "guided_sample", "kd_target", "kd_target_why"]
        if self.kind == "tensorboard":
            # a markdown table: TensorBoard's text tab renders it
            table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for s in samples:
                cells = [str(s[c]).replace("|", "\\|").replace("\n", " ") for c in columns]
                table.append("| " + " | ".join(cells) + " |")
            self.tracker.add_text("completions", "\n".join(table), step)
        elif self.kind == "wandb":
            import wandb
            rows = [[s[c] for c in columns] for s in samples]
            self.tracker.log({"completions": wandb.Table(columns=columns, data=rows),
                              "step": step})

    def close(self, steps: int):
        """Ends the tracker's run; the last line of a run: where its outputs are."""
        if self.tracker is not None:
            self.tracker.close() if self.kind == "tensorboard" else self.tracker.finish()
        if self.master:
            print(f"done: {steps} RL steps; checkpoints and metrics.jsonl in {self.output_dir}")
