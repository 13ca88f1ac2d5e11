"""
What sgpo.py's loop runs on, apart from the method: the process group (one file runs under `python`
and `torchrun`), mixed precision, the optimizer, DDP or FSDP2 around the model, collectives that
are no-ops in one process, metrics reduced over ranks, the output folder, and checkpoints (written
whole or not at all, checked for damage, resumed exactly).

Ranks get uneven work (held-out problems that do not divide by the world size, prompts and
responses of other lengths, a rank without KD targets or GRPO rows) and must still make the same
collectives in the same order: under FSDP every forward outside full_weights is one, and a rank
that makes one more waits forever (or pairs with another rank's next collective). Every choice
that sets how many collectives a rank makes is one of two kinds (tests/test_uneven_work.py):
- the same on every rank by construction:
  - optimizer steps, mini-batches and warm-up batches: from flags (rank_batches drops the last
    partial batch, so every rank has batch_size problems);
  - forward/backward passes of a step: lockstep, the most any rank has (a rank out of rows makes
    passes on a zero-weight filler row, its teacher's forward included);
  - --generate_by_mode auto: decided at the longest prompt over ranks (engine.sample_in_one_call);
  - metrics: Stats.reduce gathers the union of the ranks' names;
- free to differ, because no collective runs inside: generate calls, target scoring, the pi_old
  pass and the held-out evaluation all run inside full_weights (FSDP: every unit gathered once
  before, so a forward is local), and generate is called with synced_gpus=False (transformers
  turns it on by itself for an FSDP-managed module: a collective per decode step, until the
  slowest rank ends); DDP's forward without gradient and the frozen reference (--beta) are local
  anyway.
"""
import datetime
import glob
import itertools
import json
import math
import os
import random
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from inputs import UsageError, check_writable_dir


# ==== The process group and mixed precision.
def setup_distributed(timeout_s: int = 1800):
    """DDP preamble: the same file runs under `python` (rank 0 of 1) and `torchrun` (NCCL on GPU,
    gloo on CPU). Returns (ddp, rank, world size, device). timeout_s: how long a collective waits
    for the slowest rank."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    # Imported after init (by transformers' from_pretrained), this module holds the process group,
    # whose gloo threads then outlive destroy_process_group() and can abort the interpreter's exit.
    # Imported first, it holds nothing.
    __import__("torch.distributed.checkpoint")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def compute_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a GPU that supports it natively, else fp32 (V100 and T4 only emulate bf16)."""
    auto = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if name == "bf16" or (name == "auto" and auto) else torch.float32


def autocast(dtype_name: str, device):
    """Mixed precision: forwards (generation, scoring, teacher, student) compute in the compute
    dtype over the fp32 weights; log-softmax, KL and losses are fp32 by explicit casts; backward
    runs outside (as torch recommends)."""
    dtype = compute_dtype(dtype_name)
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


# ==== The optimizer: AdamW over the fp32 master weights.
def make_optimizer(lm, lr, cfg):
    """AdamW over the fp32 master weights, with a linear warm-up of cfg.warmup_steps."""
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return optimizer, scheduler


def optimizer_step(lm, opt, cfg):
    """Clip, step, zero; returns the gradient norm before clipping."""
    optimizer, scheduler = opt
    grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # FSDP: a DTensor
    return number(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


# ==== DDP or FSDP2 around the model.
def wrap(backbone, cfg, ddp: bool, device):
    """The module whose backward syncs gradients over ranks: FSDP2 shards (cfg.fsdp), DDP replicates
    (under torchrun), or the backbone itself (one process)."""
    if cfg.fsdp:
        return shard_fsdp(backbone, compute_dtype(cfg.dtype), device)
    if ddp:
        return DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None)
    return backbone


