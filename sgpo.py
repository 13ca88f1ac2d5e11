"""
SGPO: Strategy-Guided Policy Optimization (arXiv:2606.24064), a single-file reference.

The policy samples G1 autonomous rollouts per problem (prompt: the problem) and G2 strategy-guided
ones (prompt: a strategy + the problem), and is trained with
    L = L_GRPO(autonomous rollouts) + mean_q alpha(q) * L_KD(q),
L_KD a per-token full-vocabulary forward KL from the model *with* the strategy in its prompt
(teacher, no gradient) to the model *without* it (student), on the correct guided rollout the
unguided policy finds most likely. docs/method.md is the method; README.md the rest.

    python sgpo.py                  # the CPU testbed of toy/ (~2 min on 2 cores, no download)
    python sgpo.py @paper.args --fsdp false --model Qwen/Qwen2.5-1.5B-Instruct --data train.jsonl
    torchrun --standalone --nproc_per_node=8 sgpo.py @paper.args --model ... --data ...
    ... --resume                    # continue a run from its latest checkpoint

Design choices:
1. One model plays every part: sampler, teacher (the same weights with the strategy in the prompt,
   no gradient) and student; `Policy` bundles its views (--teacher base/ema: weights of its own).
2. The loss needs full-vocabulary log-probs at every response position but never holds [B, T, V]
   logits: the LM head runs chunk by chunk with a hand-written gradient (chunked_head.py).
3. Every token's weight in the loss is global (over micro-batches and ranks of its mini-batch)
   and set in one place (split_by_problem): the gradient does not depend on micro-batching or on
   the number of GPUs. The lockstep that keeps ranks' forwards matched lives in runtime.lockstep.
4. pi_old is the trainer's own log-prob of each sampled token, taken in one no-grad pass before
   the batch's first optimizer step (take_pi_old); the sampler's are only checked against it.
   --steps_per_generation k: k optimizer steps per batch (veRL's mini-batches).
5. fp32 master weights, forwards in --dtype under autocast: a bf16 weight would not move under an
   lr-1e-6 AdamW step.
6. Where it costs fewer multiply-adds, a prompt's rows share one sequence in the loss's forwards,
   the prompt computed once (engine.collate_shared; --share_prompts).

Reading order: Config; the pure loss functions; `micro_batch_loss` and its terms; one RL step's
pieces ([n]: docs/method.md's step n) and `rl_step`; `train`. Plumbing: engine.py (model,
generation), runtime.py (ranks, checkpoints), metrics.py, inputs.py (flags, data), reward.py,
chunked_head.py.
"""
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from chunked_head import ChunkedHead, head_weight
from engine import (AUTO_TEMPLATE, GUIDED_TEMPLATE, Policy, load_policy, move_teacher,
                    prompt_ids, repeat_each, sample, sample_in_one_call, turn_end_ids)
from inputs import (UsageError, check_train_config, config_from_args, learning_rate_warning,
                    load_train_data)
from reward import Grader
from metrics import (RunLog, completion_samples, held_out_accuracy, rollout_metrics,
                     step_metrics)
from runtime import (Stats, all_gather_objects, all_reduce, autocast, backward, check_output_dir,
                     full_weights, get_rank, interrupted_advice, lockstep, make_optimizer,
                     optimizer_step, rank_batches, resolve_resume, restore_checkpoint,
                     save_checkpoint, seed_sampling, setup_distributed, world_size)


