"""
One RL step of sgpo.py at a model's full size, simulated on a CPU: rank 0 of a fake process group
of any world size, every tensor a fake one (a shape, a dtype, no storage), the project's own code
for each phase, and the bytes it holds measured as it runs (`python tests/memory_plan.py
--simulate`; tests/test_simulate.py checks the measurement against real tensors at a tiny size).

What stands in for what:
- the weights: the config's model built on the meta device, given fake storage, wrapped by the
  project's runtime.wrap (FSDP2 sharded as runtime.shard_fsdp shards it, or DDP), activation
  checkpointing as the flags say; the compute dtype is bf16 (the GPU run's "auto");
- generation: engine.generate's own stopping check reads data, which fake tensors refuse. The
  phase runs what its peak holds: the weights as full_weights gathers them, the prompts' prefill
  into the engine's KV cache (engine._kv_cache: keys and values in the compute dtype, in buffers
  of the call's final length), generation_batch_size sequences; the cache filled to that length
  (prompt + max_completion_length) by appending keys and values, as the decode steps append them;
  then one decode step: its [B, 1, V] logits, the sampler's log-softmax and the draw;
- target scoring: sgpo.response_logps on micro-batches of the longest pairs;
- the update: sgpo.accumulate_gradients on micro_batch_size GRPO and KD rows of the longest length
  (prompt + max_completion_length; the teacher's forward included), then sgpo.optimizer_step
  (AdamW's state created, on the foreach path a GPU takes). Two micro-batches: the second one meets
  the first one's gradients.
Bytes: every storage made while a phase runs, alive or freed (LiveBytes), on top of what was
already resident (the parameters, gradients, AdamW state, measured), in the steady state of the
second step on (one update runs first, unmeasured: AdamW's state exists in every phase); the
update's activations saved for backward in a pass of their own (a saved_tensors_hooks pack hook
marks them), split off the rest of its peak. The CUDA
caching allocator's rounding and fragmentation are not modelled: docs/memory_and_speed.md states a
margin.
"""

import os
import sys
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402
import runtime  # noqa: E402
import sgpo  # noqa: E402