def shard_fsdp(backbone, param_dtype, device, materialize=None):
    """FSDP2: every decoder layer is one unit, the Backbone (embeddings, final norm, LM head) the
    root. (fully_shard on the HF model itself fails: Backbone calls get_decoder(), bypassing that
    root's hooks.) Shards stay fp32; forwards all-gather them in the compute dtype and gradients are
    reduce-scattered in fp32. The weights are rank 0's: the other ranks' models may be on the meta
    device (engine.load_policy), and get their shards from rank 0's (load_from_rank0).
    materialize(backbone), instead: gives a model built on the meta device its storage once
    sharded (tests/memory_plan.py --simulate: fake tensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the residual stream in fp32, as under DDP (autocast over fp32 weights): no cast of a layer's
    # inputs, and the embedding's output (a lookup in the gathered compute-dtype weights) cast
    # back to fp32; matmuls compute in param_dtype alike (docs/memory_and_speed.md)
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
    backbone.lm.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out.float())
    kw = dict(mesh=init_device_mesh(device.type, (dist.get_world_size(),)), mp_policy=mp_policy)
    # rank 0's full weights, held until every rank has its shards
    full = backbone.state_dict() if materialize is None and get_rank() == 0 else {}
    for layer in backbone.lm.get_decoder().layers:
        fully_shard(layer, **kw)
    fully_shard(backbone, **kw)
    if materialize:
        materialize(backbone)
    else:
        load_from_rank0(backbone, full, device)
        del full
    # FSDP makes the first module to run forward the root: the Backbone, not a layer
    # (under autocast, as every forward: a layer's fp32 inputs meet its gathered weights)
    low = param_dtype != torch.float32
    with torch.no_grad(), torch.autocast(device.type, dtype=param_dtype, enabled=low):
        backbone(*torch.ones((3, 1, 1), dtype=torch.long, device=device))  # ids, mask, positions
    # the root keeps its weights gathered after a forward: the optimizer must get the shards
    backbone.reshard()
    return backbone


def load_from_rank0(backbone, full: dict, device):
    """A sharded backbone's weights from rank 0 (full: its state dict taken before sharding; {} on
    the other ranks, whose models may be on the meta device): torch broadcasts one tensor at a
    time and each rank keeps its shard, so that a rank other than 0 never holds the full model.
    Buffers outside a state dict (rotary frequencies) are broadcast too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if any(t.device.type == "meta" for t in itertools.chain(backbone.parameters(),
                                                           backbone.buffers())):
        backbone.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(backbone, full, options=options)
    for buffer in backbone.buffers():
        dist.broadcast(buffer, src=0)


