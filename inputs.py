"""
What the scripts read from the user, validated before anything runs: the command line (every field
of a config dataclass is a flag, its docstring the help text) and the JSONL data files. Any problem
is a UsageError, which the scripts print as one line and exit with code 2. Shared by sgpo.py,
evaluate.py and extract_strategies.py (like nanoGPT's configurator.py, it keeps the plumbing out of
the training file).
"""

import argparse
import ast
import inspect
import json
import os
import re
import shlex
import tempfile
import textwrap
from dataclasses import fields


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _field_docs(cls) -> dict:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: b.value.value
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
    }


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (main), instead of argparse's usage block
        # a flag named by its first spelling ("argument --max_steps/--max-steps:" -> "--max_steps:")
        raise UsageError(re.sub(r"^argument (--[\w-]+)/--[\w-]+:", r"argument \1:", message))

    # @file arguments: shell words per line, '#' starts a comment
    def convert_arg_line_to_args(self, line):
        return shlex.split(line, comments=True)


def require(checks):
    """checks: (condition, flag, what it must be); raise UsageError('--flag: what') for the first
    that fails."""
    for ok, name, what in checks:
        if not ok:
            raise UsageError(f"--{name}: {what}")


def config_from_args(cls, argv=None, description=""):
    """A dataclass instance from the command line: --field per field, its docstring as help; list
    fields repeat (--bench a --bench b); @FILE reads arguments from FILE; errors raise UsageError
    (one line, exit 2)."""
    docs = _field_docs(cls)
    parser = _Parser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        fromfile_prefix_chars="@"
    )
    for f in fields(cls):
        kw = dict(default=f.default, help=docs.get(f.name, "").replace("%", "%%"))
        if f.type is bool:
            kw.update(type=_bool, nargs="?", const=True)
        elif f.type is list:
            kw.update(type=str, action="append", default=None)
        elif f.name == "resume" and f.type is str:
            kw.update(type=str, nargs="?", const="latest")
        else:
            kw.update(type=f.type)
        # both spellings, as HF's parser takes them: --max_steps and --max-steps
        spellings = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        parser.add_argument(*spellings, dest=f.name, **kw)
    args = vars(parser.parse_args(argv))
    return cls(
        **{f.name: (args[f.name] or []) if f.type is list else args[f.name] for f in fields(cls)}
    )


def _is_text(s: str) -> bool:
    """False for a string that UTF-8 cannot encode (a lone surrogate)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Row(dict):
    """A data row (a plain dict to everything else, json.dumps included) that remembers its line in
    the file."""

    line = 0


def load_problems(path: str, required=("problem", "answer", "strategy"), skip_unkept=True) -> list:
    """Read and validate a JSONL file; raise UsageError('path:line: field: what is wrong') on the
    first bad line. Required fields are non-empty strings, the usual optional ones strings; each row
    gets a string id (its own, unique, or '#index') and its line number (row.line). Rows that
    extract_strategies.py marked without a usable strategy are skipped. A UTF-8 byte-order mark is
    accepted."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: file not found")
    rows, seen = [], {}
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"{path}:{lineno}: line: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: line: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: line: expected a JSON object")
        if skip_unkept and row.get("strategy_status", "kept") != "kept":
            continue
        for key in dict.fromkeys((*required, "problem", "answer", "strategy", "solution")):
            if key not in row:
                if key in required:
                    raise UsageError(f"{path}:{lineno}: {key}: missing")
            elif not isinstance(row[key], str):
                raise UsageError(
                    f"{path}:{lineno}: {key}: expected a string, got {type(row[key]).__name__}"
                )
            elif key in required and not row[key].strip():
                raise UsageError(f"{path}:{lineno}: {key}: empty")
            elif not _is_text(row[key]):  # "\ud800" is valid JSON, but no tokenizer takes it
                raise UsageError(
                    f"{path}:{lineno}: {key}: holds a lone UTF-16 surrogate (not text)"
                )
        if "id" in row:
            if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
                raise UsageError(f"{path}:{lineno}: id: expected a string or an integer")
            if str(row["id"]) in seen:
                raise UsageError(f"{path}:{lineno}: id: duplicate of line {seen[str(row['id'])]}")
        key = str(row.get("id", f"#{len(rows)}"))
        seen[key] = lineno
        rows.append(Row(row, id=key))
        rows[-1].line = lineno
    if not rows:
        raise UsageError(f"{path}: no problems (empty file)")
    return rows