GB = 1e9
DDP_BUCKETS = "DDP gradient buckets (closed form: 4 bytes a parameter)"
SAVED = "activations saved for backward"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made while it is active and still alive (DTensors counted by their
    local shards): `now`, `peak`, and at the peak the bytes per label (the label current when
    each was made). A view op's output, and an op's output that shares an input's storage (an
    in-place op), are not new; a storage resized while active (FSDP2 gathers a unit's weights
    into storage it resizes from 0, and frees them by resizing back) counts by its size."""

    def __init__(self, mark_saved=False):
        super().__init__()
        self.now, self.peak, self.label, self.mark_saved = 0, 0, "", mark_saved
        self.live, self.by_label, self.at_peak = {}, {}, {}

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize(storage, size):
            before = storage.nbytes()
            result = tracker._resize(storage, size)
            tracker._grow(storage._cdata, storage.nbytes() - before)
            return result

        torch.UntypedStorage.resize_ = resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which this sees
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            # a view makes no storage (a fake tensor's view of FSDP2's gathered weight can carry
            # a storage object of its own: the LM head's transpose counted 1.1 GB at 7B)
            return out
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                if t.untyped_storage()._cdata not in inputs:
                    self._track(t)
        return out

    def saved_for_backward(self, t):
        """A saved_tensors_hooks pack hook: the storage of t, made by this phase's compute, counts
        as SAVED from now on (not a checkpointed layer's: its own hooks keep nothing until the
        backward recomputes it, which this leaves among the temporaries)."""
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1] == self.label:
            self.by_label[entry[1]] -= entry[0]
            self.by_label[SAVED] = self.by_label.get(SAVED, 0) + entry[0]
            entry[1] = SAVED
        return t

    def _track(self, t):
        """A storage counts once, however many tensors share it, until the last of them dies."""
        key = t.untyped_storage()._cdata
        if key not in self.live:
            self.live[key] = [0, self.label, 0]
            self._grow(key, t.untyped_storage().nbytes())
        self.live[key][2] += 1
        weakref.finalize(t, self._free, key)

    def _grow(self, key, n):
        if key not in self.live:
            if n <= 0:
                return  # a storage made before and shrunk (fake tensors' own bookkeeping)
            # made before, grown now (FSDP2's gathered weights): counted until shrunk to 0
            self.live[key] = [0, self.label, None]
        entry = self.live[key]
        entry[0] += n
        self.now += n
        self.by_label[entry[1]] = self.by_label.get(entry[1], 0) + n
        if self.now > self.peak:
            self.peak, self.at_peak = self.now, dict(self.by_label)
        if entry[2] is None and entry[0] <= 0:
            del self.live[key]

    def _free(self, key):
        entry = self.live[key]
        entry[2] -= 1
        if entry[2] == 0:
            self._grow(key, -entry[0])
            del self.live[key]


def tensor_bytes(tensors) -> int:
    """Bytes of tensors' elements (a DTensor: its local shard; FSDP's shards are views into
    larger buffers, which the phases' LiveBytes count)."""
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def resident(policy, optimizer) -> dict:
    """The bytes that live across phases: parameters, gradients, AdamW state, the teacher's own
    weights (--teacher base/ema)."""
    params = list(policy.lm.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    teacher = policy.teacher.lm.parameters() if policy.teacher else []
    return dict(parameters=tensor_bytes(params),
                gradients=tensor_bytes(p.grad for p in params if p.grad is not None),
                optimizer_state=tensor_bytes(s for s in state if s.dim() > 0),
                teacher=tensor_bytes(teacher))


@contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks, this process rank 0: collectives return at once."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), "0"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        del os.environ["WORLD_SIZE"], os.environ["RANK"]


def build_policy(config, cfg, tokenizer, mode, teacher=False):
    """The model of `config` as sgpo.py trains it: fp32 weights (with a FakeTensorMode: built on
    meta and given fake storage once sharded; else real random ones), activation checkpointing per
    the flags, wrapped by runtime.wrap over the process group (outside the fake mode: a device
    mesh cannot be built inside it). teacher: as sgpo.setup builds a teacher of its own weights
    (frozen, sharded under FSDP, else bare)."""
    fake = mode is not None
    from transformers import AutoModelForCausalLM
    device = torch.device("cpu")
    with torch.device("meta" if fake else "cpu"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.generation_config.eos_token_id = [tokenizer.eos_token_id]
    if teacher:
        lm.requires_grad_(False)
    elif cfg.gradient_checkpointing:
        engine.enable_activation_checkpointing(lm)

    def materialize(module):
        if fake:
            with mode:
                give_storage(module, device)

    def wrap(backbone):
        if cfg.fsdp:
            return runtime.shard_fsdp(backbone, runtime.compute_dtype(cfg.dtype), device,
                                      materialize)
        materialize(backbone)
        # DDP's reducer reads its parameters' data when built, which fake tensors lack: the
        # backbone runs bare, and the reducer's gradient buckets (an fp32 copy of the gradients)
        # are added to the update (DDP_BUCKETS)
        return runtime.wrap(backbone, cfg, dist.is_initialized() and not (fake or teacher),
                            device)

    return sgpo.Policy.of(lm, tokenizer, device, wrap)


def give_storage(module, device):
    """Every meta parameter and buffer of module given (here: fake) storage on device. Sharded by
    FSDP: module.to_empty. Else each replaced, tied ones kept tied (to_empty would swap them in
    place, which fails on an unsharded HF model under fake mode)."""
    if any(isinstance(p, DTensor) for p in module.parameters()):
        module.to_empty(device=device)
        return
    new = {}
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                p.requires_grad)
            setattr(sub, name, new[id(p)])
        for name, b in list(sub.named_buffers(recurse=False)):
            sub.register_buffer(name, torch.empty_like(b, device=device))


def longest_rows(cfg, prompt_tokens: int, token: int, device):
    """micro_batch_size x 2 rows of the longest length: GRPO and KD rows alternating (KD rows with
    a guided prompt as long), pi_old stored as sgpo.take_pi_old stores it (that pass: the scoring
    phase's, sgpo.response_logps under the gathered weights)."""
    n = cfg.max_completion_length
    rows = []
    for i in range(2 * cfg.micro_batch_size):
        # padded, as real micro-batches are (scoring_phase)
        prompt, response = [token] * (prompt_tokens - i), [token] * n
        if i % 2:
            rows.append(sgpo.KDRow(prompt, response, 1.0, teacher_prompt=[token] * prompt_tokens))
        else:
            rows.append(sgpo.GRPORow(prompt, response, 1.0, advantage=1.0,
                                     sampler_logps=torch.zeros(n)))
        rows[-1].old_logps = torch.zeros(n, device=device)
    return rows


def generation_phase(policy, cfg, prompt_tokens: int, tracker):
    """Generation's peak: gathered weights, the prompts' prefill into the engine's KV cache, the
    cache filled to its final length, one decode step (logits, log-softmax, draw)."""
    lm, dev = policy.lm, policy.device
    batch = cfg.generation_batch_size or cfg.batch_size * (cfg.num_generations
                                                           + cfg.num_guided_generations)
    tracker.label = "gathered weights"
    # as rl_step gathers them: the policy's, and the teacher's where it samples the guided rollouts
    samplers = policy.wrapped, sgpo.guided_sampler(policy, cfg).wrapped
    with torch.no_grad(), runtime.full_weights(*samplers), runtime.autocast(cfg.dtype, dev):
        tracker.label = "prompts' prefill"
        cache = engine._kv_cache(lm, dev, prompt_tokens + cfg.max_completion_length)
        ids = torch.ones((batch, prompt_tokens), dtype=torch.long, device=dev)
        # left padding, as the engine pads prompts of different lengths (scoring_phase)
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        lm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
           **{engine.cache_kwarg(lm): cache})
        tracker.label = "KV cache"
        kv, head_dim = engine.kv_heads_and_dim(lm.config)
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) \
            else torch.float32
        # the decode steps append a position at a time; here 256 at a time (what stands in for
        # a step's keys and values stays small next to the cache)
        for layer in range(lm.config.num_hidden_layers):
            for start in range(0, cfg.max_completion_length - 1, 256):
                n = min(256, cfg.max_completion_length - 1 - start)
                new = torch.ones((batch, kv, n, head_dim), dtype=dtype)
                cache.update(new, new.clone(), layer)
        tracker.label = "decode step"
        mask = torch.ones((batch, prompt_tokens + cfg.max_completion_length), dtype=torch.long)
        mask[0, 0] = 0
        logits = lm(input_ids=ids[:, :1], attention_mask=mask, use_cache=True,
                    **{engine.cache_kwarg(lm): cache}).logits
        log_p = (logits[:, -1].float() / cfg.temperature).log_softmax(-1)
        torch.multinomial(log_p.exp(), 1)
        # the engine's layers write into buffers of the final length; sliding-window ones grow
        return tensor_bytes([t for layer in cache.layers
                             for t in getattr(layer, "buffers", (layer.keys, layer.values))])


