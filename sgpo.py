"""
SGPO: Strategy-Guided Policy Optimization (arXiv:2606.24064), a single-file reference implementation.

The policy samples G1 autonomous rollouts per problem (prompt: the problem) and G2 strategy-guided
rollouts (prompt: the problem + a strategy text). It is trained with
    L = L_GRPO(autonomous rollouts) + mean_q alpha(q) * L_KD(q)
where L_KD is a per-token full-vocabulary forward KL from the model *with* the strategy in its prompt
(teacher, stop-gradient) to the model *without* it (student), on the guided rollout that the unguided
policy finds most likely among the correct ones. See ../shared/SGPO_METHOD.md and README.md.

The defaults run the CPU testbed of toy/ (ball under cups, a 117k-parameter model; ~3 min on 2 cores), printing
greedy held-out accuracy, unguided and guided, before and after RL; paper.args holds the paper's setting:
    python sgpo.py                                   # the CPU testbed, no download
    python sgpo.py @paper.args --fsdp false --model Qwen/Qwen2.5-1.5B-Instruct --data train.jsonl   # one GPU
Eight GPUs on one node (paper.args shards with FSDP; --fsdp false: DDP, where 16 bytes/parameter fit a GPU):
    torchrun --standalone --nproc_per_node=8 sgpo.py @paper.args --model Qwen/Qwen2.5-7B-Instruct --data train.jsonl
Two nodes: torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 sgpo.py ...
Resume the latest checkpoint of a run: add --resume (or --resume out/sgpo/checkpoint-100).
"""
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from inputs import (UsageError, check_fits, check_writable_dir, config_from_args, has_usable_strategy,  # noqa: F401
                    latest_checkpoint, load_problems, require, resolve_resume)  # (some: sgpo.X in scripts)
from runtime import (Stats, all_gather_objects, all_reduce, full_weights, restore_checkpoint, save_checkpoint,
                     shard_fsdp)  # collectives, FSDP, checkpoints: the plumbing, apart from the method
from reward import Grader, default_workers  # math-verify, in a process pool; shared with evaluate.py

AUTO_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
# The guided prompt is the strategy followed by the autonomous prompt, word for word: the problem and the
# response then sit at the same relative positions in both contexts, so what the strategy changes is the
# strategy alone (and a teacher circuit keyed to relative positions transfers to the student's context).
GUIDED_TEMPLATE = "Use this strategy for the problem below:\n{strategy}\n\n" + AUTO_TEMPLATE


@dataclass
class Config:
    """Defaults run the CPU testbed of toy/ (`python sgpo.py`, a few minutes); the paper's setting for real models is
    in paper.args (`sgpo.py @paper.args --model ... --data ...`), where (R) marks values the paper does not publish."""
    # ---- model, data, run ----
    model: str = "toy/cups_data/model"
    """HF model directory or hub id (the policy; also the initial weights of the optional reference)."""
    data: str = "toy/cups_data/train.jsonl"
    """Training JSONL: problem, answer, strategy (str), optional id and solution."""
    eval_data: str = "toy/cups_data/test.jsonl"
    """Held-out JSONL (problem, answer, optional strategy): greedy accuracy, unguided and guided, before RL, every
    eval_steps and at the end ('' = none). Benchmarks with sampling and avg@k: evaluate.py."""
    eval_steps: int = 10
    """Evaluate on eval_data every N RL steps (0 = only before and after)."""
    output_dir: str = "out/sgpo"
    """Where checkpoints and metrics.jsonl go."""
    overwrite_output_dir: bool = False
    """Allow starting a fresh run in an output_dir that already holds one (its files are replaced)."""
    resume: str = ""
    """Checkpoint directory to resume from; `--resume` alone takes the latest one in output_dir."""
    seed: int = 0
    """Seed of data order and sampling (offset by rank for sampling)."""
    dtype: str = "auto"
    """Compute dtype (autocast): auto (bf16 on a GPU that supports it, else fp32), bf16, fp32. Parameters, gradients
    and AdamW state are fp32 always: a bf16 weight does not move under an lr-1e-6 update (README)."""
    fsdp: bool = False
    """Shard weights, gradients and AdamW state over ranks (FSDP2), not replicate them (DDP): 7B on 80 GB (README)."""
    ddp_timeout: int = 1800
    """Seconds a collective waits for the slowest rank (e.g. one still generating) before the run aborts."""
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
    """Sequences per generate call (rollouts, held-out evaluation): bounds the KV cache (README); 0 = all in one."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides logits by it too (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    mask_truncated_completions: bool = False
    """Exclude truncated autonomous rollouts from the loss (their reward still counts in the group)."""
    reward_timeout: int = 5
    """Seconds math-verify may spend parsing and again verifying one answer (SIGALRM; main thread)."""
    reward_workers: int = -1
    """Processes grading rollouts (math-verify) in parallel; -1: this rank's share of the cores, at most 8; 0: inline."""
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
    """Optimizer steps per rollout batch (GRPO's mu); > 1 makes the clipping and trust region bite."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (off while generating)."""
    # ---- GRPO (sheet step 2) ----
    use_grpo: bool = True
    """Autonomous GRPO term; false = the 'w/o autonomous GRPO' ablation."""
    epsilon: float = 0.2
    """Lower clip of the ratio: 1 - epsilon."""
    epsilon_high: float = 0.28
    """Upper clip of the ratio: 1 + epsilon_high (clip-higher)."""
    beta: float = 0.0
    """k3 KL to a frozen reference model; 0 loads no reference."""
    # ---- strategy distillation (sheet steps 3-6) ----
    use_kd: bool = True
    """Strategy distillation term; false = the 'w/o strategy distillation' ablation (GRPO only)."""
    kd_loss: str = "fkl"
    """fkl (paper), rkl (reverse-KL ablation), sft (NLL of the selected target: 'direct SFT' ablation)."""
    kl_clip: float = math.inf
    """delta: tokens with D_t > delta give no gradient (loss min(D_t, delta)); inf = no KL clipping (paper: 1.0;
    the toy's strategy effect sits on tokens with D_t >> 1, README)."""
    target_selection: bool = True
    """Pick the correct guided rollout most likely under the unguided prompt; false = a random correct one."""
    kd_trust_region: bool = True
    """(R) No KD gradient on tokens whose unguided ratio left [1-epsilon, 1+epsilon_high]."""
    adaptive_alpha: bool = True
    """(R) Per-problem alpha updated from the pass gap; false = fixed alpha_0."""
    alpha_0: float = 0.5
    """Initial (or fixed) alpha."""
    alpha_gamma: float = 0.1
    """Alpha step per visit."""
    alpha_max: float = 0.8
    """Alpha ceiling."""
    kd_chunk_size: int = 256
    """Positions per chunk of the LM head in the loss: memory O(chunk x vocab), flat in length."""
    # ---- SFT warm-up ----
    sft_epochs: int = 0
    """Epochs of NLL on the `solution` field before RL (paper: warm-up; with max_steps 0: the SFT baseline)."""
    sft_data: str = ""
    """JSONL for the warm-up (default: --data); every row needs a solution."""
    sft_learning_rate: float = 1e-5
    """AdamW learning rate of the warm-up."""
    # ---- checkpoints ----
    save_steps: int = 50
    """Checkpoint every N RL steps (and always at the end)."""


