"""
The model as the scripts run it, shared by sgpo.py, evaluate.py and extract_strategies.py: prompts
in the chat format, model loading, the training forward without the LM head (`Backbone`), and the
generation engine: batched sampling that records the sampler's log-probs, prefills each distinct
prompt once and cuts every response at its first EOS.
"""
import re

import torch

from inputs import UsageError

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


def load_model(path: str, dtype, device, check=None):
    """Tokenizer and model; check(tokenizer, model config) validates data before the weights load
    (minutes for 7B)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # prompts are chat-templated: fail here, not at the first prompt of the run
        if not tokenizer.chat_template:
            raise UsageError(f"--model {path}: its tokenizer has no chat template "
                             "(an instruct/chat model is needed)")
        if check:
            check(tokenizer, AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200]
        raise UsageError(f"--model {path}: cannot load ({reason})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sampling must be exactly what the config says: the model's own generation defaults (e.g. a
    # repetition penalty) would otherwise leak into generate(). Kept aside and written back in
    # checkpoints.
    eos_ids = set()
    for eos in (model.generation_config.eos_token_id, model.config.eos_token_id,
                tokenizer.eos_token_id):  # each an id, a list of ids or None
        eos_ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    eos_ids = sorted(eos_ids - {None})
    model.original_generation_config = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=eos_ids,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


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

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        # correct under left and right padding
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        return out.last_hidden_state


def collate(pairs: list, pad_id: int):
    """(prompt, response) pairs -> right-padded input_ids, attention_mask [B, L] and the flat
    indices (into B*L) of the positions whose logits predict each response token, with those
    tokens [M]."""
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
    return input_ids, mask, torch.tensor(pred_idx), torch.tensor(targets)


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


def _generate_call(model, batch, pad_id, gen_cfg, recorder, device):
    """One HF generate call on the prompts of batch -> [N, T] sampled ids."""
    from transformers import DynamicCache, LogitsProcessorList
    distinct = {p: i for i, p in enumerate(dict.fromkeys(map(tuple, batch)))}  # prompt -> row
    width = max(len(p) for p in distinct)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in distinct],
                             device=device)  # [U, P]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=device)
    rows = torch.tensor([distinct[tuple(p)] for p in batch], device=device)  # [N]: its prompt's row
    was_training, cache = model.training, None
    # eval() also turns HF activation checkpointing off (it acts in training mode only), so the
    # KV cache works
    model.eval()
    try:
        # prefill each distinct prompt once, all but its last token (generate runs that one), then
        # copy its KV cache to the rows that share it
        if len(distinct) < len(batch) and width > 1:
            cache = DynamicCache(config=model.config)
            position_ids = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
            model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache,
                  use_cache=True, position_ids=position_ids)
            cache.batch_select_indices(rows)
        out = model.generate(input_ids=input_ids[rows], attention_mask=mask[rows],
                             past_key_values=cache, generation_config=gen_cfg,
                             logits_processor=LogitsProcessorList([recorder]))
    finally:
        model.train(was_training)
    return out[:, width:]


def first_eos_lengths(completions, eos_ids):
    """[N, T] sampled ids -> response lengths up to AND including the first EOS, and truncation
    flags. Positions, not pad ids, define the mask: with pad == eos a pad-based mask would drop the
    real EOS."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    has_eos = is_eos.any(dim=1)
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, completions.shape[1])
    return lengths.tolist(), (~has_eos).tolist()