def simulate(config, cfg, prompt_tokens: int = 512, fake: bool = True) -> dict:
    """One step's phases under the current process group (fake_world, or none: one process).
    Returns per phase its peak bytes and, at that peak, the bytes per label on top of the resident
    parameters / gradients / AdamW state; and those resident bytes."""
    from toy.tiny import build_tokenizer
    from torch._subclasses.fake_tensor import FakeTensorMode
    tokenizer = build_tokenizer()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    out = {}
    policy = build_policy(config, cfg, tokenizer, mode)
    if cfg.teacher != "live":
        policy.teacher = build_policy(config, cfg, tokenizer, mode, teacher=True)
    with mode or nullcontext():
        opt = sgpo.make_optimizer(policy.lm, cfg.learning_rate, cfg)
        # AdamW's path on a GPU, foreach (the CPU's default is the single-tensor one): its step
        # makes whole-list temporaries (one more fp32 copy of the gradients' size)
        for group in opt[0].param_groups:
            group["foreach"] = True
        phases = [
            ("generation", lambda t: out.update(kv_cache=generation_phase(
                policy, cfg, prompt_tokens, t))),
            ("scoring", lambda t: scoring_phase(policy, cfg, prompt_tokens, t)),
            ("update", lambda t: update_phase(policy, opt, cfg, prompt_tokens, t, out)),
        ]
        # the steady state, as from the second step on: AdamW's state exists in every phase
        update_phase(policy, opt, cfg, prompt_tokens, LiveBytes(), {})
        for name, run in phases:
            start = resident(policy, opt[0])
            tracker = LiveBytes()
            with tracker:
                run(tracker)
            out[name] = dict(peak=sum(start.values()) + tracker.peak, resident=start,
                             at_peak={k: v for k, v in tracker.at_peak.items() if v})
        # FLOPs in a second pass: the counter keeps tensors alive that the first pass must not see
        for name, run in phases:
            flops = FlopCounterMode(display=False)
            with flops:
                run(LiveBytes())
            out[name]["flops"] = flops.get_total_flops()
        # and the update's activations saved for backward at its peak, in a third pass
        tracker = LiveBytes(mark_saved=True)
        with tracker:
            update_phase(policy, opt, cfg, prompt_tokens, tracker, {})
        out["update"]["saved"] = tracker.at_peak.get(SAVED, 0)
        if fake and not cfg.fsdp and dist.is_initialized():
            out["update"]["at_peak"][DDP_BUCKETS] = out["gradients"]
            out["update"]["peak"] += out["gradients"]
        out["resident"] = resident(policy, opt[0])
    return out


