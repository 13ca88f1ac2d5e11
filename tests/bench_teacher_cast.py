"""A frozen fp32 teacher (--teacher base/ema under DDP or in one process) under bf16 autocast:
autocast caches its casts only of weights that require grad, so every op of a teacher forward
casts its fp32 weight to bf16 again; the policy's casts are cached for the whole autocast block
(a generate call). Times a teacher forward (the KD term's, one micro-batch) and a generate call
of the teacher, with its fp32 weights and with a working copy whose Linear weights are bf16 (what
autocast casts them to; embeddings, a head tied to them and norms stay fp32: the same numerics).

    python tests/bench_teacher_cast.py [MODEL_DIR]   # default: the toy's model
"""

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import sgpo  # noqa: E402
from toy.tiny import tiny_rows  # noqa: E402


def timed(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "toy/cups_data/model"
    lm, tok = engine.load_model(path, torch.float32, "cpu")
    cfg = sgpo.Config(max_completion_length=32, temperature=1.0)
    frozen = lm.eval().requires_grad_(False)
    working = copy.deepcopy(frozen)
    # (a head tied to the input embedding stays fp32: the embedding's output must)
    embedding = working.get_input_embeddings().weight
    for module in working.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.weight.data = module.weight.data.bfloat16()
    prompts = [engine.prompt_ids(tok, cfg, q, True) for q in tiny_rows(8)]
    pairs = [(p, list(range(3, 3 + 64))) for p in prompts]
    results = {}
    for name, model in (("fp32 weights", frozen), ("bf16 working copy", working)):
        view = sgpo.Policy.of(model, tok, "cpu")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            forward, hidden = timed(lambda: view.response_hidden(pairs, sync_grads=False)[0], 5)
            torch.manual_seed(0)
            gen, outs = timed(lambda: engine.sample(view, prompts, cfg, model), 2)
        tokens = sum(len(o["ids"]) for o in outs)
        results[name] = hidden
        width = len(pairs[0][0]) + 64
        print(f"{name}: teacher forward {forward * 1e3:.1f} ms ({len(pairs)} x ~{width} tokens); "
              f"generate {tokens / gen:.0f} tokens/s ({len(prompts)} x up to "
              f"{cfg.max_completion_length})")
    a, b = results.values()
    print(f"hidden states equal: {torch.equal(a, b)} (max |diff| {(a - b).abs().max():.2e})")