@contextmanager
def full_weights(*models):
    """FSDP: all-gather every unit of the models once and keep the full (compute-dtype) weights
    until the block ends, so that the forwards of generate, scoring and evaluation are local: ranks
    may run different numbers of them (no collective; engine passes synced_gpus=False to generate).
    Costs one full copy of the weights per GPU while it lasts. DDP and one process: nothing."""
    roots, units = list(dict.fromkeys(models)), []
    for model in roots:
        units += [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            # FSDP's default: the root keeps its weights
            m.set_reshard_after_forward(m not in roots, recurse=False)


def reshard(model):
    """FSDP: every unit back to its shards. A root keeps its weights gathered after a forward (for
    its backward); a model that runs no backward (the teacher) is resharded here."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def lockstep(micro_batches: list, filler, model, device):
    """The distributed lockstep of one optimizer step's forward/backward passes, in one place, so
    that the loss reads as single-process code. Yields (micro-batch, True) for each of this rank's,
    then (filler, False) until every rank is done; the caller runs its forward and backward(loss)
    before the next, on a filler a loss of zero gradient through every parameter whose statistics
    it drops. Why:
    - every rank makes the same number of passes (the most any rank has): under FSDP every forward
      is a collective (a rank that stops early hangs the others), and DDP reduces gradients over
      every rank's backward, of every parameter;
    - DDP all-reduces gradients on the last backward of the step only (no_sync before), FSDP
      reduce-scatters every backward (unsharded gradients would not fit);
    - the token weights are normalised over the global batch, while DDP and FSDP average
      gradients over ranks: backward() scales the loss by the world size."""
    n = int(all_reduce(torch.tensor(len(micro_batches), device=device), dist.ReduceOp.MAX))
    for i in range(n):
        sync = model.no_sync() if isinstance(model, DDP) and i < n - 1 else nullcontext()
        with sync:
            yield (micro_batches[i], True) if i < len(micro_batches) else (filler, False)


def backward(loss: torch.Tensor):
    """loss.backward() with the world-size scaling of lockstep: DDP and FSDP average gradients
    over ranks, and the loss's weights already sum over all of them."""
    (loss * world_size()).backward()


def rank_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list:
    """This rank's batches of item indices for an epoch: DistributedSampler's shuffled shard, the
    same order on resume; a last partial batch is dropped."""
    sampler = DistributedSampler(range(n_items), num_replicas=world_size(), rank=get_rank(),
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]


# ==== Collectives (no-ops in one process) and metrics over ranks.
def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def number(x) -> float:
    """float(x); 0.0 for a fake tensor (tests/memory_plan.py --simulate runs the step on tensors
    without data: what they would hold is not needed there)."""
    return 0.0 if isinstance(x, torch.Tensor) and is_fake(x) else float(x)


class Stats:
    """Metrics reduced over ranks at log time: a mean (sum / count), a global sum (count 0) or a
    maximum."""

    def __init__(self):
        self.sums, self.counts, self.maxes = {}, {}, {}

    def add(self, name, value, count=1):
        value = number(value.sum()) if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0.0) + count

    def max(self, name, value):
        self.maxes[name] = max(self.maxes.get(name, -math.inf), number(value))

    def merge(self, other):
        """Adds other's sums and counts to this one's, and takes the larger maxima."""
        for name, value in other.sums.items():
            self.add(name, value, other.counts[name])
        for name, value in other.maxes.items():
            self.max(name, value)

    def reduce(self, device) -> dict:
        # Ranks may hold different names (a rank with no KD target has no KD metrics): reduce over
        # the union.
        keys = sorted(set().union(*all_gather_objects(sorted(self.sums))))
        max_keys = sorted(set().union(*all_gather_objects(sorted(self.maxes))))
        pairs = [[self.sums.get(k, 0.0), self.counts.get(k, 0.0)] for k in keys] or [[0.0, 0.0]]
        sc = all_reduce(torch.tensor(pairs, device=device, dtype=torch.float64))
        maxes = [self.maxes.get(k, -math.inf) for k in max_keys] or [0.0]
        mx = all_reduce(torch.tensor(maxes, device=device, dtype=torch.float64), dist.ReduceOp.MAX)
        out = {}
        for i, k in enumerate(keys):
            out[k] = (sc[i, 0] / sc[i, 1] if sc[i, 1] > 0 else sc[i, 0]).item()
        out.update({k: mx[i].item() for i, k in enumerate(max_keys)})
        return out


# ==== The output folder: a run's checkpoints and metrics.jsonl.
def has_metrics(output_dir: str) -> bool:
    """Does output_dir's metrics.jsonl hold lines? (An empty one holds nothing.)"""
    path = os.path.join(output_dir, "metrics.jsonl")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def check_output_dir(output_dir: str, resume, overwrite: bool):
    """Before anything runs: refuse to start a fresh run over an earlier one (unless overwrite), and
    check that the folder can be written."""
    if not resume and not overwrite and (latest_checkpoint(output_dir) or has_metrics(output_dir)):
        raise UsageError(f"--output_dir {output_dir}: already holds a run; pass --resume or "
                         "--overwrite_output_dir")
    check_writable_dir(output_dir, "--output_dir")