def has_usable_strategy(problem: dict) -> bool:
    """A non-empty strategy that extract_strategies.py kept (rows from elsewhere carry no
    status)."""
    return (
        bool(problem.get("strategy", "").strip())
        and problem.get("strategy_status", "kept") == "kept"
    )


def check_fits(
    path: str, rows: list, prompt_len, context, budget: int = 0, text_len=None, guided=True
):
    """Check, before a run, that every row's sequences tokenize and fit the model's context
    (max_position_embeddings), or raise UsageError naming file, line and field: a row that does not
    would crash the run mid-way. prompt_len(row, guided) -> prompt tokens. Sequences: the unguided
    prompt (field problem) and, where the row has a usable strategy and guided is set, the guided
    one (field strategy), each + budget new tokens; with text_len (the SFT warm-up) the unguided
    prompt + text_len(solution) (its tokens and the end of turn) instead."""
    for row in rows:
        for field in (
            ["solution"]
            if text_len
            else ["problem"] + ["strategy"] * (guided and has_usable_strategy(row))
        ):
            try:
                n = prompt_len(row, field == "strategy") + (
                    text_len(row[field]) if text_len else budget
                )
            except Exception as e:
                raise UsageError(
                    f"{path}:{row.line}: {field}: cannot be tokenized ({type(e).__name__})"
                ) from None
            if n > context:
                raise UsageError(
                    f"{path}:{row.line}: {field}: needs {n} tokens with the response, more than "
                    f"the model's context of {context} (max_position_embeddings)"
                )


def check_writable_dir(path: str, flag: str):
    """Raise UsageError unless path is a directory this process can write in, or one it can create:
    probed with a temporary file in it (or in its nearest existing parent), removed at once. Nothing
    is left behind."""
    head = os.path.abspath(path)
    while not os.path.exists(head):
        head = os.path.dirname(head)
    if not os.path.isdir(head):
        raise UsageError(
            f"{flag} {path}: {'' if head == os.path.abspath(path) else head + ' '}is not a "
            f"directory"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=head, prefix=".sgpo-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror})") from None


# ---- sgpo.py's command line and data, checked before anything runs
TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_tracker(kind: str) -> str:
    """'' if --report_to names a known tracker whose package is installed, else the reason (the
    package is imported only by the run that chose it)."""
    import importlib.util
    if kind not in TRACKERS:
        return f"must be one of {', '.join(TRACKERS)}"
    if TRACKERS[kind] and importlib.util.find_spec(TRACKERS[kind]) is None:
        return f"the {TRACKERS[kind]} package is not installed (pip install {TRACKERS[kind]})"
    return ""


