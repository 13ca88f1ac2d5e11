"""
The model as the scripts run it, shared by sgpo.py, evaluate.py and extract_strategies.py: prompts
in the chat format, model loading, the training forward without the LM head (`Backbone`, and
sgpo.py's `Policy`, the views of the model it trains), and the generation engine: batched
sampling that records the sampler's log-probs, prefills each distinct prompt once and cuts every
response at its first EOS.
"""
import copy
import functools
import inspect
import itertools
import os
import re
from dataclasses import dataclass

import torch

from inputs import UsageError, has_usable_strategy
from reward import Grader
from runtime import all_reduce, autocast, compute_dtype, get_rank, reshard, wrap

AUTO_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
)
# The guided prompt is the strategy followed by the autonomous prompt, word for word: the problem
# and the response then sit at the same relative positions in both contexts, so what the strategy
# changes is the strategy alone (and a teacher circuit keyed to relative positions transfers to the
# student's context).
GUIDED_TEMPLATE = "Use this strategy for the problem below:\n{strategy}\n\n" + AUTO_TEMPLATE


def prompt_ids(tokenizer, cfg, problem: dict, guided: bool) -> list:
    """Token ids of the chat-templated autonomous or guided prompt, ending with the assistant
    header. cfg: prompt_template, guided_prompt_template, system_prompt."""
    template = cfg.guided_prompt_template if guided else cfg.prompt_template
    # one pass: the problem or strategy text may itself hold braces
    user = re.sub(r"\{(problem|strategy)\}", lambda m: problem[m.group(1)], template)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": user})
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def load_model(path: str, dtype, device, check=None, trainable=False, meta=False):
    """Tokenizer and model; check(tokenizer, model config) validates data before the weights load
    (minutes for 7B). trainable: also refuse what sgpo.py cannot train (check_trainable). meta:
    the model built on the meta device, no weights read (FSDP's ranks but 0: runtime.shard_fsdp
    gives them their shards of rank 0's)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    check_local(path, "--model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # prompts are chat-templated: fail here, not at the first prompt of the run
        if not tokenizer.chat_template:
            raise UsageError(f"--model {path}: its tokenizer has no chat template "
                             "(an instruct/chat model is needed)")
        config = AutoConfig.from_pretrained(path)
        if trainable:
            check_trainable(path, config)
        if check:
            check(tokenizer, config)
        model = (_meta_model(path, config, dtype) if meta
                 else AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device))
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200]
        raise UsageError(f"--model {path}: cannot load ({reason})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sampling must be exactly what the config says: the model's own generation defaults (e.g. a
    # repetition penalty) would otherwise leak into generate(). Kept aside and written back in
    # checkpoints.
    # generation stops at every EOS id of the model, and where the chat template ends a turn
    eos_ids = set(turn_end_ids(tokenizer)[-1:])
    for eos in (model.generation_config.eos_token_id, model.config.eos_token_id,
                tokenizer.eos_token_id):  # each an id, a list of ids or None
        eos_ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    eos_ids = sorted(eos_ids - {None})
    model.original_generation_config = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def check_local(path: str, flag: str):
    """UsageError at once for a path that can only be a local folder and is not one (absolute,
    ./ ../ ~, more than one /, or under a folder that exists here): a hub id is `org/name`, and
    transformers would spend a minute retrying the hub before an error that never says 'no such
    folder'."""
    if os.path.isdir(path):
        return
    first = path.split("/")[0]
    local = (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
             or ("/" in path and os.path.isdir(first)))
    if local:
        raise UsageError(f"{flag} {path}: no such folder")


