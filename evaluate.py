"""
Benchmark evaluation with the SGPO paper's protocol: k samples per problem at temperature 0.6, top-p
0.95, graded by math-verify (the same `math_reward` as training); reports avg@k (mean accuracy over
the k samples, then over problems) and pass@k. Prompts and generation come from engine.py, grading
from reward.py.

    B=path/to/benchmarks   # JSONL files (README "Benchmarks")
    python evaluate.py --model out/sgpo/checkpoint-100 --output_dir out/eval \
        --bench math500=$B/math500.jsonl:4 --bench aime24=$B/aime24.jsonl:32
    torchrun --standalone --nproc_per_node=8 evaluate.py ...   # problems sharded over ranks
    python evaluate.py ... --guided   # also with the strategy in the prompt: the "strategy benefit"
    python evaluate.py ... --resume   # continue an interrupted run (finished samples are kept)
    python evaluate.py ... --limit 10 # the first 10 problems of each benchmark
"""

import glob
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import engine
import inputs
import reward
import runtime


@dataclass
class EvalConfig:
    model: str = "toy/cups_data/model"
    """HF model directory or hub id (e.g. an sgpo.py checkpoint)."""
    bench: list = field(default_factory=list)
    """NAME=PATH:K, repeatable: a JSONL of problem, answer (optional id, strategy) and its number of
    samples."""
    output_dir: str = "out/eval"
    """samples-rank*.jsonl (one line per sample, appended as they finish), summary.json,
    summary.md."""
    temperature: float = 0.6
    """Sampling temperature (paper: 0.6); 0 = greedy."""
    top_p: float = 0.95
    """Nucleus sampling (paper: 0.95)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 32768
    """Response budget (paper: 32K); a response that reaches it counts as truncated."""
    batch_size: int = 16
    """Sequences per generate call on each rank: its KV cache is batch x tokens x KB/token (7B: 57
    KB/token, so 16 x 32K tokens = 30 GB next to 15 GB of bf16 weights on an 80 GB GPU; 64 would
    need 121 GB)."""
    guided: bool = False
    """Also evaluate with the strategy in the prompt (problems that have one), side by side with
    unguided."""
    resume: bool = False
    """Keep the samples already in output_dir and generate only the missing ones."""
    limit: int = 0
    """Only the first N problems of each benchmark (0 = all): a quick look first."""
    seed: int = 0
    """Sampling seed (offset by rank)."""
    dtype: str = "auto"
    """Weights and compute: auto (bf16 on a GPU that supports it), bf16 or fp32 (inference only: no
    fp32 master copy)."""
    system_prompt: str = ""
    """As in sgpo.py."""
    prompt_template: str = engine.AUTO_TEMPLATE
    """As in sgpo.py: the unguided user message."""
    guided_prompt_template: str = engine.GUIDED_TEMPLATE
    """As in sgpo.py: the guided user message."""
    reward_timeout: int = 5
    """Seconds for math-verify per parse and per verify."""
    ddp_timeout: int = 7200
    """Seconds the final gather waits for the slowest rank (torchrun): at avg@32 and 32K tokens
    ranks finish far apart, and the 30-minute default would abort the run before its summary."""


def parse_bench(spec: str):
    """'name=path:k' -> (name, path, k)."""
    name, eq, rest = spec.partition("=")
    path, colon, k = rest.rpartition(":")
    if not eq or not name or not colon or not path:
        raise inputs.UsageError(f"--bench {spec}: expected NAME=PATH:K")
    if not k.lstrip("-").isdigit() or int(k) < 1:
        raise inputs.UsageError(f"--bench {spec}: k must be an integer >= 1, got {k!r}")
    return name, path, int(k)


def unparsable_answers(problems: list, timeout: int) -> list:
    """Line numbers of the rows whose gold answer math-verify parses into no value (it keeps the raw
    text alone, or nothing): a correct response written any other way is graded wrong, silently, so
    the user is told."""
    bad = []
    for q in problems:
        try:
            ok = len(reward._parse_gold(q["answer"], timeout)) >= 2  # [value, text] when it parses
        except Exception:
            ok = False
        if not ok:
            bad.append(q.line)
    return bad


def work_items(benches, guided: bool) -> list:
    """Every (bench, problem, mode, sample) to generate; guided only for problems with a
    strategy."""
    items = []
    for name, problems, k in benches:
        for q in problems:
            modes = ["unguided"] + (["guided"] if guided and inputs.has_usable_strategy(q) else [])
            items += [
                dict(bench=name, id=q["id"], mode=m, sample=s, problem=q)
                for m in modes
                for s in range(k)
            ]
    return items


def item_key(r) -> tuple:
    return r["bench"], r["id"], r["mode"], r["sample"]


def aggregate(samples: list) -> dict:
    """Per-sample results -> {bench: {mode: avg@k, pass@k, problems, mean_length, truncation_rate}}.

    avg@k: mean over problems of the fraction of its k samples that are correct; pass@k: fraction of
    problems with at least one correct sample. With guided results, 'unguided_same_problems'
    restricts unguided to the problems that have a guided result, and 'strategy_benefit' = guided
    avg@k - that."""
    by = {}
    for r in samples:
        by.setdefault(r["bench"], {}).setdefault(r["mode"], {}).setdefault(r["id"], []).append(r)
    out = {}
    for bench, modes in by.items():
        out[bench] = {}
        for mode, problems in modes.items():
            out[bench][mode] = _scores(problems)
        if "guided" in modes:
            same = {
                pid: rs for pid, rs in modes.get("unguided", {}).items() if pid in modes["guided"]
            }
            out[bench]["unguided_same_problems"] = _scores(same)
            out[bench]["strategy_benefit"] = (
                out[bench]["guided"]["avg@k"] - out[bench]["unguided_same_problems"]["avg@k"]
            )
    return out


def _scores(problems: dict) -> dict:
    rows = [r for rs in problems.values() for r in rs]
    n = max(len(problems), 1)
    return {
        "avg@k": sum(sum(r["correct"] for r in rs) / len(rs) for rs in problems.values()) / n,
        "pass@k": sum(any(r["correct"] for r in rs) for rs in problems.values()) / n,
        "problems": len(problems), "samples": len(rows),
        "mean_length": sum(r["length"] for r in rows) / max(len(rows), 1),
        "truncation_rate": sum(r["truncated"] for r in rows) / max(len(rows), 1)
    }


def markdown(summary: dict, ks: dict) -> str:
    lines = [
        "| benchmark | k | mode | problems | avg@k | pass@k | mean length | truncated |",
        "|---|---|---|---|---|---|---|---|"
    ]
    for bench, modes in summary.items():
        for mode in ("unguided", "unguided_same_problems", "guided"):
            if mode in modes:
                m = modes[mode]
                cells = [bench, ks[bench], mode, m["problems"], f"{100 * m['avg@k']:.1f}",
                         f"{100 * m['pass@k']:.1f}", f"{m['mean_length']:.0f}",
                         f"{100 * m['truncation_rate']:.1f}%"]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        if "strategy_benefit" in modes:
            benefit = f"{100 * modes['strategy_benefit']:+.1f}"
            lines.append(f"| {bench} | {ks[bench]} | strategy benefit | | {benefit} | | | |")
    return "\n".join(lines) + "\n"


def read_samples(output_dir: str, rank=None) -> list:
    """Samples in output_dir: of every rank's file, or of one rank's."""
    rows = []
    for path in sorted(
        glob.glob(os.path.join(output_dir, f"samples-rank{'*' if rank is None else rank}.jsonl"))
    ):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                # the last line of a killed run may be cut: regenerate it
                except json.JSONDecodeError:
                    pass
    return rows


def main(argv=None) -> int:
    try:
        cfg = inputs.config_from_args(EvalConfig, argv, "SGPO benchmark evaluation")
        if not cfg.bench:
            raise inputs.UsageError("--bench: at least one NAME=PATH:K is required")
        if cfg.temperature < 0 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
            raise inputs.UsageError(
                "--temperature must be >= 0, --max_new_tokens and --batch_size >= 1"
            )
        inputs.require([(cfg.ddp_timeout >= 1, "ddp_timeout", "must be >= 1")])
        specs = [parse_bench(s) for s in cfg.bench]
        benches = [
            (name, inputs.load_problems(path, required=("problem", "answer"))[
                :cfg.limit or None], k)
            for name, path, k in specs
        ]
        if len({name for name, _, _ in specs}) < len(specs):
            raise inputs.UsageError("--bench: benchmark names must be distinct")
        existing = read_samples(cfg.output_dir)
        if existing and not cfg.resume:
            raise inputs.UsageError(
                f"--output_dir {cfg.output_dir}: already holds samples; pass --resume or another "
                "--output_dir"
            )
        inputs.check_writable_dir(cfg.output_dir, "--output_dir")
        ddp, rank, world, device = runtime.setup_distributed(cfg.ddp_timeout)

        # every prompt tokenizes and leaves room to answer (before the weights load)
        def check_rows(tokenizer, config):
            for (_, path, _), (_, problems, _) in zip(specs, benches):
                inputs.check_fits(
                    path, problems,
                    lambda q, guided: len(engine.prompt_ids(tokenizer, cfg, q, guided)), budget=1,
                    context=getattr(config, "max_position_embeddings", float("inf")),
                    guided=cfg.guided
                )

        model, tokenizer = engine.load_model(
            cfg.model, runtime.compute_dtype(cfg.dtype), device, check_rows
        )
    except inputs.UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    # a warning: rank 0 only
    for (_, path, _), (_, problems, _) in zip(specs, benches) if rank == 0 else []:
        bad = unparsable_answers(problems, cfg.reward_timeout)
        if bad:
            shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
            print(
                f"warning: {path}: {len(bad)} of {len(problems)} gold answers math-verify cannot "
                f"parse into a value (lines {shown}): only a response with the same text can "
                "match them",
                file=sys.stderr,
            )
    torch.manual_seed(cfg.seed + rank)
    os.makedirs(cfg.output_dir, exist_ok=True)

    done = {item_key(r) for r in existing}
    items = [it for it in work_items(benches, cfg.guided)[rank::world] if item_key(it) not in done]
    for it in items:
        it["prompt"] = engine.prompt_ids(
            tokenizer, cfg, it["problem"], guided=it["mode"] == "guided"
        )
    items.sort(key=lambda it: len(it["prompt"]))  # similar lengths per batch: less padding
    eos_ids = model.generation_config.eos_token_id
    answers = {(name, q["id"]): q["answer"] for name, problems, _ in benches for q in problems}
    path = os.path.join(cfg.output_dir, f"samples-rank{rank}.jsonl")
    if os.path.exists(path) and os.path.getsize(path):
        # a run killed mid-line: start a new line, the cut one is ignored
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as f:
                f.write("\n")
    # (the bar closed before Ctrl-C's line)
    with open(path, "a") as out, tqdm(total=len(items), disable=rank != 0,
                                      desc=f"eval (rank 0 of {world})") as bar:
        for i in range(0, len(items), cfg.batch_size):
            batch = items[i : i + cfg.batch_size]
            results = engine.generate(
                model, [it["prompt"] for it in batch], tokenizer.pad_token_id, eos_ids, device,
                cfg.temperature, cfg.max_new_tokens, cfg.top_p, cfg.top_k
            )
            for it, res in zip(batch, results):
                text = tokenizer.decode(res["ids"], skip_special_tokens=True)
                correct = reward.math_reward(
                    text, answers[(it["bench"], it["id"])], cfg.reward_timeout
                )
                out.write(
                    json.dumps(
                        {
                            **{k: it[k] for k in ("bench", "id", "mode", "sample")},
                            "correct": correct, "length": len(res["ids"]),
                            "truncated": res["truncated"], "response": text
                        }
                    )
                    + "\n"
                )
            out.flush()
            bar.update(len(batch))
    # Gather every rank's verdicts (no responses) to rank 0, which also reads the files it can see
    # (e.g. of an earlier run with more ranks); a sample is counted once.
    mine = [
        {k: v for k, v in r.items() if k != "response"} for r in read_samples(cfg.output_dir, rank)
    ]
    gathered = runtime.all_gather_objects(mine)
    if rank == 0:
        ks = {name: k for name, _, k in specs}
        # not a sample of another configuration
        wanted = {item_key(it) for it in work_items(benches, cfg.guided)}
        samples = {
            item_key(r): r
            for r in read_samples(cfg.output_dir) + [r for part in gathered for r in part]
            if item_key(r) in wanted
        }
        summary = aggregate(list(samples.values()))
        table = markdown(summary, ks)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(
                {
                    "model": cfg.model, "k": ks, "temperature": cfg.temperature, "top_p": cfg.top_p,
                    "max_new_tokens": cfg.max_new_tokens, "results": summary
                },
                f,
                indent=1,
            )
        with open(os.path.join(cfg.output_dir, "summary.md"), "w") as f:
            f.write(table)
        print(table)
    if ddp:
        dist.destroy_process_group()
    return 0


def interrupted(output_dir: str) -> str:
    """Ctrl-C's one line: the samples on disk, and how to continue."""
    n = len(read_samples(output_dir)) if os.path.isdir(output_dir) else 0
    if not n:
        return "no sample written yet"
    return (f"{n} samples kept in {output_dir}; the same command with --resume generates the "
            "rest")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # every rank of a torchrun gets the signal: rank 0 speaks
        if int(os.environ.get("RANK", 0)) == 0:
            try:
                out = inputs.config_from_args(EvalConfig, None, "").output_dir
            except inputs.UsageError:
                out = EvalConfig.output_dir
            print(f"\ninterrupted: {interrupted(out)}", file=sys.stderr)
        sys.exit(130)