def check_train_config(cfg):
    """The values of sgpo.py's flags: UsageError('--flag: what it must be') for the first bad
    one."""
    checks = [
        (cfg.kd_loss in ("fkl", "rkl", "sft"), "kd_loss", "must be fkl, rkl or sft"),
        (cfg.temperature > 0, "temperature", "must be > 0"),
        (cfg.dtype in ("auto", "bf16", "fp32"), "dtype", "must be auto, bf16 or fp32"),
        (cfg.kl_clip > 0, "kl_clip", "must be > 0 (inf disables clipping)"),
        (cfg.teacher in ("live", "base", "ema"), "teacher", "must be live, base or ema"),
        (0 < cfg.teacher_ema_rate <= 1, "teacher_ema_rate", "must be in (0, 1]"),
        (cfg.generate_by_mode in ("auto", "true", "false"), "generate_by_mode",
         "must be auto, true or false"),
        (cfg.share_prompts in ("auto", "true", "false"), "share_prompts",
         "must be auto, true or false"),
        (cfg.target_score in ("mean", "sum"), "target_score", "must be mean or sum"),
        (cfg.alpha_update in ("before", "after"), "alpha_update", "must be before or after"),
        (cfg.model != "", "model", "required"), (cfg.data != "", "data", "required")
    ]
    for name in ("batch_size", "num_generations", "max_completion_length", "micro_batch_size",
                 "num_iterations", "steps_per_generation", "kd_chunk_size", "save_steps",
                 "ddp_timeout"):
        checks.append((getattr(cfg, name) >= 1, name, "must be >= 1"))
    # every rank splits its problems into the same number of whole-problem mini-batches
    world = int(os.environ.get("WORLD_SIZE", 1))
    k = cfg.steps_per_generation
    checks.append((k < 1 or cfg.batch_size % k == 0, "steps_per_generation",
                   f"{k} mini-batches do not divide the global batch of {cfg.batch_size} x "
                   f"{world} problems into {k} x {world} equal parts (--batch_size must be a "
                   f"multiple of {k})"))
    checks.append((cfg.reward_workers >= -1, "reward_workers", "must be >= -1 (-1: one per core)"))
    for name in ("num_guided_generations", "max_steps", "sft_epochs", "eval_steps",
                 "generation_batch_size", "save_total_limit", "log_completions"):
        checks.append((getattr(cfg, name) >= 0, name, "must be >= 0"))
    tracker = check_tracker(cfg.report_to)
    checks.append((not tracker, "report_to", tracker))
    guided = cfg.guided_prompt_template
    checks += [("{problem}" in cfg.prompt_template, "prompt_template", "must contain {problem}"),
               ("{problem}" in guided and "{strategy}" in guided, "guided_prompt_template",
                "must contain {problem} and {strategy}")]
    require(checks)


def learning_rate_warning(cfg, toy) -> str:
    """One line when a model other than the CPU testbed's (toy: the Config defaults) trains at
    the testbed's learning rate, else ''. (Measured on SmolLM2-135M at 1e-4: after 5 RL steps it
    repeats 'Problem:' and every reward is 0.)"""
    if cfg.model == toy.model or cfg.learning_rate != toy.learning_rate:
        return ""
    return (f"warning: --learning_rate {cfg.learning_rate:g} is the CPU testbed's; a pretrained "
            "model usually needs about 1e-6 (paper.args) and can lose its fluency at this rate")


def load_train_data(cfg, prompt_len, turn_end_len):
    """sgpo.py's data files, validated row by row: (training, SFT warm-up, held-out) problems and
    check(tokenizer, model config), which raises UsageError unless every row tokenizes and fits the
    model's context (run before the weights load). prompt_len(tokenizer, row, guided) -> tokens;
    turn_end_len(tokenizer) -> the tokens that end a warm-up response."""
    problems = load_problems(cfg.data)
    sft_path, sft_problems, eval_problems = cfg.sft_data or cfg.data, [], []
    if cfg.sft_epochs:
        sft_problems = load_problems(sft_path, ("problem", "answer", "strategy", "solution"))
    if cfg.eval_data:
        eval_problems = load_problems(cfg.eval_data, ("problem", "answer"), skip_unkept=False)
    global_batch = cfg.batch_size * int(os.environ.get("WORLD_SIZE", 1))
    for path, rows in ((cfg.data, problems), (sft_path, sft_problems or problems)):
        if len(rows) < global_batch:
            raise UsageError(f"{path}: {len(rows)} problems, fewer than the global batch "
                             f"{global_batch}")

    def check(tokenizer, config):
        fit = dict(prompt_len=lambda q, guided: prompt_len(tokenizer, q, guided),
                   context=getattr(config, "max_position_embeddings", float("inf")),
                   budget=cfg.max_completion_length)
        check_fits(cfg.data, problems, **fit)
        check_fits(cfg.eval_data, eval_problems, **fit)
        end = turn_end_len(tokenizer)
        check_fits(sft_path, sft_problems, **fit,
                   text_len=lambda t: len(tokenizer(t, add_special_tokens=False).input_ids) + end)
    return problems, sft_problems, eval_problems, check