# ==== Command line and data (inputs.py: every Config field a flag; JSONL validated line by line, one-line errors).
def parse_args(argv=None) -> Config:
    cfg = config_from_args(Config, argv, "SGPO training")
    checks = [(cfg.kd_loss in ("fkl", "rkl", "sft"), "kd_loss", "must be fkl, rkl or sft"),
              (cfg.temperature > 0, "temperature", "must be > 0"),
              (cfg.dtype in ("auto", "bf16", "fp32"), "dtype", "must be auto, bf16 or fp32"),
              (cfg.kl_clip > 0, "kl_clip", "must be > 0 (inf disables clipping)"),
              (cfg.model != "", "model", "required"), (cfg.data != "", "data", "required")]
    checks += [(getattr(cfg, k) >= 1, k, "must be >= 1") for k in
               ("batch_size", "num_generations", "max_completion_length", "micro_batch_size", "num_iterations",
                "kd_chunk_size", "save_steps", "ddp_timeout")]
    checks += [(cfg.reward_workers >= -1, "reward_workers", "must be >= -1 (-1: one per core)")]
    checks += [(getattr(cfg, k) >= 0, k, "must be >= 0")
               for k in ("num_guided_generations", "max_steps", "sft_epochs", "eval_steps", "generation_batch_size")]
    checks += [("{problem}" in cfg.prompt_template, "prompt_template", "must contain {problem}"),
               ("{problem}" in cfg.guided_prompt_template and "{strategy}" in cfg.guided_prompt_template,
                "guided_prompt_template", "must contain {problem} and {strategy}")]
    require(checks)
    return cfg


def prompt_ids(tokenizer, cfg: Config, problem: dict, guided: bool) -> list:
    """Token ids of the chat-templated autonomous or guided prompt, ending with the assistant header."""
    template = cfg.guided_prompt_template if guided else cfg.prompt_template
    user = re.sub(r"\{(problem|strategy)\}", lambda m: problem[m.group(1)], template)  # one pass: texts may hold braces
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
    messages.append({"role": "user", "content": user})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