def _meta_model(path: str, config, dtype):
    """The model of a folder built on the meta device, as from_pretrained would build it (eval
    mode, the folder's generation config), without its weights."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the one from_config made
        pass
    return model.eval()


def load_weights(path: str, device, meta=False):
    """A causal LM alone, fp32, no tokenizer (a checkpoint's teacher/); meta: as load_model's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if meta:
            return _meta_model(path, AutoConfig.from_pretrained(path), torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200]
        raise UsageError(f"{path}: cannot load ({reason})") from None


def turn_end_ids(tokenizer) -> list:
    """The ids that close an assistant turn in the tokenizer's chat template: what it writes after
    an assistant message's content, up to and including the first special token (ChatML:
    <|im_end|>, Llama 3: <|eot_id|>, Gemma: <end_of_turn>, which is not Gemma's eos token). The
    eos token where the template writes no special token there (or refuses the probe)."""
    probe = "Turn end probe."
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template with rules of its own (e.g. a system message first)
        text = ""
    after = text[text.rfind(probe) + len(probe):] if probe in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = special_ids(tokenizer)
    for k, i in enumerate(ids):
        if i in special:
            return ids[:k + 1]
    return [tokenizer.eos_token_id]


def special_ids(tokenizer) -> set:
    """The named special tokens, and every added token flagged special: a tokenizer converted from
    GGUF registers its chat markers (<|im_end|>) that way, without naming them."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def check_trainable(path: str, config):
    """UsageError unless sgpo.py can train the model of this config. Its loss applies the LM head
    itself (h @ W.T / T): a model that post-processes its logits (Gemma-2's final soft-cap,
    Cohere's logit_scale, Granite's logits_scaling) would sample from other log-probs than the
    trainer optimises. A multimodal checkpoint loads with a vision (or audio) tower that never gets
    a gradient, and DDP fails at its second step."""
    for name in ("vision_config", "audio_config"):
        if getattr(config, name, None) is not None:
            raise UsageError(f"--model {path}: a multimodal checkpoint ({config.model_type}, "
                             f"{name}); sgpo.py trains text-only causal LMs")
    text = getattr(config, "text_config", None) or config
    for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0),
                          ("logits_scaling", 1.0)):
        value = getattr(text, name, None)
        if value is not None and value != neutral:
            raise UsageError(f"--model {path}: its logits are post-processed ({name} = {value}), "
                             "which sgpo.py's loss does not apply")


def enable_activation_checkpointing(model):
    """HF activation (a.k.a. gradient) checkpointing, non-reentrant; the old name is deprecated in
    transformers 5."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})


# ==== The training forward: the LM minus its head, on (prompt, response) pairs.
class Backbone(torch.nn.Module):
    """The causal LM minus its head: returns final hidden states [B, L, H], so that the loss can
    apply the head chunk by chunk. DDP wraps this (FSDP: its root); the head's parameters are
    inside, so DDP/FSDP sync them too."""

    def __init__(self, lm, share="auto"):
        super().__init__()
        # share: --share_prompts (auto, true or false)
        self.lm, self.share = lm, share
        c = lm.config.get_text_config()
        # what a forward costs, in multiply-adds (shares_prompts): per position, every weight
        # but the embeddings (the head runs outside, on response positions only); per
        # (query, key) pair, q.k and the value sum in every layer
        embeddings = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
        self.weights = sum(p.numel() for p in lm.parameters() if id(p) not in embeddings)
        heads, head_dim = c.num_attention_heads, kv_heads_and_dim(c)[1]
        self.per_pair = 2 * c.num_hidden_layers * heads * head_dim
        self.can_share = can_share_prompts(c) and c._attn_implementation == "sdpa"

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def shares_prompts(self, pairs) -> bool:
        """Lay pairs out as collate_shared (each prompt once) rather than collate (a row each)?
        Where it costs fewer multiply-adds: tokens x weights + (query, key) pairs x per_pair, for
        the padded batch of each layout (SDPA computes every pair of a row, masked or not). (R)
        SmolLM2-135M, 4 prompts of 60-77 tokens with 4 + 1 responses of 48: shared, 1.9x fewer;
        the toy's default run: 464 of 960 forwards (421 repeat no prompt); 9 responses of 8K
        tokens of a 7B model: a row each (the attention over 72K positions would cost 2.5x).
        Counted from the shapes, not timed: the same choice on every rank, machine and resume."""
        prompts = {}
        for p, r in pairs:
            prompts[tuple(p)] = prompts.get(tuple(p), len(p) - 1) + len(r)
        if self.share != "auto" or not self.can_share or len(prompts) == len(pairs):
            return self.share == "true" and self.can_share
        width = max(len(p) + len(r) for p, r in pairs)
        shared = max(prompts.values())
        def cost(rows, length):
            return rows * length * (self.weights + length * self.per_pair)
        return cost(len(prompts), shared) < cost(len(pairs), width)


def can_share_prompts(config) -> bool:
    """Can the loss's forwards take collate_shared's layout? Its [S, 1, L, L] mask reaches the
    attention as it is under SDPA only (None: not chosen yet, SDPA where the model has it), and
    replaces the model's own masks: no sliding-window layer may need one."""
    c = config.get_text_config()
    layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
    return (c._attn_implementation in (None, "sdpa") and layer_types == {"full_attention"}
            and getattr(c, "sliding_window", None) is None)


def collate(pairs: list, pad_id: int):
    """(prompt, response) pairs -> right-padded input_ids, attention_mask, position_ids [B, L] and
    the flat indices (into B*L) of the positions whose logits predict each response token, with
    those tokens [M]."""
    width = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    pred_idx, targets = [], []
    for b, (p, r) in enumerate(pairs):
        ids = list(p) + list(r)
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
        start = b * width + len(p) - 1
        pred_idx.extend(range(start, start + len(r)))
        targets.extend(r)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, position_ids, torch.tensor(pred_idx), torch.tensor(targets)


def collate_shared(pairs: list, pad_id: int):
    """(prompt, response) pairs -> one sequence per distinct prompt: the prompt but its last token
    once, then for each of its responses that token and the response but its last, at the
    positions they would have in the row, under a [S, 1, L, L] mask by which a response sees the
    shared part and itself only: collate's hidden states, each prompt computed once. (Each row's
    own copy of the last prompt token: every predicting position is some row's alone, so the
    gather's backward adds each gradient once; a position shared by rows would take parallel
    atomic float adds on CPU, in an order that changes from run to run.) Returns what collate
    does, the mask 4-D (True: may attend)."""
    groups = {}
    for i, (p, _) in enumerate(pairs):
        groups.setdefault(tuple(p), []).append(i)
    width = max(len(p) - 1 + sum(len(pairs[i][1]) for i in rows) for p, rows in groups.items())
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    # every position sees itself: a padding one has no empty row to softmax over
    mask = torch.eye(width, dtype=torch.bool).repeat(len(groups), 1, 1, 1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    pred_idx = [None] * len(pairs)
    for s, (p, rows) in enumerate(groups.items()):
        start = n = len(p) - 1
        input_ids[s, :n] = torch.tensor(p[:n], dtype=torch.long)
        position_ids[s, :n] = torch.arange(n)
        mask[s, 0, :n, :n] = causal[:n, :n]
        for i in rows:
            r = pairs[i][1]
            end = start + len(r)
            input_ids[s, start:end] = torch.tensor([p[-1], *r[:-1]])
            position_ids[s, start:end] = torch.arange(n, n + len(r))
            mask[s, 0, start:end, :n] = True
            mask[s, 0, start:end, start:end] = causal[:len(r), :len(r)]
            pred_idx[i] = range(s * width + start, s * width + end)
            start = end
    targets = []
    for _, r in pairs:
        targets.extend(r)
    flat = list(itertools.chain.from_iterable(pred_idx))
    return input_ids, mask, position_ids, torch.tensor(flat), torch.tensor(targets)


@dataclass
class Policy:
    """The parts of the one model sgpo.py trains: one model, several views of it."""
    lm: torch.nn.Module
    """The HF causal LM, head included, fp32 master weights: generates, is optimised and saved."""
    backbone: Backbone
    """lm minus its head: forwards without gradient (teacher, target scoring)."""
    wrapped: torch.nn.Module
    """The backbone as DDP or FSDP wraps it (or itself): the forward whose backward syncs ranks."""
    head: torch.nn.Module
    """lm's output embedding (tied to the input embedding in some models)."""
    tokenizer: object
    device: torch.device
    teacher: "Policy" = None
    """--teacher base/ema: the teacher's own weights, fp32 like lm's, never trained (FSDP: sharded
    like the policy); None: the live policy teaches."""
    reference: "Policy" = None
    """--beta > 0: the frozen initial model of the k3 KL, in the compute dtype, replicated."""
    master: torch.nn.Module = None
    """A teacher's fp32 weights (the EMA's, the checkpoint's) where lm is their working copy in
    the compute dtype (with_working_copy); None: lm holds them."""

    @staticmethod
    def of(lm, tokenizer, device, wrap_backbone=lambda backbone: backbone, share="auto"):
        backbone = Backbone(lm, share)
        return Policy(lm, backbone, wrap_backbone(backbone), lm.get_output_embeddings(),
                      tokenizer, torch.device(device))

    def master_weights(self) -> torch.nn.Module:
        """The model holding the fp32 weights: master, or lm."""
        return self.lm if self.master is None else self.master

    def teacher_view(self) -> "Policy":
        """The weights the KD term's teacher runs: the teacher's own, or these (live)."""
        return self.teacher or self

    def response_hidden(self, pairs, sync_grads=True):
        """(prompt ids, response ids) pairs -> [M, H] hidden states that predict the response
        tokens, and those tokens [M]. sync_grads: through `wrapped`, whose backward syncs the
        gradients over ranks (the student); else through the bare `backbone` (no gradient).
        No pairs: [0, H], [0], from a forward all the same (on one pad token): under FSDP every
        forward is a collective (sgpo.micro_batch_loss's teacher, on a micro-batch without KD
        rows)."""
        if not pairs:
            pad = self.tokenizer.pad_token_id
            hidden, targets = self.response_hidden([([pad], [pad])], sync_grads)
            return hidden[:0], targets[:0]
        layout = collate_shared if self.backbone.shares_prompts(pairs) else collate
        input_ids, mask, positions, pred_idx, targets = layout(pairs, self.tokenizer.pad_token_id)
        to = self.device
        module = self.wrapped if sync_grads else self.backbone
        hidden = module(input_ids.to(to), mask.to(to), positions.to(to))  # [B, L, H]
        return hidden.reshape(-1, hidden.shape[-1])[pred_idx.to(to)], targets.to(to)


def load_policy(cfg, resume, ddp, device, check=None) -> Policy:
    """sgpo.py's Policy: fp32 master weights (the forwards compute in --dtype under autocast) of
    cfg.model, or of the checkpoint folder `resume`, wrapped by runtime.wrap (DDP, FSDP: each
    rank's shards of rank 0's weights moved to its GPU, or none); its teacher (--teacher
    base/ema) and reference (--beta > 0). check: run on the tokenizer before the weights load
    (the data-fit check of inputs.load_train_data)."""
    def check_share(config):
        if cfg.share_prompts == "true" and not can_share_prompts(config):
            raise UsageError(f"--share_prompts true: {cfg.model} needs SDPA attention and no "
                             "sliding-window layer (a custom mask replaces the model's)")

    def check_all(tokenizer, config):
        check_share(config)
        if check:
            check(tokenizer, config)

    # FSDP: rank 0 reads the weights, the other ranks build the model on the meta device and get
    # their shards from rank 0's (runtime.shard_fsdp): one full fp32 copy on the host, not one a
    # rank
    meta = cfg.fsdp and get_rank() > 0
    lm, tokenizer = load_model(resume or cfg.model, torch.float32,
                               "cpu" if cfg.fsdp else device, check_all, trainable=True, meta=meta)
    # (a model without SDPA has loaded with another attention)
    check_share(lm.config)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    policy = Policy.of(lm, tokenizer, device, lambda backbone: wrap(backbone, cfg, ddp, device),
                       cfg.share_prompts)
    if cfg.teacher != "live":
        # fp32 like the policy (base == live exactly until the first step; an EMA in bf16 would
        # drop lr-1e-6 moves), loaded once the policy is sharded (FSDP: rank 0 holds one full
        # model on the host at a time, the others none): a resumed run's from its checkpoint,
        # else the policy's start (copied from the policy again after the warm-up: sgpo.train)
        t_lm = load_weights(f"{resume}/teacher" if resume else cfg.model,
                            "cpu" if cfg.fsdp else device, meta)
        t_lm.generation_config = lm.generation_config  # (its end-of-turn ids)
        policy.teacher = Policy.of(t_lm.eval().requires_grad_(False), tokenizer, device,
                                   lambda backbone: wrap(backbone, cfg, False, device),
                                   cfg.share_prompts)
        # (FSDP gathers the teacher's weights in the compute dtype already)
        if not cfg.fsdp and compute_dtype(cfg.dtype) != torch.float32:
            policy.teacher = with_working_copy(policy.teacher, compute_dtype(cfg.dtype))
    if cfg.beta > 0:
        # the initial model, never trained (a resumed run's too)
        ref_lm, _ = load_model(cfg.model, compute_dtype(cfg.dtype), device)
        policy.reference = Policy.of(ref_lm.eval().requires_grad_(False), tokenizer, device,
                                     share=cfg.share_prompts)
    return policy


def with_working_copy(teacher: Policy, dtype) -> Policy:
    """A frozen fp32 teacher (DDP, one process) that computes from a working copy of its weights
    whose Linear weights are in the compute dtype; its fp32 weights stay as `master`. Autocast
    caches its casts only of weights that require grad: a frozen teacher's are cast again at every
    op of every forward, every decode step included (SmolLM2 on a CPU in bf16: generation 1.5x as
    fast with the copy, a KD forward 11 % faster; tests/bench_teacher_cast.py). The copy holds
    what autocast casts them to (embeddings, a head tied to them and norms stay fp32): the same
    numbers, bit for bit. Costs 2 bytes a parameter; refresh_working_copy after each move."""
    working = copy.deepcopy(teacher.lm)
    embedding = working.get_input_embeddings().weight
    for module in working.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.weight.data = module.weight.data.to(dtype)
    out = Policy.of(working, teacher.tokenizer, teacher.device, share=teacher.backbone.share)
    out.master = teacher.lm
    return out


@torch.no_grad()
def refresh_working_copy(teacher: Policy):
    """The working copy's weights from the master's (cast where the copy's are not fp32)."""
    for weight, master in zip(teacher.lm.parameters(), teacher.master.parameters(), strict=True):
        weight.copy_(master)


@torch.no_grad()
def move_teacher(policy: Policy, rate: float):
    """An extension (--teacher base/ema; the paper's teacher is the live policy), after each
    optimizer step: theta_T += rate (theta - theta_T) in fp32, tensor by tensor (FSDP: each rank
    its shards), then its working copy (with_working_copy) refreshed. rate: --teacher_ema_rate
    under ema, 0 under base (unmoved), 1 as RL starts (a copy). FSDP: the teacher's root, left
    gathered by its forwards, is resharded first."""
    reshard(policy.teacher.wrapped)
    if rate == 0:
        return
    teacher = policy.teacher
    for theta_t, theta in zip(teacher.master_weights().parameters(), policy.lm.parameters(),
                              strict=True):
        if rate == 1:
            theta_t.copy_(theta)
        else:
            theta_t.lerp_(theta, rate)
    if teacher.master is not None:
        refresh_working_copy(teacher)


# ==== Generation.
class SamplerLogprobs:
    """Logits processor recording log softmax(logits / T) of each sampled token; holds one step's
    [N, V]. It runs before HF's temperature/top-k/top-p warpers, so it sees the raw logits; the
    token sampled at step t is read from input_ids at step t+1 (and from the output for the last
    step)."""

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
def generate(model, prompts: list, pad_id: int, eos_ids: list, device, temperature: float,
             max_new_tokens: int, top_p: float = 1.0, top_k: int = 0, batch_size: int = 0):
    """Left-pad the prompts, sample (greedy at temperature 0), and return per sequence a dict of its
    response ids (up to and including the first EOS, never re-tokenised), whether it was truncated,
    and the sampler's log-probs of its tokens (of logits / temperature; of the raw logits when
    greedy). At most batch_size sequences (0: all) per HF generate call: a call's KV cache is
    sequences x tokens x bytes/token (docs/memory_and_speed.md). A prompt repeated in a call (the G
    rollouts of a problem) is prefilled once and its KV cache copied: HF would prefill every
    copy."""
    from transformers import GenerationConfig
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        sampling = dict(do_sample=False)
    gen_cfg = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                               pad_token_id=pad_id)
    step = batch_size or max(1, len(prompts))
    results = []
    for i in range(0, len(prompts), step):
        batch = prompts[i:i + step]
        recorder = SamplerLogprobs(temperature if temperature > 0 else 1.0)
        completions = _generate_call(model, batch, pad_id, gen_cfg, recorder, device)  # [N, T]
        sampler_logps = recorder.finish(completions)  # [N, T]
        lengths, truncated = first_eos_lengths(completions, eos_ids)
        for k, n in enumerate(lengths):
            results.append(dict(ids=completions[k, :n].tolist(), truncated=truncated[k],
                                sampler_logps=sampler_logps[k, :n].cpu()))
    return results


def sample(policy, prompts, cfg, lm=None):
    """sgpo.py's rollouts: responses to prompts (generate: ids up to the first EOS, truncation,
    sampler log-probs) at cfg's sampling settings, cfg.generation_batch_size sequences per call.
    lm: another sampler than the policy's (its teacher)."""
    return generate(lm or policy.lm, prompts, policy.tokenizer.pad_token_id,
                    policy.lm.generation_config.eos_token_id, policy.device, cfg.temperature,
                    cfg.max_completion_length, cfg.top_p, cfg.top_k, cfg.generation_batch_size)


def sample_in_one_call(policy, prompts, cfg) -> bool:
    """Sample both modes' rollouts (prompts: all of them) in one generate call rather than one
    call per mode? --generate_by_mode false: one; true: a call per mode; auto: whichever reads
    less (one_call_is_cheaper), at the longest prompt of any rank, so that every rank chooses
    alike (len(prompts) is batch_size x (G1 + G2) on each)."""
    if cfg.generate_by_mode != "auto":
        return cfg.generate_by_mode == "false"
    longest = torch.tensor(max(map(len, prompts)), device=policy.device)
    longest = int(all_reduce(longest, torch.distributed.ReduceOp.MAX))
    rows = min(len(prompts), cfg.generation_batch_size or len(prompts))
    return one_call_is_cheaper(policy, rows, longest + cfg.max_completion_length)


def one_call_is_cheaper(policy, rows: int, length: int) -> bool:
    """Is one generate call of `rows` sequences of up to `length` tokens cheaper than a call per
    mode? A decode step reads the weights once per call and every row's KV cache: one call reads
    the weights half as often, but keeps every row until the longest sequence of either mode ends
    (guided rollouts often run longer). (R) One call where the weights outweigh the KV cache of a
    call's rows at their full length (SmolLM2-135M, 24 rows of ~170 tokens), one per mode where
    the cache outweighs them (the toy's 117K parameters; 64 rows of 8.7K tokens of a 7B model).
    Counted in elements, from the model's shape, not timed: the same on every machine and on a
    resume."""
    config = policy.lm.config
    kv_heads, head_dim = kv_heads_and_dim(config)
    per_token = 2 * config.get_text_config().num_hidden_layers * kv_heads * head_dim  # K, V
    # a decode step reads every weight but the input embedding (unless the head is tied to it):
    # the backbone's (all but the embeddings) and the head
    weights = policy.backbone.weights + policy.head.weight.numel()
    return weights >= rows * length * per_token


def kv_heads_and_dim(config) -> tuple:
    """(key/value heads, head dimension) of a model's attention layers, from its (text) config:
    what one position of the KV cache holds per layer, twice (keys and values)."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


def repeat_each(items, n):
    """[a, b], 2 -> [a, a, b, b]."""
    out = []
    for x in items:
        out += [x] * n
    return out


def _generate_call(model, batch, pad_id, gen_cfg, recorder, device):
    """One HF generate call on the prompts of batch -> [N, T] sampled ids."""
    from transformers import LogitsProcessorList
    distinct = {p: i for i, p in enumerate(dict.fromkeys(map(tuple, batch)))}  # prompt -> row
    width = max(len(p) for p in distinct)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in distinct],
                             device=device)  # [U, P]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=device)
    rows = torch.tensor([distinct[tuple(p)] for p in batch], device=device)  # [N]: its prompt's row
    was_training = model.training
    accepted = inspect.signature(model.forward).parameters
    cache_arg = cache_kwarg(model)
    # prefill each distinct prompt once, all but its last token (generate runs that one), then
    # copy its KV cache to the rows that share it; its logits are not used: keep one
    prefill = len(distinct) < len(batch) and width > 1
    cache = _kv_cache(model, device, width + gen_cfg.max_new_tokens)
    # eval() also turns HF activation checkpointing off (it acts in training mode only), so the
    # KV cache works
    model.eval()
    try:
        if prefill:
            position_ids = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
            keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
            model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
                  position_ids=position_ids, **{cache_arg: cache}, **keep)
            cache.batch_select_indices(rows)
        # synced_gpus=False: transformers turns it on by itself for a model under FSDP (every
        # decode step an all_reduce, until the slowest rank ends); sgpo.py generates inside
        # runtime.full_weights, where a forward is local and ranks may make different numbers
        # of calls and steps
        out = model.generate(input_ids=input_ids[rows], attention_mask=mask[rows],
                             generation_config=gen_cfg, **{cache_arg: cache},
                             logits_processor=LogitsProcessorList([recorder]),
                             synced_gpus=False)
    finally:
        model.train(was_training)
    return out[:, width:]


def cache_kwarg(model) -> str:
    """The name of the forward's KV cache argument: transformers >= 5.24 names it `cache`
    (`past_key_values` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_cache(model, device, length: int):
    """The KV cache of a generate call, sized for it: each full-attention layer's keys and values
    in one buffer of the call's final length (prompt width + new tokens), written in place from
    the first decode step on. HF's DynamicCache grows by concatenation: a copy of the layer's
    whole cache at every decode step, and a second copy held while it is made. Keys and values
    are stored in the compute dtype: under autocast the residual stream is fp32 (DDP: fp32
    weights; FSDP: runtime.shard_fsdp), and keys leave rotary embeddings (and Qwen3's k_norm) in
    fp32 beside bf16 values, 1.5x the memory, cast back by attention at every step.
    Sliding-window layers keep HF's own (they drop what leaves the window)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    device = torch.device(device).type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _in_place_layer()(length, dtype)
    return cache


@functools.cache
def _in_place_layer():
    """transformers' DynamicLayer (one attention layer's cache), written in place into a buffer
    of the call's final length from the first decode step on: `keys` and `values` are views of
    its first `length` positions. Before, the prompt's keys and values are kept as they come: a
    buffer made before the prefill would sit beside the prefill's activations. (A class made on
    first use: transformers is imported only when a model is.)"""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def __init__(self, capacity: int, dtype):
            super().__init__()
            self.capacity, self.dtype, self.length, self.buffers = capacity, dtype, 0, None

        def update(self, key_states, value_states, *args, **kwargs):
            new = [t.to(self.dtype or t.dtype) for t in (key_states, value_states)]
            if not self.is_initialized:
                self.lazy_initialization(*new)
                self.keys, self.values = new
                self.length = new[0].shape[-2]
                return self.keys, self.values
            if self.buffers is None:
                b, h, _, d = self.keys.shape
                self.buffers = [t.new_empty(b, h, self.capacity, d) for t in new]
                for buffer, states in zip(self.buffers, (self.keys, self.values)):
                    buffer[:, :, :self.length] = states
            start, self.length = self.length, self.length + new[0].shape[-2]
            for buffer, states in zip(self.buffers, new):
                buffer[:, :, start:self.length] = states
            self.keys, self.values = (t[:, :, :self.length] for t in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.buffers is None:
                return super().batch_select_indices(indices)
            self.buffers = [t[indices] for t in self.buffers]
            self.keys, self.values = (t[:, :, :self.length] for t in self.buffers)

    return InPlaceLayer


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, cfg, device, shard=(0, 1), grade=None,
                    modes=("unguided", "guided")) -> dict:
    """Greedy accuracy on held-out problems, unguided and (rows with a usable strategy) guided.
    cfg: sgpo.py's Config (prompts, dtype, max_completion_length, generation_batch_size,
    reward_timeout); shard: (rank, world), this rank's rows, summed over ranks; grade: a Grader
    (default: in this process)."""
    counts, grade = [], grade or Grader(0, cfg.reward_timeout)
    rank, world = shard
    for guided in [mode == "guided" for mode in modes]:
        rows = [q for q in problems[rank::world] if not guided or has_usable_strategy(q)]
        with autocast(cfg.dtype, device):
            prompts = [prompt_ids(tokenizer, cfg, q, guided) for q in rows]
            outs = generate(model, prompts, tokenizer.pad_token_id,
                            model.generation_config.eos_token_id, device, 0.0,
                            cfg.max_completion_length, batch_size=cfg.generation_batch_size)
        texts = [tokenizer.decode(o["ids"], skip_special_tokens=True) for o in outs]
        counts += [sum(grade(texts, [q["answer"] for q in rows])), len(rows)]
    c = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    result = {}
    for k, mode in enumerate(modes):
        if c[2 * k + 1]:
            result[f"eval/{mode}_acc"] = c[2 * k] / c[2 * k + 1]
    return result


def first_eos_lengths(completions, eos_ids):
    """[N, T] sampled ids -> response lengths up to AND including the first EOS, and truncation
    flags. Positions, not pad ids, define the mask: with pad == eos a pad-based mask would drop the
    real EOS."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, completions.shape[1])
    return lengths.tolist(), (~has_eos).tolist()