def categories(out, phase) -> dict:
    """A phase's peak split by what holds it: parameters, gradients, AdamW state (resident, or the
    gradients made in the update), the teacher's own weights, the gathered weights (FSDP:
    full_weights), the KV cache
    (generation: at its final length), DDP's buckets, the activations saved for backward (the
    update) and the rest: temporaries (and the recomputed layer's activations)."""
    r = out[phase]
    parts = {"parameters": r["resident"]["parameters"],
             "teacher weights": r["resident"]["teacher"],
             "gradients": out["gradients"] if phase == "update" else 0,
             "optimizer state": r["resident"]["optimizer_state"],
             "gathered weights": r["at_peak"].get("gathered weights", 0),
             "KV cache": out["kv_cache"] if phase == "generation" else 0,
             "DDP buckets": r["at_peak"].get(DDP_BUCKETS, 0)}
    rest = r["peak"] - sum(parts.values())
    parts["saved activations"] = min(r.get("saved", 0), rest)
    parts["temporaries"] = rest - parts["saved activations"]
    return parts


def scoring_phase(policy, cfg, prompt_tokens: int, tracker):
    """Target selection's scoring: sgpo.response_logps over a micro-batch of the longest pairs,
    under the gathered weights."""
    # one prompt a token shorter: real batches are padded, and with padding HF builds the
    # attention mask that fake tensors always make it build (it cannot look for padding in them)
    pairs = [([1] * (prompt_tokens - (i > 0)), [1] * cfg.max_completion_length)
             for i in range(cfg.micro_batch_size)]
    tracker.label = "gathered weights"
    with runtime.full_weights(policy.wrapped), runtime.autocast(cfg.dtype, policy.device):
        tracker.label = "scoring forward"
        sgpo.response_logps(policy, pairs, cfg)


def update_phase(policy, opt, cfg, prompt_tokens: int, tracker, out):
    """Two micro-batches of the longest rows through sgpo.accumulate_gradients, then
    sgpo.optimizer_step."""
    policy.wrapped.train()
    tracker.label = "forward and backward"
    # tracker.mark_saved: a pass of its own (the hook itself holds more at full size under FSDP:
    # +1.1 GB at 7B, measured, so the peak comes from a pass without it)
    hooks = (torch.autograd.graph.saved_tensors_hooks(tracker.saved_for_backward, lambda t: t)
             if tracker.mark_saved else nullcontext())
    with hooks:
        rows = longest_rows(cfg, prompt_tokens, 1, policy.device)
        sgpo.accumulate_gradients(policy, rows, cfg, runtime.Stats())
    out["gradients"] = tensor_bytes(p.grad for p in policy.lm.parameters() if p.grad is not None)
    tracker.label = "optimizer step"
    sgpo.optimizer_step(policy.lm, opt, cfg)
    if policy.teacher:
        # as update_policy moves it (the teacher's root, gathered by its forwards, resharded)
        sgpo.move_teacher(policy, cfg.teacher_ema_rate if cfg.teacher == "ema" else 0.0)