# ==== Pure loss functions (no model; unit-tested against hand-computed values).
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[N, G] rewards -> [N, G] group-normalised advantages (r - mean) / (std + eps)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def grpo_token_loss(logp, old_logp, advantages, epsilon=0.2, epsilon_high=0.28):
    """Clipped surrogate per token: -min(rho A, clip(rho, 1-eps, 1+eps_high) A). All [M]; returns (loss, clipped)."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, clipped


def per_token_kl(student_logits, teacher_logits, kind: str = "fkl"):
    """[..., T, V] x2 -> [..., T] fp32 divergence per position.

    fkl: KL(teacher || student) = sum_v p_t (log p_t - log p_s), teacher detached (the sheet's D_t);
    rkl: KL(student || teacher) = sum_v p_s (log p_s - log p_t).
    """
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.detach().float().log_softmax(-1)
    if kind == "fkl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "rkl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    raise ValueError(f"kind must be fkl or rkl, got {kind!r}")


def kd_token_loss(div, logp, old_logp, kind="fkl", kl_clip=1.0, trust_region=True, epsilon=0.2, epsilon_high=0.28):
    """Per-token distillation loss with the proximal constraints. All [M]; returns (loss, kl_clipped, ratio_out).

    fkl/rkl: min(D_t, kl_clip) (sheet 5b: tokens over the threshold give no gradient); sft: -log p(y_t).
    Trust region (sheet 5c, R): tokens whose unguided ratio p/p_old left [1-eps, 1+eps_high] give no gradient.
    """
    loss = -logp if kind == "sft" else div.clamp(max=kl_clip)
    kl_clipped = (div.detach() > kl_clip) if kind != "sft" else torch.zeros_like(div, dtype=torch.bool)
    ratio = torch.exp(logp.detach() - old_logp)
    ratio_out = (ratio < 1 - epsilon) | (ratio > 1 + epsilon_high)
    if trust_region:
        loss = torch.where(ratio_out, loss.detach(), loss)
    return loss, kl_clipped, ratio_out


def select_target(correct: torch.Tensor, mean_logp: torch.Tensor, by_likelihood: bool = True, generator=None) -> int:
    """[G2] correctness and [G2] mean token log-prob under the unguided prompt -> index of the KD target, -1 if none.

    by_likelihood=False (the 'w/o target selection' ablation, R): a uniformly random correct rollout.
    """
    idx = torch.nonzero(correct > 0).flatten()
    if idx.numel() == 0:
        return -1
    if not by_likelihood:
        return int(idx[torch.randint(idx.numel(), (1,), generator=generator)])
    return int(idx[mean_logp[idx].argmax()])


def update_alpha(alpha, p_guided, p_auto, gamma=0.1, alpha_max=0.8):
    """(R) Pass gap g = p_guided - p_auto; g > 0 -> alpha + gamma (capped at alpha_max), else alpha - gamma (floor 0)."""
    gap = p_guided - p_auto
    if isinstance(gap, torch.Tensor):
        return torch.where(gap > 0, (alpha + gamma).clamp(max=alpha_max), (alpha - gamma).clamp(min=0.0))
    return min(alpha_max, alpha + gamma) if gap > 0 else max(0.0, alpha - gamma)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(r - l) - (r - l) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ==== The LM head, chunk by chunk, with a hand-written gradient. The loss needs full-vocabulary log-probs at every
# response position: [M, V] fp32 is 0.6 MB a token at Qwen's V = 151,936. ChunkedHead applies the head to chunk_size
# positions at a time and saves only the [M, H] hidden states; backward recomputes a chunk's logits and writes the
# gradient with respect to them analytically (s = logits / T; a, b: the upstream gradients of D_t and log p_s(y)):
#     d log p_s(y) / ds = onehot(y) - p_s        d KL(p_t || p_s) / ds = p_s - p_t
#     d KL(p_s || p_t) / ds = p_s * (log p_s - log p_t - KL(p_s || p_t))
# so that no more than ~3 [chunk, V] fp32 tensors live at once, forward or backward (autograd through a checkpointed
# chunk held ~7: tests/bench_kd_memory.py). Matmuls run in the autocast dtype, softmaxes and sums in fp32.
def _chunk_log_softmax(hidden, weight, temperature):
    return (hidden @ weight.T).float().div_(temperature).log_softmax(-1)  # [c, V]


def _rowdot(x, y):  # [c, V] x2 -> [c]: sum_v x * y, without a [c, V] product
    return torch.einsum("cv,cv->c", x, y)


def _chunk_forward(h, t_h, y, w, temperature, kind):
    """One chunk: [c] log p_s(y), D_t, entropy. A function so that its [c, V] tensors die when it returns."""
    log_s = _chunk_log_softmax(h, w, temperature)
    logp, entropy = log_s.gather(-1, y[:, None]).squeeze(-1), -_rowdot(log_s.exp(), log_s)
    if kind not in ("fkl", "rkl"):
        return logp, torch.zeros_like(logp), entropy
    log_t = _chunk_log_softmax(t_h, w, temperature)
    log_p, log_q = (log_t, log_s) if kind == "fkl" else (log_s, log_t)
    p = log_p.exp()
    return logp, _rowdot(p, log_p) - _rowdot(p, log_q), entropy  # KL(p || q) = sum p log p - sum p log q


def _chunk_backward(h, t_h, y, w, temperature, kind, a, b, div, g_weight):
    """One chunk: adds d loss / d weight to g_weight, returns d loss / d h; a, b: [c, 1] upstream gradients."""
    log_s = _chunk_log_softmax(h, w, temperature)
    if kind == "fkl":  # (a - b) p_s - a p_t + b onehot(y)
        grad = log_s.exp_().mul_(a - b).sub_(_chunk_log_softmax(t_h, w, temperature).exp_().mul_(a))
    elif kind == "rkl":  # p_s (a (log p_s - log p_t - D) - b) + b onehot(y)
        x = _chunk_log_softmax(t_h, w, temperature).neg_().add_(log_s).sub_(div[:, None]).mul_(a).sub_(b)
        grad = log_s.exp_().mul_(x)
    else:  # log-prob only: b (onehot(y) - p_s)
        grad = log_s.exp_().mul_(-b)
    grad[torch.arange(len(y)), y] += b.squeeze(-1)
    grad = grad.div_(temperature).to(w.dtype)  # [c, V]: d loss / d logits
    g_weight += grad.T @ h
    return grad @ w


class ChunkedHead(torch.autograd.Function):
    """The LM head's per-token log-probs, divergences and entropies, chunk_size positions at a time (see above)."""

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, targets, temperature, kind, chunk_size):
        """[M, H] hidden, [V, H] head weight, [M, H] teacher hidden (None unless kind is fkl/rkl), [M] targets ->
        [M] log p_s(target), [M] divergence D_t (0 unless fkl/rkl), [M] entropy of p_s (no gradient)."""
        dev = hidden.device.type
        ctx.dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        ctx.args = temperature, kind, chunk_size
        w, t_hidden = weight.to(ctx.dtype), hidden if t_hidden is None else t_hidden
        with torch.autocast(dev, enabled=False):
            outs = [_chunk_forward(hidden[i:i + chunk_size].to(ctx.dtype), t_hidden[i:i + chunk_size].to(ctx.dtype),
                                   targets[i:i + chunk_size], w, temperature, kind) for i in range(0, len(targets), chunk_size)]
        logp, div, entropy = (torch.cat(o) for o in zip(*outs))
        ctx.save_for_backward(hidden, weight, t_hidden, targets, div)
        ctx.mark_non_differentiable(entropy)
        return logp, div, entropy

    @staticmethod
    def backward(ctx, g_logp, g_div, _):
        hidden, weight, t_hidden, targets, div = ctx.saved_tensors
        (temperature, kind, chunk_size), w = ctx.args, weight.to(ctx.dtype)
        g_weight = torch.zeros_like(weight)
        g_hidden = torch.cat([_chunk_backward(
            hidden[c].to(ctx.dtype), t_hidden[c].to(ctx.dtype), targets[c], w, temperature, kind,
            g_div[c, None].float(), g_logp[c, None].float(), div[c], g_weight)
            for c in (slice(i, i + chunk_size) for i in range(0, len(targets), chunk_size))])
        return g_hidden.to(hidden.dtype), g_weight, None, None, None, None, None


def _weight(head):
    if getattr(head, "bias", None) is not None:  # none in Qwen, Llama, ...: ChunkedHead applies the weight only
        raise ValueError("LM heads with a bias are not supported")
    return head.weight


def token_logps(hidden, targets, head, temperature, chunk_size=256):
    """[M, H] hidden states predicting [M] tokens -> ([M] log-probs, [M] entropies), temperature-scaled, fp32."""
    logp, _, entropy = ChunkedHead.apply(hidden, _weight(head), None, targets, temperature, "logp", chunk_size)
    return logp, entropy