def prepare_output_dir(output_dir: str, resumed_step):
    """Rank 0, once the run starts: a fresh run (resumed_step None) removes every checkpoint (none
    stale may be resumed later) and empties metrics.jsonl and completions.jsonl; a resumed one
    removes the partial checkpoint of the killed run and the lines of both written after the
    checkpoint it resumes. Returns the path of metrics.jsonl."""
    os.makedirs(output_dir, exist_ok=True)
    for d in os.listdir(output_dir):
        if d.startswith("checkpoint-") and (resumed_step is None or d.endswith(".tmp")):
            shutil.rmtree(os.path.join(output_dir, d))
    for name in ("metrics.jsonl", "completions.jsonl"):
        path, kept = os.path.join(output_dir, name), []
        if resumed_step is not None and os.path.exists(path):
            for line in open(path):
                if json.loads(line).get("step", 0) <= resumed_step:
                    kept.append(line)
        # (completions.jsonl only where --log_completions wrote one)
        if os.path.exists(path) or name == "metrics.jsonl":
            with open(path, "w") as f:
                f.writelines(kept)
    return os.path.join(output_dir, "metrics.jsonl")


# ==== Checkpoints: model + tokenizer (save_pretrained) and trainer state, written to a temp dir
# then renamed; a kill or a power cut can leave the newest one damaged, so resume checks them.
def save_checkpoint(cfg, policy, opt, state: dict, keep=None):
    """state: step, epoch, position, alpha, sft_done. RNG states of every rank are gathered into it.
    The weights are the fp32 master weights (an exact resume needs them); under FSDP they are
    gathered to rank 0's CPU, and every rank writes its shard of the optimizer state
    (torch.distributed.checkpoint: loadable on another world size). opt: (optimizer, scheduler).
    Once it is whole, --save_total_limit removes older ones (remove_old_checkpoints), never keep
    (the checkpoint this run resumed from)."""
    optimizer, scheduler = opt
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    rng = all_gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                              "cuda": cuda_rng})
    master = get_rank() == 0
    final = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
    tmp, weights = final + ".tmp", None
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if cfg.fsdp:
            weights = _save_fsdp_shards(policy.wrapped, optimizer, tmp)
        if policy.teacher:
            # --teacher base/ema: its own fp32 weights, in teacher/ (gathered like the policy's)
            t_weights = _gathered_weights(policy.teacher.wrapped) if cfg.fsdp else None
            if master:
                policy.teacher.master_weights().save_pretrained(os.path.join(tmp, "teacher"),
                                                                state_dict=t_weights)
        if master:
            policy.lm.save_pretrained(tmp, state_dict=weights)
            policy.lm.original_generation_config.save_pretrained(tmp)
            policy.tokenizer.save_pretrained(tmp)
            # FSDP: the optimizer's shards are written above
            optim_state = {} if cfg.fsdp else {"optimizer": optimizer.state_dict()}
            trainer_state = {**state, **optim_state, "scheduler": scheduler.state_dict(),
                             "rng": rng, "config": asdict(cfg)}
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "sgpo_config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
            # safetensors writes its files readable by their owner only: the mode of the others
            readable_like(os.path.join(tmp, "sgpo_config.json"), tmp)
            sync_to_disk(tmp)  # (DCP syncs its own files)
        barrier()  # every rank's optimizer shard is written
        if master:
            # re-saving the same step (e.g. after a resume): replace it
            if os.path.exists(final):
                shutil.rmtree(final)
            # atomic: a crash above leaves the previous checkpoint intact
            os.replace(tmp, final)
            sync_to_disk(cfg.output_dir, recursive=False)  # the rename itself
            remove_old_checkpoints(cfg.output_dir, state["step"], cfg.save_total_limit, keep)
    except BaseException:
        # a crash or Ctrl-C while writing: remove the partial folder (the earlier ones are whole)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def readable_like(reference: str, folder: str):
    """Every file under folder given reference's permission bits (the umask's: 0644 as a rule)."""
    mode = os.stat(reference).st_mode & 0o777
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def remove_old_checkpoints(output_dir: str, step: int, limit: int, keep=None):
    """--save_total_limit (HF's meaning): of the checkpoints up to checkpoint-<step>, the one just
    written, keep the newest `limit` (0: all) and `keep`, remove the others. Each is renamed to
    checkpoint-N.tmp first, which no resume takes and the next one clears: a crash while removing
    leaves no half-removed checkpoint for a resume to pick. Checkpoints of later steps (left by
    a run resumed from an earlier one) stay: this run rewrites them when it gets there."""
    if limit <= 0:
        return
    older = [p for p in checkpoints(output_dir) if int(p.rsplit("-", 1)[1]) <= step]
    kept = {os.path.realpath(keep)} if keep else set()
    for path in older[limit:]:
        if os.path.realpath(path) not in kept:
            os.replace(path, path + ".tmp")
            shutil.rmtree(path + ".tmp")