@dataclass
class Config:
    """Defaults run the CPU testbed of toy/ (`python sgpo.py`, a few minutes); the paper's setting
    for real models is in paper.args (`sgpo.py @paper.args --model ... --data ...`), where (R) marks
    values the paper does not publish."""
    # ---- model, data, run ----
    model: str = "toy/cups_data/model"
    """HF model directory or hub id (the policy; also the initial weights of the reference)."""
    data: str = "toy/cups_data/train.jsonl"
    """Training JSONL: problem, answer, strategy (str), optional id and solution."""
    eval_data: str = "toy/cups_data/test.jsonl"
    """Held-out JSONL (problem, answer, optional strategy): greedy accuracy, unguided and guided,
    before RL, every eval_steps and at the end ('' = none)."""
    eval_steps: int = 10
    """Evaluate every N RL steps (0 = only before and after)."""
    output_dir: str = "out/sgpo"
    """Where checkpoints and metrics.jsonl go."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds a run (its files replaced)."""
    resume: str = ""
    """Checkpoint directory to resume from; `--resume` alone takes the latest one in output_dir."""
    seed: int = 0
    """Seed of data order and sampling (offset by rank for sampling)."""
    dtype: str = "auto"
    """Compute dtype (autocast): auto (bf16 on a GPU that has it, else fp32), bf16, fp32."""
    fsdp: bool = False
    """Shard weights, gradients and AdamW state over ranks (FSDP2), not replicate them (DDP)."""
    ddp_timeout: int = 1800
    """Seconds a collective waits for the slowest rank."""
    # ---- prompts ----
    system_prompt: str = ""
    """Optional system message for both prompts."""
    prompt_template: str = AUTO_TEMPLATE
    """Autonomous (unguided) user message; {problem} is replaced."""
    guided_prompt_template: str = GUIDED_TEMPLATE
    """Strategy-guided user message; {problem} and {strategy} are replaced."""
    # ---- rollouts ----
    batch_size: int = 16
    """Problems per rank per step (global batch = batch_size x world size)."""
    num_generations: int = 8
    """G1: autonomous rollouts per problem (the GRPO group)."""
    num_guided_generations: int = 4
    """G2: strategy-guided rollouts per problem (KD target candidates)."""
    max_completion_length: int = 48
    """Maximum new tokens per rollout; a rollout that hits it is truncated."""
    generation_batch_size: int = 0
    """Sequences per generate call: bounds the KV cache; 0 = all in one."""
    generate_by_mode: str = "auto"
    """true: a generate call per mode; false: both modes in one call; auto: whichever reads less
    (engine.sample_in_one_call)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides logits by it too (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    mask_truncated_completions: bool = False
    """Truncated autonomous rollouts out of the loss (their rewards still in the group)."""
    reward_timeout: int = 5
    """Seconds math-verify may spend parsing, and again verifying, one answer."""
    reward_workers: int = -1
    """Processes grading rollouts; -1: this rank's share of the cores (<= 8); 0: inline."""
    # ---- optimisation ----
    max_steps: int = 80
    """RL steps (one rollout batch each)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the RL phase."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warmup (optimizer steps), constant after."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    micro_batch_size: int = 32
    """Sequences per forward/backward (gradient accumulation inside a step)."""
    num_iterations: int = 1
    """Epochs over each rollout batch (GRPO's mu): mu x steps_per_generation optimizer steps per
    batch."""
    steps_per_generation: int = 1
    """k optimizer steps per rollout batch, each on 1/k of its problems (k > 1: the clip and the
    trust region act)."""
    share_prompts: str = "auto"
    """true: a prompt's rows in one sequence in the loss's forwards; false: a row each; auto:
    whichever costs fewer multiply-adds."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward."""
    chunked_head: bool = True
    """The loss's LM head in chunks (chunked_head.py); false: on full [tokens, V] logits."""
    kd_chunk_size: int = 256
    """Positions per chunk of the loss's LM head: memory O(chunk x vocab)."""
    # ---- GRPO (docs/method.md step 2) ----
    use_grpo: bool = True
    """Autonomous GRPO term; false = the 'w/o autonomous GRPO' ablation."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 - epsilon."""
    epsilon_high: float = 0.28
    """Upper clip of the ratio: 1 + epsilon_high (clip-higher)."""
    beta: float = 0.0
    """k3 KL to a frozen reference model; 0 loads no reference."""
    # ---- strategy distillation (steps 3-6) ----
    use_kd: bool = True
    """Strategy distillation term; false = the 'w/o strategy distillation' ablation (GRPO only)."""
    kd_loss: str = "fkl"
    """fkl (paper), rkl (reverse-KL ablation), sft (NLL of the selected target: 'direct SFT'
    ablation)."""
    kl_clip: float = math.inf
    """delta: tokens with D_t > delta give no gradient; inf = none (paper: 1.0, which blocks the
    toy's transfer)."""
    teacher: str = "live"
    """Whose weights teach: live (the policy, the paper's), base (the policy as RL starts) or ema
    (a moving average of the policy, TRL SDPO's default)."""
    teacher_ema_rate: float = 0.05
    """--teacher ema: theta_T += rate (theta - theta_T) after every optimizer step."""
    teacher_samples_guided: bool = False
    """--teacher base/ema: the G2 guided rollouts sampled by the teacher, not the policy."""
    target_selection: bool = True
    """Pick the correct guided rollout most likely under the unguided prompt; false = a random
    correct one."""
    target_score: str = "mean"
    """(R) What 'most likely' scores: mean (the mean token log-prob, length-normalised) or sum
    (log pi(o|q), the sequence's log-likelihood)."""
    kd_trust_region: bool = True
    """(R) No KD gradient on tokens whose unguided ratio left [1-epsilon, 1+epsilon_high]."""
    adaptive_alpha: bool = True
    """(R) Per-problem alpha updated from the pass gap; false = fixed alpha_0."""
    alpha_update: str = "before"
    """(R) When a visit's pass gap moves alpha(q): before the step's KD weight reads it, or
    after."""
    alpha_0: float = 0.5
    """Initial (or fixed) alpha."""
    alpha_gamma: float = 0.1
    """Alpha step per visit."""
    alpha_max: float = 0.8
    """Alpha ceiling."""
    # ---- SFT warm-up ----
    sft_epochs: int = 0
    """Epochs of NLL on the `solution` field before RL (with max_steps 0: the SFT baseline)."""
    sft_data: str = ""
    """JSONL for the warm-up (default: --data); every row needs a solution."""
    sft_learning_rate: float = 1e-5
    """AdamW learning rate of the warm-up."""
    # ---- checkpoints and live metrics ----
    report_to: str = "none"
    """Live metrics beside metrics.jsonl (rank 0): none, tensorboard (<output_dir>/runs), wandb or
    trackio."""
    log_completions: int = 0
    """Every step, N of rank 0's problems as written (samples, rewards, KD target, alpha) in
    <output_dir>/completions.jsonl and --report_to's table; 0 = off."""
    save_steps: int = 50
    """Checkpoint every N RL steps (and always at the end)."""
    save_total_limit: int = 0
    """Keep the newest N checkpoints (and the one resumed from); 0 = all."""


def parse_args(argv=None) -> Config:
    """Every Config field is a flag, its docstring the help (inputs.py); one line on a bad value."""
    cfg = config_from_args(Config, argv, "SGPO training")
    check_train_config(cfg)
    return cfg


# ==== Pure loss functions (no model; unit-tested against hand-computed values).
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[N, G] rewards -> [N, G] group-normalised advantages (r - mean) / (std + eps)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def grpo_token_loss(logp, old_logp, advantages, epsilon=0.2, epsilon_high=0.28):
    """Clipped surrogate per token: -min(rho A, clip(rho, 1-eps, 1+eps_high) A).
    All [M]; returns (loss, clipped)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = (((ratio < 1 - epsilon) & (advantages < 0))
               | ((ratio > 1 + epsilon_high) & (advantages > 0)))
    return loss, clipped


def per_token_kl(student_logits, teacher_logits, kind: str = "fkl"):
    """[..., T, V] x2 -> [..., T] fp32 divergence per position.

    fkl: KL(teacher || student) = sum_v p_t (log p_t - log p_s), teacher detached (D_t);
    rkl: KL(student || teacher) = sum_v p_s (log p_s - log p_t).
    """
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    if kind == "fkl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "rkl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    raise ValueError(f"kind must be fkl or rkl, got {kind!r}")


def kd_token_loss(div, logp, old_logp, kind="fkl", kl_clip=1.0, trust_region=True, epsilon=0.2,
                  epsilon_high=0.28):
    """Per-token distillation loss with the proximal constraints; all [M], returns (loss,
    kl_clipped, ratio_out). fkl/rkl: min(D_t, kl_clip) (5b); sft: -log p(y_t). Trust region (5c,
    R): no gradient where the unguided ratio p/p_old left [1-eps, 1+eps_high]."""
    if kind == "sft":
        loss, kl_clipped = -logp, torch.zeros_like(div, dtype=torch.bool)
    else:
        loss, kl_clipped = div.clamp(max=kl_clip), div.detach() > kl_clip
    ratio = torch.exp(logp.detach() - old_logp)
    ratio_out = (ratio < 1 - epsilon) | (ratio > 1 + epsilon_high)
    if trust_region:
        loss = torch.where(ratio_out, loss.detach(), loss)
    return loss, kl_clipped, ratio_out


def select_target(correct: torch.Tensor, score: torch.Tensor, by_likelihood: bool = True,
                  generator=None) -> int:
    """[G2] correctness and [G2] score under the unguided prompt (target_scores) -> index of the
    KD target, -1 if none. by_likelihood=False ('w/o target selection', R): a random correct
    one."""
    idx = torch.nonzero(correct > 0).flatten()
    if idx.numel() == 0:
        return -1
    if not by_likelihood:
        return int(idx[torch.randint(idx.numel(), (1,), generator=generator)])
    return int(idx[score[idx].argmax()])


def update_alpha(alpha, p_guided, p_auto, gamma=0.1, alpha_max=0.8):
    """(R) Pass gap g = p_guided - p_auto; g > 0 -> alpha + gamma (capped at alpha_max), else
    alpha - gamma (floor 0)."""
    gap = p_guided - p_auto
    if isinstance(gap, torch.Tensor):
        up, down = (alpha + gamma).clamp(max=alpha_max), (alpha - gamma).clamp(min=0.0)
        return torch.where(gap > 0, up, down)
    return min(alpha_max, alpha + gamma) if gap > 0 else max(0.0, alpha - gamma)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(r - l) - (r - l) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def head_outputs(head, hidden, targets, cfg: Config, teacher=None):
    """[M, H] student hidden states predicting [M] tokens -> [M] log p(y), [M] D_t, [M] entropy (no
    gradient), at temperature T, fp32. teacher: None (D_t zeros), or its [M, H] hidden states and
    head (D_t: kd_loss). On [M, V] logits, or the same in chunks."""
    t_hidden, t_head = teacher or (None, head)
    kind = cfg.kd_loss if t_hidden is not None and cfg.kd_loss != "sft" else "logp"
    if cfg.chunked_head:
        # t_weight None: the teacher's head is the student's (the live teacher)
        t_weight = None if t_head is head else head_weight(t_head)
        t_args = None if teacher is None else (t_hidden, t_weight)
        return ChunkedHead.apply(hidden, head_weight(head), t_args, targets, cfg.temperature,
                                 kind, cfg.kd_chunk_size)
    logits = head(hidden).float() / cfg.temperature  # [M, V]
    log_p = logits.log_softmax(-1)  # [M, V]
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1).detach()
    div = torch.zeros_like(logp)
    if kind != "logp":
        t_logits = t_head(t_hidden).float() / cfg.temperature  # [M, V]
        div = per_token_kl(logits, t_logits, kind)
    return logp, div, entropy


# ==== Training rows: what the update needs, stored when the rollout is made.
@dataclass
class Row:
    """One sequence to train on (the SFT warm-up's rows are plain Rows: NLL of the response)."""
    prompt: list
    response: list
    weight: float
    """Each response token's weight in its mini-batch's loss, over all ranks (split_by_problem
    sets it for GRPO and KD rows: 1 / GRPO tokens, alpha(q) / (|target| x problems))."""
    old_logps: torch.Tensor = None
    """[len(response)] log pi_old, the sampling policy's (take_pi_old, before the update's first
    optimizer step)."""


@dataclass
class GRPORow(Row):
    """An autonomous rollout."""
    advantage: float = 0.0
    sampler_logps: torch.Tensor = None
    """[len(response)] the sampler's log-probs (checked against pi_old)."""


@dataclass
class KDRow(Row):
    """A KD target: the selected guided rollout, under the autonomous prompt (student)."""
    teacher_prompt: list = field(default_factory=list)
    """The guided prompt: the teacher's context for the same response tokens."""
    alpha: float = 0.0
    """alpha(q) of its problem, as the step reads it: a factor of its weight."""


def check_sampler(rows, stats):
    """rollout_probs_diff_max: max |sampler log-prob - pi_old| over the GRPO rows' tokens (the
    same distribution twice)."""
    rows = [r for r in rows if isinstance(r, GRPORow)]
    if rows:
        old = torch.cat([r.old_logps for r in rows])
        sampler = torch.cat([r.sampler_logps for r in rows]).to(old.device)
        stats.max("rollout_probs_diff_max", (sampler - old).abs().max())


def per_token(rows, values):
    """One value per row -> [M] tensor, the row's value at each of its response tokens."""
    out = []
    for r, v in zip(rows, values):
        out += [v] * len(r.response)
    return torch.tensor(out)


# ==== The objective on one micro-batch: warm-up NLL, GRPO and KD, one function each.
def micro_batch_loss(policy: Policy, rows, cfg: Config, stats, teacher):
    """Loss of one micro-batch: ONE student forward for all its rows, the teacher's (a Policy or
    None) on its KD rows, each row kind's term; summed over micro-batches and ranks: the
    mini-batch's L (the weights are global)."""
    sft, grpo, kd = ([r for r in rows if type(r) is kind] for kind in (Row, GRPORow, KDRow))
    # the rows by kind: each term reads its kind's slice of the M positions
    pairs = [(r.prompt, r.response) for r in sft + grpo + kd]
    hidden, targets = policy.response_hidden(pairs)  # [M, H], [M]
    sizes = [sum(len(r.response) for r in kind) for kind in (sft, grpo, kd)]
    h_sft, h_grpo, h_kd = hidden.split(sizes)
    y_sft, y_grpo, y_kd = targets.split(sizes)
    t_view = None
    if teacher is not None:
        # on guided prompt + target, no gradient
        with torch.no_grad():
            t_pairs = [(r.teacher_prompt, r.response) for r in kd]
            t_hidden, _ = teacher.response_hidden(t_pairs, sync_grads=False)
        t_view = (t_hidden, teacher.head)
    loss = hidden.new_zeros((), dtype=torch.float32)
    if sft:
        loss = loss + sft_term(policy, sft, (h_sft, y_sft), cfg, stats)
    if grpo:
        loss = loss + grpo_term(policy, grpo, (h_grpo, y_grpo), cfg, stats)
    if kd:
        loss = loss + kd_term(policy, kd, ((h_kd, y_kd), t_view), cfg, stats)
    return loss


def sft_term(policy, rows, student, cfg: Config, stats):
    """The warm-up: sum_t w_t * -log p(y_t) on the solutions. student: [M, H] hidden states, [M]
    tokens."""
    logp, _, _ = head_outputs(policy.head, *student, cfg)
    weight = per_token(rows, [r.weight for r in rows]).to(policy.device)
    stats.add("loss/sft", (-logp.detach() * weight).sum(), 0)
    return (-logp * weight).sum()


def grpo_term(policy, rows, student, cfg: Config, stats):
    """[2] Autonomous GRPO: sum_t w_t * -min(rho_t A, clip(rho_t, 1-eps, 1+eps_high) A)
    (+ beta * k3 KL to policy.reference), w_t = 1 / (GRPO tokens of the mini-batch). student: [M, H]
    hidden states, [M] tokens."""
    logp, _, entropy = head_outputs(policy.head, *student, cfg)
    old_logp = torch.cat([r.old_logps for r in rows])
    advantage = per_token(rows, [r.advantage for r in rows]).to(policy.device)
    weight = per_token(rows, [r.weight for r in rows]).to(policy.device)
    tok_loss, clipped = grpo_token_loss(logp, old_logp, advantage, cfg.epsilon, cfg.epsilon_high)
    ref = policy.reference
    if ref is not None:
        with torch.no_grad():
            ref_hidden, _ = ref.response_hidden([(r.prompt, r.response) for r in rows])
            ref_logp, _, _ = head_outputs(ref.head, ref_hidden, student[1], cfg)
        kl = k3_kl(logp, ref_logp)
        tok_loss = tok_loss + cfg.beta * kl
        stats.add("kl", kl.detach(), kl.numel())
    stats.add("loss/grpo", (tok_loss.detach() * weight).sum(), 0)
    stats.add("clip_ratio", clipped.float(), clipped.numel())
    stats.add("entropy", entropy, entropy.numel())
    return (tok_loss * weight).sum()


def kd_term(policy, rows, views, cfg: Config, stats):
    """[4-5] Strategy distillation: sum_t w_t * min(D_t, delta), D_t the divergence from the
    guided teacher to the unguided student, no gradient where the unguided ratio left the trust
    region. views: the student's ([M, H] hidden states, [M] tokens), the teacher's
    (head_outputs)."""
    (hidden, targets), teacher = views
    logp, div, _ = head_outputs(policy.head, hidden, targets, cfg, teacher)
    old_logp = torch.cat([r.old_logps for r in rows])
    weight = per_token(rows, [r.weight for r in rows]).to(policy.device)
    tok_loss, kl_clipped, ratio_out = kd_token_loss(
        div, logp, old_logp, cfg.kd_loss, cfg.kl_clip, cfg.kd_trust_region, cfg.epsilon,
        cfg.epsilon_high)
    stats.add("loss/kd", (tok_loss.detach() * weight).sum(), 0)
    stats.add("kd/kl_mean", div.detach(), div.numel())
    stats.add("kd/kl_clip_frac", kl_clipped.float(), kl_clipped.numel())
    stats.add("kd/ratio_out_frac", ratio_out.float(), ratio_out.numel())
    return (tok_loss * weight).sum()


def accumulate_gradients(policy, rows, cfg: Config, stats):
    """Forward/backward over micro-batches of rows, sorted by length (less padding; the weights
    are global), in lockstep with the other ranks. Returns the number of micro-batches."""
    rows = sorted(rows, key=lambda r: len(r.prompt) + len(r.response))
    size = cfg.micro_batch_size
    micro_batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    # what a rank out of micro-batches runs until every rank is done: one pad token of weight 0
    # (a zero gradient through every parameter; its statistics dropped)
    pad = policy.tokenizer.pad_token_id
    filler = [Row([pad], [pad], weight=0.0)]
    passes = lockstep(micro_batches, filler, policy.wrapped, policy.device)
    # the teacher on every micro-batch where some rank's rows need it (FSDP: every forward is a
    # collective); on none in the warm-up, under --kd_loss sft or with no KD row on any rank
    mine = any(type(r) is KDRow for r in rows) and cfg.kd_loss != "sft"
    anywhere = all_reduce(torch.tensor(float(mine), device=policy.device)) > 0
    teacher = policy.teacher_view() if anywhere else None
    n = 0
    for n, (batch, own) in enumerate(passes, 1):
        with autocast(cfg.dtype, policy.device):
            loss = micro_batch_loss(policy, batch, cfg, stats if own else Stats(), teacher)
        # (loss x world size).backward(): DDP and FSDP average over ranks, and the weights
        # already sum over all of them
        backward(loss)
    return n


# ==== One RL step: the pieces, in the order rl_step calls them ([n]: docs/method.md's step n).
@dataclass
class Batch:
    """One step's problems and what the rollout made of them, problem by problem."""
    problems: list
    auto_prompts: list
    """Token ids of each problem's autonomous (unguided) prompt."""
    guided_prompts: list
    """Token ids of each problem's strategy-guided prompt."""
    rollouts: list = None
    """[B][G1 + G2] engine.generate's dicts (ids, truncated, sampler_logps), autonomous first."""
    rewards: torch.Tensor = None  # [B, G1 + G2] binary


def sample_rollouts(policy, auto_prompts, guided_prompts, cfg: Config):
    """[1] G1 autonomous and G2 guided responses per problem: generate calls per mode or both in
    one (--generate_by_mode); the guided ones by the teacher under --teacher_samples_guided."""
    auto = repeat_each(auto_prompts, cfg.num_generations)
    guided = repeat_each(guided_prompts, cfg.num_guided_generations)
    guide = guided_sampler(policy, cfg)
    if guide is policy and sample_in_one_call(policy, auto + guided, cfg):
        both = sample(policy, auto + guided, cfg)
        return both[:len(auto)], both[len(auto):]
    return sample(policy, auto, cfg), sample(policy, guided, cfg, guide.lm)


def guided_sampler(policy, cfg: Config):
    """Who samples the G2 guided rollouts (--teacher_samples_guided)."""
    return policy.teacher if policy.teacher and cfg.teacher_samples_guided else policy


def grade_rollouts(batch: Batch, tokenizer, grade) -> torch.Tensor:
    """[1] [B, G1 + G2] binary rewards: math-verify on each response's text (special tokens
    dropped) against its own problem's gold answer."""
    g = len(batch.rollouts[0])
    flat = list(itertools.chain.from_iterable(batch.rollouts))  # problem by problem
    texts = [tokenizer.decode(r["ids"], skip_special_tokens=True) for r in flat]
    answers = repeat_each([q["answer"] for q in batch.problems], g)
    return torch.tensor(grade(texts, answers)).view(len(batch.problems), g)


def make_grpo_rows(batch: Batch, cfg: Config) -> list:
    """[2] Per problem, its autonomous rollouts as GRPORows with group-normalised advantages
    (weights: split_by_problem)."""
    g1 = cfg.num_generations
    advantages = grpo_advantages(batch.rewards[:, :g1])  # [B, G1]
    rows = [[] for _ in batch.problems]
    for b, rollouts in enumerate(batch.rollouts):
        for i, r in enumerate(rollouts[:g1]):
            if cfg.use_grpo and not (cfg.mask_truncated_completions and r["truncated"]):
                rows[b].append(GRPORow(batch.auto_prompts[b], r["ids"], 0.0,
                                       advantage=float(advantages[b, i]),
                                       sampler_logps=r["sampler_logps"]))
    return rows


def pass_rates(batch: Batch, cfg: Config):
    """[B] p_guided and [B] p_auto: each problem's G2 and G1 success rates."""
    g1 = cfg.num_generations
    r_auto, r_guided = batch.rewards[:, :g1], batch.rewards[:, g1:]  # [B, G1], [B, G2]
    p_auto = r_auto.mean(1)
    return (r_guided.mean(1) if cfg.num_guided_generations else r_auto.mean(1)), p_auto


def update_alpha_table(alpha, problems, p_guided, p_auto, cfg: Config):
    """[6] (R) alpha(q) of every rank's problems, updated in place from their pass gaps (all ranks
    alike)."""
    mine = [(q["id"], float(pg), float(pa)) for q, pg, pa in zip(problems, p_guided, p_auto)]
    for updates in all_gather_objects(mine):
        for qid, pg, pa in updates:
            prev = alpha.get(qid, cfg.alpha_0)
            if cfg.adaptive_alpha:
                alpha[qid] = update_alpha(prev, pg, pa, cfg.alpha_gamma, cfg.alpha_max)
            else:
                alpha[qid] = cfg.alpha_0


@torch.no_grad()
def response_logps(policy, pairs, cfg: Config) -> list:
    """[len(response)] log-probs of each (prompt, response) pair's response tokens, no gradient,
    micro-batch by micro-batch."""
    out = []
    for i in range(0, len(pairs), cfg.micro_batch_size):
        chunk = pairs[i:i + cfg.micro_batch_size]
        hidden, targets = policy.response_hidden(chunk, sync_grads=False)
        logp, _, _ = head_outputs(policy.head, hidden, targets, cfg)
        out += logp.split([len(r) for _, r in chunk])
    return out


def target_scores(policy, pairs, cfg: Config) -> list:
    """[3] The score of each (prompt, response) pair that ranks KD target candidates: its mean
    token log-prob (R), or their sum (--target_score)."""
    logps = response_logps(policy, pairs, cfg)
    return [(x.mean() if cfg.target_score == "mean" else x.sum()).item() for x in logps]


def make_kd_rows(policy, batch: Batch, alpha, cfg: Config) -> list:
    """[3] Per problem, its KD target (or None): the correct guided rollout most likely under the
    UNGUIDED prompt, [4] as a KDRow holding alpha(q) (its weight: split_by_problem)."""
    g1, g2, n = cfg.num_generations, cfg.num_guided_generations, len(batch.problems)
    rows = [None] * n
    if not (cfg.use_kd and g2):
        return rows
    r_guided = batch.rewards[:, g1:]  # [B, G2]
    score = torch.full((n, g2), -math.inf)  # [B, G2], scored for correct rollouts only
    candidates = torch.nonzero(r_guided > 0).tolist()  # [(b, j)]
    if cfg.target_selection:
        # scored on every rank, candidates or not: FSDP's gathering is a collective
        pairs = [(batch.auto_prompts[b], batch.rollouts[b][g1 + j]["ids"]) for b, j in candidates]
        policy.backbone.eval()
        with full_weights(policy.wrapped), autocast(cfg.dtype, policy.device):
            scores = target_scores(policy, pairs, cfg)
        for (b, j), value in zip(candidates, scores):
            score[b, j] = value
    for b, q in enumerate(batch.problems):
        j = select_target(r_guided[b], score[b], cfg.target_selection)
        if j >= 0:
            # (--alpha_update after: a problem's first visit reads alpha_0)
            rows[b] = KDRow(batch.auto_prompts[b], batch.rollouts[b][g1 + j]["ids"], 0.0,
                            teacher_prompt=batch.guided_prompts[b],
                            alpha=alpha.get(q["id"], cfg.alpha_0))
    return rows


def split_by_problem(grpo_rows, kd_rows, k, device):
    """Per problem b: its GRPO rows grpo_rows[b] and KD row kd_rows[b] (or None) -> k mini-batches
    of whole problems (a seeded random split; in order for k = 1), and every token's weight in its
    mini-batch's loss, over all ranks: [2] GRPO 1 / (autonomous tokens), DAPO-style; [7] KD
    alpha(q) / (|target| x problems)."""
    n = len(grpo_rows)
    # a mini-batch's problems, over all ranks (--batch_size is a multiple of k)
    n_problems = n * world_size() // k
    order = torch.randperm(n).tolist() if k > 1 else list(range(n))
    minibatches = []
    for i in range(k):
        problems = order[i * n // k:(i + 1) * n // k]
        grpo, kd = [], [kd_rows[b] for b in problems if kd_rows[b] is not None]
        for b in problems:
            grpo += grpo_rows[b]
        local = float(sum(len(r.response) for r in grpo))
        n_tokens = all_reduce(torch.tensor(local, device=device))
        for r in grpo:
            r.weight = 1.0 / max(float(n_tokens), 1.0)
        for r in kd:
            r.weight = r.alpha / (len(r.response) * n_problems)
        minibatches.append(grpo + kd)
    return minibatches


def take_pi_old(policy, rows, cfg: Config, stats):
    """[2, 5] pi_old, the policy that sampled the batch: every row's response log-probs in one
    no-grad pass before the first optimizer step, kept on the rows; the sampler's checked."""
    # (on every rank alike: FSDP's gathering is a collective)
    with full_weights(policy.wrapped), autocast(cfg.dtype, policy.device):
        logps = response_logps(policy, [(r.prompt, r.response) for r in rows], cfg)
    for r, logp in zip(rows, logps):
        r.old_logps = logp
    check_sampler(rows, stats)


def update_policy(policy, opt, minibatches, cfg: Config, stats):
    """[7] L minimised: an optimizer step per mini-batch (an extension: veRL's mini-batches),
    num_iterations epochs. Returns the statistics of the passes after the first optimizer step
    (ratios leave 1) and the last grad norm."""
    policy.wrapped.train()
    take_pi_old(policy, list(itertools.chain.from_iterable(minibatches)), cfg, stats)
    after_first, grad_norm = Stats(), 0.0
    for epoch in range(cfg.num_iterations):
        for i, rows in enumerate(minibatches):
            first = epoch == i == 0
            n_micro = accumulate_gradients(policy, rows, cfg, stats if first else after_first)
            # a mini-batch without rows on every rank made no micro-batch: no step
            if n_micro > 0:
                grad_norm = optimizer_step(policy.lm, opt, cfg)
                if policy.teacher:
                    # an extension: the teacher EMA (--teacher ema; base: rate 0, unmoved)
                    move_teacher(policy, cfg.teacher_ema_rate if cfg.teacher == "ema" else 0.0)
    return after_first, grad_norm


def rl_step(problems, policy: Policy, opt, alpha, cfg: Config, grade):
    """One RL step: docs/method.md's steps [1]-[7] on a batch of problems (docs/design.md, "How
    one step runs"). alpha: the per-problem table, updated in place. Returns the step's metrics
    (over all ranks) and --log_completions' samples (rank 0's)."""
    stats, times, dev = Stats(), {"start": time.time()}, policy.device
    g1, g2, tok = cfg.num_generations, cfg.num_guided_generations, policy.tokenizer
    batch = Batch(problems, [prompt_ids(tok, cfg, q, guided=False) for q in problems],
                  [prompt_ids(tok, cfg, q, guided=True) for q in problems])
    # [1] G1 autonomous and G2 strategy-guided rollouts per problem, and their binary rewards
    # (FSDP: the samplers' weights gathered once for all generate calls)
    samplers = dict.fromkeys([policy.wrapped, guided_sampler(policy, cfg).wrapped])
    with full_weights(*samplers), autocast(cfg.dtype, dev):
        auto, guided = sample_rollouts(policy, batch.auto_prompts, batch.guided_prompts, cfg)
    batch.rollouts = [auto[b * g1:(b + 1) * g1] + guided[b * g2:(b + 1) * g2]
                      for b in range(len(problems))]
    times["generate"] = time.time()
    batch.rewards = grade_rollouts(batch, tok, grade)
    # [2] autonomous GRPO rows
    grpo_rows = make_grpo_rows(batch, cfg)
    times["grade"] = time.time()
    # [6] alpha(q) from the pass gap, before (R) or after the KD weights read it (--alpha_update);
    # [3] target selection, [4] the KD rows
    p_guided, p_auto = pass_rates(batch, cfg)
    if cfg.alpha_update == "before":
        update_alpha_table(alpha, problems, p_guided, p_auto, cfg)
    kd_rows = make_kd_rows(policy, batch, alpha, cfg)
    if cfg.alpha_update == "after":
        update_alpha_table(alpha, problems, p_guided, p_auto, cfg)
    times["select"] = time.time()
    # k mini-batches of whole problems, every token's weight set; [5, 7] one optimizer step each
    minibatches = split_by_problem(grpo_rows, kd_rows, cfg.steps_per_generation, dev)
    after_first, grad_norm = update_policy(policy, opt, minibatches, cfg, stats)
    times["update"] = time.time()
    rollout_metrics(stats, batch, alpha, minibatches, cfg, p_guided - p_auto)
    metrics = step_metrics((stats, after_first), times, grad_norm, opt, cfg, dev)
    return metrics, completion_samples(batch, kd_rows, alpha, tok, cfg)


def sft_warmup(problems, policy, cfg: Config, log):
    """Warm-up: NLL of the reference `solution` + the chat template's end of turn
    (engine.turn_end_ids) under the autonomous prompt."""
    tok = policy.tokenizer
    opt = make_optimizer(policy.lm, cfg.sft_learning_rate, cfg)
    turn_end = turn_end_ids(tok)
    if turn_end == [None]:
        # the model's first eos id (HF allows an id or a list of ids)
        eos = policy.lm.generation_config.eos_token_id
        turn_end = (eos if isinstance(eos, list) else [eos])[:1]
    examples = []
    for q in problems:
        solution = tok(q["solution"], add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids(tok, cfg, q, guided=False), solution + turn_end))
    per_epoch = len(rank_batches(len(examples), cfg.batch_size, cfg.seed, 0))
    bar = tqdm(total=cfg.sft_epochs * per_epoch, disable=get_rank() != 0, desc="warm-up")
    step = 0
    with bar:  # (closed on Ctrl-C)
        for epoch in range(cfg.sft_epochs):
            for batch in rank_batches(len(examples), cfg.batch_size, cfg.seed, epoch):
                stats = Stats()
                local = sum(len(examples[i][1]) for i in batch)
                n_tokens = all_reduce(torch.tensor(float(local), device=policy.device))
                rows = [Row(*examples[i], weight=1.0 / float(n_tokens)) for i in batch]
                policy.wrapped.train()
                accumulate_gradients(policy, rows, cfg, stats)
                grad_norm = optimizer_step(policy.lm, opt, cfg)
                step += 1
                record = {"phase": "sft", "sft_step": step, "epoch": epoch,
                          **stats.reduce(policy.device), "grad_norm": grad_norm}
                log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss/sft']:.3f}")


def setup(argv):
    """Checks flags, data, output folder, the checkpoint to resume, the process group, the model,
    in this order (UsageError: one line, exit 2). Returns cfg, the data, resume, the policy."""
    cfg = parse_args(argv)
    problems, sft_problems, eval_problems, check_data = load_train_data(
        cfg, lambda tokenizer, q, guided: len(prompt_ids(tokenizer, cfg, q, guided)),
        lambda tokenizer: len(turn_end_ids(tokenizer)))
    # (folder, its trainer state): --resume alone skips a damaged newest checkpoint
    resume = resolve_resume(cfg) if cfg.resume else None
    check_output_dir(cfg.output_dir, resume, cfg.overwrite_output_dir)
    if cfg.fsdp and "RANK" not in os.environ:
        raise UsageError("--fsdp: needs a process group; launch with torchrun "
                         "(--nproc_per_node=1 for one GPU)")
    ddp, _, _, device = setup_distributed(cfg.ddp_timeout)
    # check_data: every row tokenizes and fits the context, before the weights load
    policy = load_policy(cfg, resume[0] if resume else None, ddp, device, check_data)
    return cfg, (problems, sft_problems, eval_problems), resume, policy


def train(cfg: Config, data, resume, policy):
    """The SFT warm-up (if any), then max_steps RL steps, with held-out evaluations, metrics.jsonl
    and checkpoints (rank 0)."""
    problems, sft_problems, eval_problems = data
    rank = get_rank()
    log = RunLog(cfg, resume[1]["step"] if resume else None, master=rank == 0)
    opt = make_optimizer(policy.lm, cfg.learning_rate, cfg)
    state = dict(step=0, epoch=0, position=0, alpha={}, sft_done=not cfg.sft_epochs,
                 eval_start={})
    if resume:
        # optimizer, scheduler, every rank's RNG, the loop's state
        state = restore_checkpoint(*resume, policy.wrapped, opt, state, cfg.seed)
    else:
        # different samples on each rank
        seed_sampling(cfg.seed, rank, step=0)
    grade = Grader(cfg.reward_workers, cfg.reward_timeout)
    warming_up = not state["sft_done"]
    if warming_up:
        sft_warmup(sft_problems, policy, cfg, log)
        state["sft_done"] = True
    # --teacher base/ema: the policy as RL starts (after the warm-up, if any)
    if policy.teacher and state["step"] == 0:
        move_teacher(policy, 1.0)
    # before RL (after the warm-up, if any)
    if eval_problems and state["step"] == 0 and not state["eval_start"]:
        log({"step": 0, **held_out_accuracy(policy, eval_problems, cfg, state, grade)})
    # checkpoint-0: the warm model, and its evaluation (not repeated on a resume from it)
    if warming_up:
        save_checkpoint(cfg, policy, opt, state, keep=resume and resume[0])
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=rank != 0, desc="sgpo")
    with bar:  # (closed on Ctrl-C)
        batches = rank_batches(len(problems), cfg.batch_size, cfg.seed, state["epoch"])
        while state["step"] < cfg.max_steps:
            if state["position"] >= len(batches):
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                batches = rank_batches(len(problems), cfg.batch_size, cfg.seed, state["epoch"])
            batch = [problems[i] for i in batches[state["position"]]]
            metrics, samples = rl_step(batch, policy, opt, state["alpha"], cfg, grade)
            state["position"] += 1
            state["step"] = step = state["step"] + 1
            if eval_problems and ((cfg.eval_steps and step % cfg.eval_steps == 0)
                                  or step == cfg.max_steps):
                metrics.update(held_out_accuracy(policy, eval_problems, cfg, state, grade))
            log({"step": step, "epoch": state["epoch"], **metrics})
            log.completions(step, samples)
            bar.update(1)
            bar.set_postfix(r_auto=f"{metrics['reward/autonomous_mean']:.2f}",
                            r_guided=f"{metrics['reward/guided_mean']:.2f}",
                            kd=f"{metrics['kd/target_frac']:.2f}")
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                # (--save_total_limit never removes the checkpoint this run resumed from)
                save_checkpoint(cfg, policy, opt, state, keep=resume and resume[0])
    grade.close()
    log.close(state["step"])


def main(argv=None) -> int:
    try:
        cfg, data, resume, policy = setup(argv)
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    # a run that starts: bad input stays one line
    warning = learning_rate_warning(cfg, Config())
    if warning and get_rank() == 0:
        print(warning, file=sys.stderr)
    train(cfg, data, resume, policy)
    if dist.is_initialized():
        # the model and DDP hold the process group: freed first (no gloo thread stays)
        del policy
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C: one line on what is on disk (a checkpoint being written was removed)
        print(f"\ninterrupted: {interrupted_advice(parse_args().output_dir)}", file=sys.stderr)
        sys.exit(130)