def kd_divergence(s_hidden, t_hidden, targets, head, temperature, kind="fkl", chunk_size=256):
    """[M, H] student and teacher hidden states on the same target tokens -> ([M] D_t, [M] student log-probs)."""
    logp, div, _ = ChunkedHead.apply(s_hidden, _weight(head), t_hidden.detach(), targets, temperature, kind, chunk_size)
    return div, logp


# ==== Model plumbing.
class Backbone(torch.nn.Module):
    """The causal LM minus its head: returns final hidden states [B, L, H]. DDP wraps this (FSDP: its root) so that
    the loss can apply the head chunk by chunk; the head's parameters are inside, so DDP/FSDP sync them too."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # correct under left and right padding
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        return out.last_hidden_state


def collate(rows: list, pad_id: int, device):
    """rows of (prompt ids, response ids) -> right-padded input_ids, attention_mask [B, L] and the flat indices
    (into B*L) of the positions whose logits predict each response token, with those tokens [M]."""
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pred_idx, targets = [], []
    for b, (p, r) in enumerate(rows):
        ids = list(p) + list(r)
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        start = b * width + len(p) - 1
        pred_idx.extend(range(start, start + len(r)))
        targets.extend(r)
    return input_ids.to(device), mask.to(device), torch.tensor(pred_idx, device=device), torch.tensor(targets, device=device)


def response_hidden(backbone, rows, pad_id, device):
    """[M, H] hidden states that predict the response tokens of rows, and those tokens [M]."""
    input_ids, mask, pred_idx, targets = collate(rows, pad_id, device)
    hidden = backbone(input_ids, mask)  # [B, L, H]
    return hidden.reshape(-1, hidden.shape[-1])[pred_idx], targets


def load_model(path: str, dtype, device, check=None):
    """Tokenizer and model; check(tokenizer, model config) validates data before the weights load (minutes for 7B)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:  # prompts are chat-templated: fail here, not at the first prompt of the run
            raise UsageError(f"--model {path}: its tokenizer has no chat template (an instruct/chat model is needed)")
        if check:
            check(tokenizer, AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {path}: cannot load ({str(e).splitlines()[0][:200]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sampling must be exactly what the config says: the model's own generation defaults (e.g. a
    # repetition penalty) would otherwise leak into generate(). Kept aside and written back in checkpoints.
    eos = [model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id]  # ids or lists
    eos_ids = sorted({i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if i is not None})
    model.original_generation_config = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def enable_activation_checkpointing(model):
    """HF activation (a.k.a. gradient) checkpointing, non-reentrant; the old name is deprecated in transformers 5."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)({"use_reentrant": False})


# ==== Rollouts: batched HF generate calls, the sampler's log-probs recorded.
class SamplerLogprobs:
    """Logits processor recording log softmax(logits / T) of each sampled token; holds one step's [N, V].
    It runs before HF's temperature/top-k/top-p warpers, so it sees the raw logits; the token sampled at
    step t is read from input_ids at step t+1 (and from the output for the last step)."""

    def __init__(self, temperature):
        self.temperature, self.prev, self.out = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(-1, input_ids[:, -1:]))
        self.prev = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, completions):  # [N, T] -> [N, T]
        self.out.append(self.prev.gather(-1, completions[:, -1:]))
        return torch.cat(self.out, dim=1)


@torch.no_grad()
def generate(model, prompts: list, pad_id: int, eos_ids: list, device, temperature: float, max_new_tokens: int,
             top_p: float = 1.0, top_k: int = 0, batch_size: int = 0):
    """Left-pad the prompts, sample (greedy at temperature 0), and return per sequence its response ids (up to
    and including the first EOS, never re-tokenised), whether it was truncated, and the sampler's log-probs
    of its tokens (of logits / temperature; of the raw logits when greedy). At most batch_size sequences (0: all)
    per HF generate call: a call's KV cache is sequences x tokens x bytes/token (README). A prompt repeated in a
    call (the G rollouts of a problem) is prefilled once and its KV cache copied: HF would prefill every copy."""
    from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    gen_cfg = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    results, was_training, step = [], model.training, batch_size or max(1, len(prompts))
    for batch in (prompts[i:i + step] for i in range(0, len(prompts), step)):
        distinct = {p: i for i, p in enumerate(dict.fromkeys(map(tuple, batch)))}  # prompt -> row, in order
        width = max(len(p) for p in distinct)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in distinct], device=device)  # [U, P]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=device)
        rows = torch.tensor([distinct[tuple(p)] for p in batch], device=device)  # [N] -> row of its prompt
        recorder, cache = SamplerLogprobs(temperature if temperature > 0 else 1.0), None
        model.eval()  # also turns HF activation checkpointing off (it acts in training mode only): the KV cache works
        try:
            if len(distinct) < len(batch) and width > 1:  # prefill all but the last token (generate runs that one)
                cache = DynamicCache(config=model.config)
                model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True,
                      position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0))
                cache.batch_select_indices(rows)
            out = model.generate(input_ids=input_ids[rows], attention_mask=mask[rows], past_key_values=cache,
                                 generation_config=gen_cfg, logits_processor=LogitsProcessorList([recorder]))
        finally:
            model.train(was_training)
        completions = out[:, width:]  # [N, T]
        sampler_logps = recorder.finish(completions)  # [N, T]
        lengths, truncated = first_eos_lengths(completions, eos_ids)
        results += [dict(ids=completions[i, :n].tolist(), truncated=truncated[i], sampler_logps=sampler_logps[i, :n].cpu())
                    for i, n in enumerate(lengths)]
    return results


def first_eos_lengths(completions, eos_ids):
    """[N, T] sampled ids -> response lengths up to AND including the first EOS, and truncation flags.
    Positions, not pad ids, define the mask: with pad == eos a pad-based mask would drop the real EOS."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, completions.shape[1])
    return lengths.tolist(), (~has_eos).tolist()


@torch.no_grad()
def mean_logps(backbone, head, rows, cfg: Config, pad_id, device) -> list:
    """Length-normalised log-prob of each (prompt, response) row; used to rank KD target candidates."""
    out = []
    for i in range(0, len(rows), cfg.micro_batch_size):
        chunk = rows[i:i + cfg.micro_batch_size]
        hidden, targets = response_hidden(backbone, chunk, pad_id, device)
        logp, _ = token_logps(hidden, targets, head, cfg.temperature, cfg.kd_chunk_size)
        out += [x.mean().item() for x in logp.split([len(r) for _, r in chunk])]
    return out


@torch.no_grad()
def evaluate_accuracy(raw_model, tokenizer, problems, cfg: Config, device, rank, world, grade=None) -> dict:
    """Greedy accuracy on held-out problems, unguided and (rows with a usable strategy) guided; rows are sharded
    over ranks, generation_batch_size at a time. grade: a Grader (default: in this process)."""
    counts, grade = [], grade or Grader(0, cfg.reward_timeout)
    for guided in (False, True):
        rows = [q for q in problems[rank::world] if not guided or has_usable_strategy(q)]
        with autocast(cfg, device):
            outs = generate(raw_model, [prompt_ids(tokenizer, cfg, q, guided) for q in rows], tokenizer.pad_token_id,
                            raw_model.generation_config.eos_token_id, device, 0.0, cfg.max_completion_length,
                            batch_size=cfg.generation_batch_size)
        counts += [sum(grade([tokenizer.decode(o["ids"], skip_special_tokens=True) for o in outs], [q["answer"] for q in rows])),
                   len(rows)]
    c = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    return {f"eval/{mode}_acc": c[2 * k] / c[2 * k + 1] for k, mode in enumerate(("unguided", "guided")) if c[2 * k + 1]}


# ==== The DDP preamble and mixed precision (collectives, FSDP and checkpoints: runtime.py).
def setup_distributed(timeout_s: int = 1800):
    """DDP preamble: the same file runs under `python` (rank 0 of 1) and `torchrun` (NCCL on GPU, gloo on CPU).
    Returns (ddp, rank, world size, device). timeout_s: how long a collective waits for the slowest rank."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    # Imported after init (by transformers' from_pretrained), this module holds the process group, whose gloo threads
    # then outlive destroy_process_group() and can abort the interpreter's exit. Imported first, it holds nothing.
    __import__("torch.distributed.checkpoint")
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def compute_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32."""
    auto = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if name == "bf16" or (name == "auto" and auto) else torch.float32


def autocast(cfg: Config, device):
    """Mixed precision: forwards (generation, scoring, teacher, student) compute in --dtype over the fp32 weights;
    log-softmax, KL and losses are fp32 by explicit casts; backward runs outside (as torch recommends)."""
    dtype = compute_dtype(cfg.dtype)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


# ==== The update: forward/backward over micro-batches of training rows.
#
# A row is one sequence to train on: dict(kind, prompt, response, weight) plus, for kind "auto" (GRPO),
# advantage and sampler_logps; for "kd", teacher_prompt; "sft" (warm-up) needs nothing more. The
# per-token weight is global (1 / tokens or problems of the WHOLE batch, all ranks) and the loss is
# multiplied by the world size because DDP averages gradients over ranks: the gradient is then
# independent of micro-batching and of the number of ranks.
def micro_batch_loss(backbone, head, teacher, rows, old_logps, cfg: Config, pad_id, device, stats, ref=None):
    """Loss of one micro-batch (autonomous and KD rows share ONE student forward). old_logps (a dict) caches
    this micro-batch's log-probs of the first pass: pi_old of the ratios in later passes (num_iterations > 1)."""
    hidden, targets = response_hidden(backbone, [(r["prompt"], r["response"]) for r in rows], pad_id, device)
    kinds = torch.tensor([r["kind"] == "kd" for r in rows for _ in r["response"]], device=device)
    scale = dist.get_world_size() if dist.is_initialized() else 1
    loss = hidden.new_zeros((), dtype=torch.float32)
    auto = [r for r in rows if r["kind"] != "kd"]
    if auto:  # GRPO (and SFT warm-up) tokens
        logp, entropy = token_logps(hidden[~kinds], targets[~kinds], head, cfg.temperature, cfg.kd_chunk_size)
        first_pass = "auto" not in old_logps  # the first of num_iterations passes: the policy is still pi_old
        if first_pass:
            old_logps["auto"] = logp.detach()
        weight = torch.tensor([r["weight"] for r in auto for _ in r["response"]], device=device)
        if auto[0]["kind"] == "sft":
            loss = loss + (-logp * weight).sum() * scale
            stats.add("loss/sft", (-logp.detach() * weight).sum(), 0)
        else:
            adv = torch.tensor([r["advantage"] for r in auto for _ in r["response"]], device=device)
            tok_loss, clipped = grpo_token_loss(logp, old_logps["auto"], adv, cfg.epsilon, cfg.epsilon_high)
            if ref is not None:
                with torch.no_grad():
                    ref_hidden, _ = response_hidden(ref[0], [(r["prompt"], r["response"]) for r in auto], pad_id, device)
                    ref_logp, _ = token_logps(ref_hidden, targets[~kinds], ref[1], cfg.temperature, cfg.kd_chunk_size)
                kl = k3_kl(logp, ref_logp)
                tok_loss = tok_loss + cfg.beta * kl
                stats.add("kl", kl.detach(), kl.numel())
            loss = loss + (tok_loss * weight).sum() * scale
            stats.add("loss/grpo", (tok_loss.detach() * weight).sum(), 0)
            stats.add("clip_ratio", clipped.float(), clipped.numel())
            stats.add("entropy", entropy, entropy.numel())
            if first_pass:
                sampler = torch.cat([r["sampler_logps"] for r in auto]).to(device)
                stats.max("rollout_probs_diff_max", (sampler - logp.detach()).abs().max())
    kd = [r for r in rows if r["kind"] == "kd"]
    with torch.no_grad():  # teacher: the same model on guided prompt + target; on every pass (FSDP: a collective)
        t_rows = [(r["teacher_prompt"], r["response"]) for r in kd] or [([pad_id], [pad_id])]
        t_hidden, _ = response_hidden(teacher, t_rows, pad_id, device)
    if kd:  # strategy distillation
        div, logp = kd_divergence(hidden[kinds], t_hidden, targets[kinds], head, cfg.temperature, cfg.kd_loss, cfg.kd_chunk_size)
        if "kd" not in old_logps:
            old_logps["kd"] = logp.detach()
        tok_loss, kl_clipped, ratio_out = kd_token_loss(div, logp, old_logps["kd"], cfg.kd_loss, cfg.kl_clip,
                                                        cfg.kd_trust_region, cfg.epsilon, cfg.epsilon_high)
        weight = torch.tensor([r["weight"] for r in kd for _ in r["response"]], device=device)
        loss = loss + (tok_loss * weight).sum() * scale
        stats.add("loss/kd", (tok_loss.detach() * weight).sum(), 0)
        stats.add("kd/kl_mean", div.detach(), div.numel())
        stats.add("kd/kl_clip_frac", kl_clipped.float(), kl_clipped.numel())
        stats.add("kd/ratio_out_frac", ratio_out.float(), ratio_out.numel())
    return loss


def accumulate_gradients(model, backbone_raw, head, rows, cfg: Config, pad_id, device, stats, old_logps_cache, ref=None):
    """Forward/backward over micro-batches of rows, sorted by length (less padding; the weights are global, so the
    gradient is the same). Every rank makes the same passes, each with the same forwards (ranks with fewer rows
    make zero-loss ones); DDP all-reduces on the last pass only (no_sync before), FSDP reduce-scatters every pass
    (unsharded gradients would not fit)."""
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["response"]))
    batches = [rows[i:i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    n_passes = int(all_reduce(torch.tensor(len(batches), device=device), dist.ReduceOp.MAX))
    for i in range(n_passes):
        with nullcontext() if (i == n_passes - 1 or not isinstance(model, DDP)) else model.no_sync():
            with autocast(cfg, device):
                if i < len(batches):
                    cache = old_logps_cache.setdefault(i, {})
                    loss = micro_batch_loss(model, head, backbone_raw, batches[i], cache, cfg, pad_id, device, stats, ref)
                else:  # zero loss through every parameter (DDP's reduction must see all of them), teacher pass as usual
                    dummy = [([pad_id], [pad_id])]
                    loss = head(response_hidden(model, dummy, pad_id, device)[0]).float().sum() * 0.0
                    with torch.no_grad():
                        response_hidden(backbone_raw, dummy, pad_id, device)
            loss.backward()
    return n_passes


def optimizer_step(raw_model, optimizer, scheduler, cfg: Config):
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)  # FSDP: a DTensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


def make_optimizer(raw_model, lr, cfg: Config):
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    return optimizer, scheduler


def batches_of(n_items: int, cfg: Config, rank: int, world: int, epoch: int):
    """This rank's batches of item indices for an epoch (DistributedSampler, same order on resume)."""
    sampler = DistributedSampler(range(n_items), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + cfg.batch_size] for i in range(0, len(idx) - cfg.batch_size + 1, cfg.batch_size)]


# ==== One RL step, the SFT warm-up, and the main loop.
def rl_step(problems, model, raw_model, head, tokenizer, optimizer, scheduler, alpha, cfg: Config, device, grade, ref=None):
    """Rollout -> reward -> advantages, alpha, targets -> update. Returns the step's metrics (all ranks)."""
    stats, t0 = Stats(), time.time()
    pad_id, eos_ids = tokenizer.pad_token_id, raw_model.generation_config.eos_token_id
    g1, g2 = cfg.num_generations, cfg.num_guided_generations
    auto_prompts = [prompt_ids(tokenizer, cfg, q, guided=False) for q in problems]
    guided_prompts = [prompt_ids(tokenizer, cfg, q, guided=True) for q in problems]
    backbone_raw = model.module if isinstance(model, DDP) else model
    # One generate call (or generation_batch_size-sized calls) per mode: a call runs until its longest sequence ends,
    # and guided rollouts, which write the strategy's working, run longer than the unguided ones (README "Speed").
    with full_weights(model), autocast(cfg, device):  # FSDP: the weights are gathered once for all generate calls
        outs = [generate(raw_model, [p for p in prompts for _ in range(g)], pad_id, eos_ids, device, cfg.temperature,
                         cfg.max_completion_length, cfg.top_p, cfg.top_k, cfg.generation_batch_size)
                for prompts, g in ((auto_prompts, g1), (guided_prompts, g2))]
    rollouts = [outs[0][b * g1:(b + 1) * g1] + outs[1][b * g2:(b + 1) * g2] for b in range(len(problems))]  # [B][G1 + G2]
    t_gen = time.time()

    rewards = torch.tensor(grade([tokenizer.decode(r["ids"], skip_special_tokens=True) for rs in rollouts for r in rs],
                                 [q["answer"] for q in problems for _ in range(g1 + g2)])).view(len(problems), g1 + g2)
    r_auto, r_guided = rewards[:, :g1], rewards[:, g1:]  # [B, G1], [B, G2]
    advantages = grpo_advantages(r_auto)
    t_grade = time.time()

    # Adaptive alpha: every rank applies every rank's updates in the same order -> identical tables.
    p_auto, p_guided = r_auto.mean(1), (r_guided.mean(1) if g2 else r_auto.mean(1))
    for updates in all_gather_objects([(q["id"], float(pg), float(pa)) for q, pg, pa in zip(problems, p_guided, p_auto)]):
        for qid, pg, pa in updates:
            prev = alpha.get(qid, cfg.alpha_0)
            alpha[qid] = update_alpha(prev, pg, pa, cfg.alpha_gamma, cfg.alpha_max) if cfg.adaptive_alpha else cfg.alpha_0

    # GRPO rows; every token weighs 1 / (response tokens of the global batch), DAPO-style.
    auto_rows = [dict(kind="auto", prompt=auto_prompts[b], response=r["ids"], advantage=float(advantages[b, i]),
                      sampler_logps=r["sampler_logps"])
                 for b in range(len(problems)) for i, r in enumerate(rollouts[b][:g1])
                 if cfg.use_grpo and not (cfg.mask_truncated_completions and r["truncated"])]
    n_tokens = all_reduce(torch.tensor(float(sum(len(r["response"]) for r in auto_rows)), device=device))
    for r in auto_rows:
        r["weight"] = 1.0 / max(float(n_tokens), 1.0)
    # Target selection (sheet step 3): the correct guided rollout most likely under the UNGUIDED prompt.
    kd_rows, n_problems = [], len(problems) * (dist.get_world_size() if dist.is_initialized() else 1)
    if cfg.use_kd and g2:
        mean_logp = torch.full((len(problems), g2), -math.inf)  # [B, G2], scored for correct rollouts only
        cands = [(b, j) for b in range(len(problems)) for j in range(g2) if r_guided[b, j] > 0]
        if cfg.target_selection:  # on every rank, candidates or not: FSDP's gathering is a collective
            with full_weights(model), autocast(cfg, device):
                scores = mean_logps(backbone_raw.eval(), head,
                                    [(auto_prompts[b], rollouts[b][g1 + j]["ids"]) for b, j in cands], cfg, pad_id, device)
            for (b, j), score in zip(cands, scores):
                mean_logp[b, j] = score
        for b, q in enumerate(problems):
            j = select_target(r_guided[b], mean_logp[b], cfg.target_selection)
            if j >= 0:  # KD weight alpha(q) / |target| / global problem count: mean_q alpha(q) L_KD(q)
                resp = rollouts[b][g1 + j]["ids"]
                kd_rows.append(dict(kind="kd", prompt=auto_prompts[b], teacher_prompt=guided_prompts[b], response=resp,
                                    weight=alpha[q["id"]] / (len(resp) * n_problems)))
    t_score = time.time()

    model.train()
    old_logps, grad_norm, rows = {}, 0.0, auto_rows + kd_rows
    for _ in range(cfg.num_iterations):
        if accumulate_gradients(model, backbone_raw, head, rows, cfg, pad_id, device, stats, old_logps, ref):
            grad_norm = optimizer_step(raw_model, optimizer, scheduler, cfg)
    t_end = time.time()

    stats.add("reward/autonomous_mean", r_auto, r_auto.numel())
    stats.add("reward/guided_mean", r_guided, r_guided.numel())
    stats.add("pass_gap", p_guided - p_auto, len(problems))
    stats.add("alpha/mean", sum(alpha[q["id"]] for q in problems), len(problems))
    stats.add("kd/target_frac", len(kd_rows), len(problems))
    stats.add("frac_reward_zero_std", (r_auto.std(1) == 0).float() if g1 > 1 else torch.ones(len(problems)), len(problems))
    stats.add("completions/mean_length", sum(len(r["ids"]) for rs in rollouts for r in rs[:g1]), len(problems) * g1)
    stats.add("completions/clipped_ratio", sum(r["truncated"] for rs in rollouts for r in rs[:g1]), len(problems) * g1)
    stats.add("perf/generated_tokens", sum(len(r["ids"]) for rs in rollouts for r in rs), 0)  # up to the first EOS
    stats.add("perf/trained_tokens", sum(len(r["response"]) for r in rows), 0)
    metrics = {"loss/grpo": 0.0, "loss/kd": 0.0, **stats.reduce(device)}
    metrics.update({k: metrics[k] / cfg.num_iterations for k in ("loss/grpo", "loss/kd")})  # summed over the mu passes
    metrics.update({"grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "time/generate": t_gen - t0,
                    "perf/gen_tokens_per_s": metrics["perf/generated_tokens"] / (t_gen - t0),
                    "time/grade": t_grade - t_gen, "time/select": t_score - t_grade, "time/update": t_end - t_score})
    return metrics


def sft_warmup(problems, model, raw_model, head, tokenizer, cfg: Config, device, rank, world, log):
    """Warm-up: NLL of the reference `solution` + the end-of-turn token (tokenizer.eos_token, which the chat template
    closes an assistant turn with; generation may stop on other EOS ids too) under the autonomous prompt."""
    optimizer, scheduler = make_optimizer(raw_model, cfg.sft_learning_rate, cfg)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else raw_model.generation_config.eos_token_id[0]
    examples = [(prompt_ids(tokenizer, cfg, q, guided=False), tokenizer(q["solution"], add_special_tokens=False)["input_ids"] + [eos])
                for q in problems]
    step = 0
    for epoch in range(cfg.sft_epochs):
        for batch in batches_of(len(examples), cfg, rank, world, epoch):
            stats = Stats()
            rows = [dict(kind="sft", prompt=examples[i][0], response=examples[i][1]) for i in batch]
            n_tokens = all_reduce(torch.tensor(float(sum(len(r["response"]) for r in rows)), device=device))
            for r in rows:
                r["weight"] = 1.0 / float(n_tokens)
            model.train()
            accumulate_gradients(model, model.module if isinstance(model, DDP) else model, head, rows, cfg,
                                 tokenizer.pad_token_id, device, stats, {})
            grad_norm = optimizer_step(raw_model, optimizer, scheduler, cfg)
            step += 1
            log({"phase": "sft", "sft_step": step, "epoch": epoch, **stats.reduce(device), "grad_norm": grad_norm})
    del optimizer


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        problems = load_problems(cfg.data)
        sft_problems = load_problems(cfg.sft_data or cfg.data, ("problem", "answer", "strategy", "solution")) if cfg.sft_epochs else []
        eval_problems = load_problems(cfg.eval_data, ("problem", "answer"), skip_unkept=False) if cfg.eval_data else []
        global_batch = cfg.batch_size * int(os.environ.get("WORLD_SIZE", 1))
        for path, rows in ((cfg.data, problems), (cfg.sft_data or cfg.data, sft_problems or problems)):
            if len(rows) < global_batch:
                raise UsageError(f"{path}: {len(rows)} problems, fewer than the global batch {global_batch}")
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        # --resume (latest) passes over a damaged newest checkpoint (killed mid-write, cut file) to the newest whole one
        resume, saved = resolve_resume(cfg.resume, cfg.output_dir, cfg.fsdp) if cfg.resume else (None, None)
        if not resume and not cfg.overwrite_output_dir and (latest_checkpoint(cfg.output_dir) or (
                os.path.isfile(metrics_path) and os.path.getsize(metrics_path))):  # an empty metrics file holds nothing
            raise UsageError(f"--output_dir {cfg.output_dir}: already holds a run; pass --resume or "
                             "--overwrite_output_dir")
        check_writable_dir(cfg.output_dir, "--output_dir")
        if cfg.fsdp and "RANK" not in os.environ:
            raise UsageError("--fsdp: needs a process group; launch with torchrun (--nproc_per_node=1 for one GPU)")
        ddp, rank, world, device = setup_distributed(cfg.ddp_timeout)

        def check_rows(tokenizer, config):  # every row fits the context and tokenizes: checked before the run
            fit = dict(prompt_len=lambda q, guided: len(prompt_ids(tokenizer, cfg, q, guided)),
                       context=getattr(config, "max_position_embeddings", math.inf), budget=cfg.max_completion_length)
            check_fits(cfg.data, problems, **fit)
            check_fits(cfg.eval_data, eval_problems, **fit)
            check_fits(cfg.sft_data or cfg.data, sft_problems, **fit, text_len=lambda t: len(tokenizer(t).input_ids))
        # fp32 master weights (compute in --dtype under autocast); FSDP moves each rank's shards to its GPU
        raw_model, tokenizer = load_model(resume or cfg.model, torch.float32, "cpu" if cfg.fsdp else device, check_rows)
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    master = rank == 0
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(raw_model)
    head, backbone = raw_model.get_output_embeddings(), Backbone(raw_model)
    model = shard_fsdp(backbone, compute_dtype(cfg.dtype), device) if cfg.fsdp else \
        DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None) if ddp else backbone
    ref = None
    if cfg.beta > 0:  # frozen reference = the initial policy, never trained: compute dtype, replicated
        ref_model, _ = load_model(cfg.model, compute_dtype(cfg.dtype), device)
        ref_model.eval().requires_grad_(False)
        ref = (Backbone(ref_model), ref_model.get_output_embeddings())

    if master:
        os.makedirs(cfg.output_dir, exist_ok=True)
        for d in os.listdir(cfg.output_dir):  # --overwrite_output_dir: no stale checkpoint may be resumed later;
            if d.startswith("checkpoint-") and (not resume or d.endswith(".tmp")):  # resume: a killed run's partial one
                shutil.rmtree(os.path.join(cfg.output_dir, d))
        # On resume, drop the lines written after the checkpoint by the killed run.
        kept = [line for line in open(metrics_path) if json.loads(line).get("step", 0) <= saved["step"]] \
            if resume and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def log(record: dict):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    optimizer, scheduler = make_optimizer(raw_model, cfg.learning_rate, cfg)
    state = dict(step=0, epoch=0, position=0, alpha={}, sft_done=not cfg.sft_epochs, eval_start={})
    if resume:  # optimizer, scheduler, RNG of every rank; returns the loop's state (step, data position, alpha, ...)
        state = restore_checkpoint(resume, saved, model, optimizer, scheduler, state, cfg.fsdp, rank, world, device)
        del saved  # the optimizer state now lives in the optimizer (on its device); free the CPU copy
    else:
        torch.manual_seed(cfg.seed + rank)  # different samples on each rank
        random.seed(cfg.seed + rank)

    grade = Grader(default_workers() if cfg.reward_workers == -1 else cfg.reward_workers, cfg.reward_timeout)
    warming_up = not state["sft_done"]
    if warming_up:
        sft_warmup(sft_problems, model, raw_model, head, tokenizer, cfg, device, rank, world, log)
        state["sft_done"] = True

    def evaluate() -> dict:  # greedy held-out accuracy: printed next to the one before RL, logged with the step
        with full_weights(model):
            result = evaluate_accuracy(raw_model, tokenizer, eval_problems, cfg, device, rank, world, grade)
        start = state["eval_start"] = state["eval_start"] or result
        if master:
            tqdm.write(f"step {state['step']}, greedy accuracy on {len(eval_problems)} problems of {cfg.eval_data}: " + ", ".join(
                f"{k[5:-4]} " + (f"{100 * start[k]:.1f}% -> " if state["step"] else "") + f"{100 * v:.1f}%" for k, v in result.items()))
        return result

    if eval_problems and state["step"] == 0 and not state["eval_start"]:  # before RL (after the warm-up, if any)
        log({"step": 0, **evaluate()})
    if warming_up:  # checkpoint-0: the warm model, and its evaluation (not repeated on a resume from it)
        save_checkpoint(cfg, model, raw_model, tokenizer, optimizer, scheduler, state, master)
    with tqdm(total=cfg.max_steps, initial=state["step"], disable=not master, desc="sgpo") as bar:  # (closed on Ctrl-C)
        batches = batches_of(len(problems), cfg, rank, world, state["epoch"])
        while state["step"] < cfg.max_steps:
            if state["position"] >= len(batches):
                state["epoch"], state["position"] = state["epoch"] + 1, 0
                batches = batches_of(len(problems), cfg, rank, world, state["epoch"])
            batch = [problems[i] for i in batches[state["position"]]]
            metrics = rl_step(batch, model, raw_model, head, tokenizer, optimizer, scheduler, state["alpha"], cfg, device, grade, ref)
            state["position"] += 1
            state["step"] += 1
            if eval_problems and ((cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or state["step"] == cfg.max_steps):
                metrics.update(evaluate())
            log({"step": state["step"], "epoch": state["epoch"], **metrics})
            bar.update(1)
            bar.set_postfix(r_auto=f"{metrics['reward/autonomous_mean']:.2f}", r_guided=f"{metrics['reward/guided_mean']:.2f}",
                            kd=f"{metrics['kd/target_frac']:.2f}")
            if state["step"] % cfg.save_steps == 0 or state["step"] == cfg.max_steps:
                save_checkpoint(cfg, model, raw_model, tokenizer, optimizer, scheduler, state, master)
    grade.close()
    if ddp:
        del model, backbone, raw_model, head, optimizer  # they hold the process group: freed first, no gloo thread stays
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a checkpoint being written was removed)
        print("\ninterrupted: the checkpoints in --output_dir are whole; continue with --resume", file=sys.stderr)
        sys.exit(130)
