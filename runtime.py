"""What sgpo.py's loop runs on, apart from the method: collectives that are no-ops in one process, metrics reduced
over ranks, FSDP2 sharding and full-weight gathering, and checkpoints (written whole or not at all, resumed exactly)."""
import json
import math
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from inputs import sync_to_disk


# ==== FSDP2 and collectives (no-ops in one process).
def shard_fsdp(backbone, param_dtype, device):
    """FSDP2: every decoder layer is one unit, the Backbone (embeddings, final norm, LM head) the root. (fully_shard on
    the HF model itself fails: Backbone calls get_decoder(), bypassing that root's hooks.) Shards stay fp32; forwards
    all-gather them in the compute dtype and gradients are reduce-scattered in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = dict(mesh=init_device_mesh(device.type, (dist.get_world_size(),)),
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    for layer in backbone.lm.get_decoder().layers:
        fully_shard(layer, **kw)
    fully_shard(backbone, **kw)
    with torch.no_grad():  # FSDP makes the first module to run forward the root: the Backbone, not a layer
        backbone(*torch.ones((2, 1, 1), dtype=torch.long, device=device))  # input_ids, attention_mask [1, 1]
    backbone.reshard()  # the root keeps its weights gathered after a forward: the optimizer must get the shards
    return backbone


@contextmanager
def full_weights(model):
    """FSDP: all-gather every unit once and keep the full (compute-dtype) weights until the block ends, so that the
    forwards of generate, scoring and evaluation are local: ranks may run different numbers of them (no collective,
    no synced_gpus). Costs one full copy of the weights per GPU while it lasts. DDP and one process: nothing."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's default: the root keeps its weights


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


class Stats:
    """Metrics reduced over ranks at log time: a mean (sum / count), a global sum (count 0) or a maximum."""

    def __init__(self):
        self.sums, self.counts, self.maxes = {}, {}, {}

    def add(self, name, value, count=1):
        value = float(value.sum()) if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0.0) + count

    def max(self, name, value):
        self.maxes[name] = max(self.maxes.get(name, -math.inf), float(value))

    def reduce(self, device) -> dict:
        # Ranks may hold different names (a rank with no KD target has no KD metrics): reduce over the union.
        keys, mkeys = (sorted(set().union(*all_gather_objects(sorted(d)))) for d in (self.sums, self.maxes))
        sc = all_reduce(torch.tensor([[self.sums.get(k, 0.0), self.counts.get(k, 0.0)] for k in keys] or [[0.0, 0.0]],
                                     device=device, dtype=torch.float64))
        mx = all_reduce(torch.tensor([self.maxes.get(k, -math.inf) for k in mkeys] or [0.0], device=device,
                                     dtype=torch.float64), dist.ReduceOp.MAX)
        out = {k: (sc[i, 0] / sc[i, 1] if sc[i, 1] > 0 else sc[i, 0]).item() for i, k in enumerate(keys)}
        out.update({k: mx[i].item() for i, k in enumerate(mkeys)})
        return out


# ==== Checkpoints: model + tokenizer (save_pretrained) and trainer state, written to a temp dir then renamed.
def save_checkpoint(cfg, model, raw_model, tokenizer, optimizer, scheduler, state: dict, master: bool):
    """state: step, epoch, position, alpha, sft_done. RNG states of every rank are gathered into it. The weights are
    the fp32 master weights (an exact resume needs them); under FSDP they are gathered to rank 0's CPU, and every
    rank writes its shard of the optimizer state (torch.distributed.checkpoint: loadable on another world size)."""
    rng = all_gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    final = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
    tmp, weights = final + ".tmp", None
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if cfg.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions as Opts, get_model_state_dict, get_optimizer_state_dict
            weights = {k.removeprefix("lm."): v for k, v in get_model_state_dict(
                model, options=Opts(full_state_dict=True, cpu_offload=True)).items()}  # rank 0 only
            if optimizer.state:  # empty before the first step (checkpoint-0); get_optimizer_state_dict would step it
                dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=os.path.join(tmp, "optimizer"))
        if master:
            raw_model.save_pretrained(tmp, state_dict=weights)
            raw_model.original_generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            optim_state = {} if cfg.fsdp else {"optimizer": optimizer.state_dict()}  # FSDP: the shards above
            torch.save({**state, **optim_state, "scheduler": scheduler.state_dict(), "rng": rng, "config": asdict(cfg)},
                       os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "sgpo_config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
            sync_to_disk(tmp)  # (DCP syncs its own files)
        barrier()  # every rank's optimizer shard is written
        if master:
            if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a crash above leaves the previous checkpoint intact
            sync_to_disk(cfg.output_dir, recursive=False)  # the rename itself
    except BaseException:  # a crash or Ctrl-C while writing: remove the partial folder (the earlier ones are whole)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()



def restore_checkpoint(path, saved, model, optimizer, scheduler, state: dict, fsdp: bool, rank, world, device) -> dict:
    """Load a checkpoint's optimizer (FSDP: this rank's shards), scheduler and this rank's RNG states; return state
    updated from it. saved: the checkpoint's trainer_state.pt, loaded (inputs.resolve_resume)."""
    if not fsdp:
        optimizer.load_state_dict(saved["optimizer"])
    elif os.path.isdir(os.path.join(path, "optimizer")):  # (none if saved before the first step)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        sharded = get_optimizer_state_dict(model, optimizer)  # initialises AdamW's state: dcp.load fills it in
        dcp.load(sharded, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(model, optimizer, sharded)
    scheduler.load_state_dict(saved["scheduler"])
    if len(saved["rng"]) == world:
        torch.set_rng_state(saved["rng"][rank]["torch"])
        random.setstate(saved["rng"][rank]["python"])
        if device.type == "cuda" and saved["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng"][rank]["cuda"])
    elif rank == 0:
        print(f"warning: checkpoint has {len(saved['rng'])} ranks' RNG states, this run {world}: sampling reseeded")
    return {k: saved.get(k, v) for k, v in state.items()}