def _save_fsdp_shards(model, optimizer, folder):
    """FSDP: every rank writes its optimizer shards; returns the full fp32 weights (rank 0's CPU;
    empty on the other ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    full = _gathered_weights(model)
    # empty before the first step (checkpoint-0); get_optimizer_state_dict would step it
    if optimizer.state:
        shards = get_optimizer_state_dict(model, optimizer)
        dcp.save(shards, checkpoint_id=os.path.join(folder, "optimizer"))
    return full


def _gathered_weights(model):
    """FSDP: the full fp32 weights of a sharded Backbone, keyed as in its HF model (rank 0's CPU;
    empty on the other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    return {k.removeprefix("lm."): v for k, v in full.items()}


def seed_sampling(seed: int, rank: int, step: int):
    """Seed a rank's torch and Python RNGs (sampling, the mini-batch split) from (seed, rank,
    step): seed + rank as a run starts (step 0), other seeds on a resume at a later step."""
    value = seed + rank + 1_000_003 * step
    torch.manual_seed(value)
    random.seed(value)


def restore_checkpoint(path, saved, model, opt, state: dict, seed: int) -> dict:
    """Load a checkpoint's optimizer (FSDP: this rank's shards), scheduler and this rank's RNG
    states; return state updated from it. saved: the checkpoint's trainer_state.pt, loaded
    (resolve_resume); emptied once read (the CPU copy of the optimizer state is freed). opt:
    (optimizer, scheduler). On another world size the saved RNG states do not map to ranks: each
    rank is reseeded from (seed, rank, step)."""
    optimizer, scheduler = opt
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    elif os.path.isdir(os.path.join(path, "optimizer")):  # FSDP (none if saved before step 1)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        # initialises AdamW's state: dcp.load fills it in
        sharded = get_optimizer_state_dict(model, optimizer)
        dcp.load(sharded, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(model, optimizer, sharded)
    scheduler.load_state_dict(saved["scheduler"])
    rank, world = get_rank(), world_size()
    if len(saved["rng"]) == world:
        rng = saved["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        seed_sampling(seed, rank, saved["step"])
        if rank == 0:
            print(f"warning: checkpoint has {len(saved['rng'])} ranks' RNG states, this run "
                  f"{world}: sampling reseeded from (seed {seed}, rank, step {saved['step']})")
    state = {k: saved.get(k, v) for k, v in state.items()}
    saved.clear()
    return state


def interrupted_advice(output_dir: str) -> str:
    """Ctrl-C's one line: what is on disk and how to go on from it."""
    if latest_checkpoint(output_dir):
        return "the checkpoints in --output_dir are whole; continue with --resume"
    # (what check_output_dir refuses a fresh run over)
    if has_metrics(output_dir):
        return f"no checkpoint in {output_dir} yet: start over with --overwrite_output_dir"
    return f"no checkpoint in {output_dir} yet: run the same command again"


def checkpoints(output_dir: str) -> list:
    """The checkpoint-N folders of output_dir, newest (largest N) first; not the checkpoint-N.tmp
    being written."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [int(d[11:]) for d in names if d.startswith("checkpoint-") and d[11:].isdigit()]
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in sorted(steps, reverse=True)]


def latest_checkpoint(output_dir: str):
    return (checkpoints(output_dir) or [None])[0]


def sync_to_disk(path: str, recursive: bool = True):
    """fsync the files under path and the folders themselves. A rename is atomic, but a power cut
    after it can still leave the renamed folder's files empty or cut unless they were flushed to
    disk before."""
    for root, _, files in os.walk(path) if recursive else [(path, (), [])]:
        for p in [os.path.join(root, f) for f in files] + [root]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _safetensors_damage(path: str):
    """'name: damaged or cut short (N bytes)' unless the file is as long as its header says."""
    with open(path, "rb") as f:
        size, n = os.path.getsize(path), int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else {}
        except ValueError:  # UnicodeDecodeError included
            header = {}
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if not header or 8 + n + max(ends, default=0) != size:
        return f"{os.path.basename(path)}: damaged or cut short ({size} bytes)"
    return None


def checkpoint_damage(path: str):
    """'file: what is wrong' for a checkpoint folder, or None if it is whole: its files are there,
    the JSON files parse, and every *.safetensors file is as long as its header says (a cut write is
    shorter); the same for the weights in teacher/ where its run had a teacher of its own."""
    for name in ("trainer_state.pt", "sgpo_config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name}: missing"
    try:
        with open(os.path.join(path, "sgpo_config.json")) as f:
            teacher = json.load(f).get("teacher", "live")
    except ValueError:
        return "sgpo_config.json: not valid JSON"
    folders = ["", "teacher/"] if teacher != "live" else [""]
    for folder in folders:
        damage = _weights_damage(os.path.join(path, folder))
        if damage:
            return folder + damage
    optimizer = os.path.join(path, "optimizer")  # FSDP's shards (torch.distributed.checkpoint)
    if os.path.isdir(optimizer) and not os.path.isfile(os.path.join(optimizer, ".metadata")):
        return "optimizer/.metadata: missing"
    return None


def _weights_damage(path: str):
    """checkpoint_damage of one save_pretrained folder: config.json and the *.safetensors."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "config.json: missing"
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not weights:
        return "model.safetensors: missing"
    for w in weights:
        damage = _safetensors_damage(w)
        if damage:
            return damage
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except ValueError:
        return "config.json: not valid JSON"
    return None


# flags a resumed run must share with its checkpoint, and their value where a checkpoint was written
# before the flag existed: the optimizer state is saved sharded or whole (fsdp), the teacher's
# weights are saved or not (teacher)
SAME_ON_RESUME = {"fsdp": False, "teacher": "live"}


def resolve_resume(cfg):
    """--resume (a folder, or 'latest') -> (checkpoint folder, its trainer_state.pt loaded).
    'latest' takes the newest intact checkpoint-N of output_dir and warns (rank 0) of the damaged
    ones it passed over; a folder given by name must be intact. Its SAME_ON_RESUME flags must be
    this run's."""
    resume, output_dir = cfg.resume, cfg.output_dir
    latest = resume == "latest"
    paths = checkpoints(output_dir) if latest else [resume]
    if not paths or not os.path.isdir(paths[0]):
        if latest:
            raise UsageError(f"--resume: no checkpoint in {output_dir} "
                             "(to start over there: --overwrite_output_dir)")
        raise UsageError(f"--resume {resume}: not a folder")
    damaged = []
    for path in paths:
        damage = checkpoint_damage(path)
        if damage is None:
            try:
                saved = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu",
                                   weights_only=False)
                break
            except Exception as e:  # a cut zip archive, an empty file, a pickle error
                damage = f"trainer_state.pt: cannot be loaded ({type(e).__name__})"
        if not latest:
            raise UsageError(f"--resume {resume}: {damage}")
        damaged.append(f"{path}/{damage}")
    else:
        raise UsageError(f"--resume: no whole checkpoint in {output_dir} ({'; '.join(damaged)}); "
                         "to start over: --overwrite_output_dir")
    with open(os.path.join(path, "sgpo_config.json")) as f:
        written = json.load(f)
    for name, old in SAME_ON_RESUME.items():
        value = written.get(name, old)
        if value != getattr(cfg, name):
            value = str(value).lower() if isinstance(value, bool) else value
            raise UsageError(f"--resume {path}: written with --{name} {value}; resume with it")
    if damaged and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --resume: passed over {'; '.join(damaged)}; resuming from {path}",
              file=sys.stderr)
    return path, saved
