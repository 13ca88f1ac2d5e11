"""
What the scripts read from the user, validated before anything runs: the command line (every field of a config
dataclass is a flag, its docstring the help text) and the JSONL data files. Any problem is a UsageError, which the
scripts print as one line and exit with code 2. Shared by sgpo.py, evaluate.py and extract_strategies.py (like
nanoGPT's configurator.py, it keeps the plumbing out of the training file).
"""
import argparse
import ast
import glob
import inspect
import json
import os
import shlex
import sys
import tempfile
import textwrap
from dataclasses import fields


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _field_docs(cls) -> dict:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (main), instead of argparse's usage block
        raise UsageError(message)

    def convert_arg_line_to_args(self, line):  # @file arguments: shell words per line, '#' starts a comment
        return shlex.split(line, comments=True)


def require(checks):
    """checks: (condition, flag, what it must be); raise UsageError('--flag: what') for the first that fails."""
    for ok, name, what in checks:
        if not ok:
            raise UsageError(f"--{name}: {what}")


def config_from_args(cls, argv=None, description=""):
    """A dataclass instance from the command line: --field per field, its docstring as help; list fields
    repeat (--bench a --bench b); @FILE reads arguments from FILE; errors raise UsageError (one line, exit 2)."""
    docs = _field_docs(cls)
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     fromfile_prefix_chars="@")
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
        parser.add_argument(f"--{f.name}", **kw)
    args = vars(parser.parse_args(argv))
    return cls(**{f.name: (args[f.name] or []) if f.type is list else args[f.name] for f in fields(cls)})


def _is_text(s: str) -> bool:
    """False for a string that UTF-8 cannot encode (a lone surrogate)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Row(dict):
    """A data row (a plain dict to everything else, json.dumps included) that remembers its line in the file."""
    line = 0


def load_problems(path: str, required=("problem", "answer", "strategy"), skip_unkept=True) -> list:
    """Read and validate a JSONL file; raise UsageError('path:line: field: what is wrong') on the first bad line.
    Required fields are non-empty strings, the usual optional ones strings; each row gets a string id (its own,
    unique, or '#index') and its line number (row.line). Rows that extract_strategies.py marked without a usable
    strategy are skipped. A UTF-8 byte-order mark is accepted."""
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
                raise UsageError(f"{path}:{lineno}: {key}: expected a string, got {type(row[key]).__name__}")
            elif key in required and not row[key].strip():
                raise UsageError(f"{path}:{lineno}: {key}: empty")
            elif not _is_text(row[key]):  # "\ud800" is valid JSON, but no tokenizer takes it
                raise UsageError(f"{path}:{lineno}: {key}: holds a lone UTF-16 surrogate (not text)")
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
    """A non-empty strategy that extract_strategies.py kept (rows from elsewhere carry no status)."""
    return bool(problem.get("strategy", "").strip()) and problem.get("strategy_status", "kept") == "kept"


def check_fits(path: str, rows: list, prompt_len, context, budget: int = 0, text_len=None, guided=True):
    """Check, before a run, that every row's sequences tokenize and fit the model's context (max_position_embeddings),
    or raise UsageError naming file, line and field: a row that does not would crash the run mid-way.
    prompt_len(row, guided) -> prompt tokens. Sequences: the unguided prompt (field problem) and, where the row has a
    usable strategy and guided is set, the guided one (field strategy), each + budget new tokens; with text_len (the
    SFT warm-up) the unguided prompt + text_len(solution) + 1 (end of turn) instead."""
    for row in rows:
        for field in ["solution"] if text_len else ["problem"] + ["strategy"] * (guided and has_usable_strategy(row)):
            try:
                n = prompt_len(row, field == "strategy") + (text_len(row[field]) + 1 if text_len else budget)
            except Exception as e:
                raise UsageError(f"{path}:{row.line}: {field}: cannot be tokenized ({type(e).__name__})") from None
            if n > context:
                raise UsageError(f"{path}:{row.line}: {field}: needs {n} tokens with the response, more than the "
                                 f"model's context of {context} (max_position_embeddings)")


def check_writable_dir(path: str, flag: str):
    """Raise UsageError unless path is a directory this process can write in, or one it can create: probed with a
    temporary file in it (or in its nearest existing parent), removed at once. Nothing is left behind."""
    head = os.path.abspath(path)
    while not os.path.exists(head):
        head = os.path.dirname(head)
    if not os.path.isdir(head):
        raise UsageError(f"{flag} {path}: {'' if head == os.path.abspath(path) else head + ' '}is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=head, prefix=".sgpo-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror})") from None


# ---- checkpoints to resume (sgpo.py writes them; a kill or a power cut can leave the newest one damaged)
def checkpoints(output_dir: str) -> list:
    """The checkpoint-N folders of output_dir, newest (largest N) first; not the checkpoint-N.tmp being written."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted((int(d[11:]) for d in names if d.startswith("checkpoint-") and d[11:].isdigit()), reverse=True)
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in steps]


def latest_checkpoint(output_dir: str):
    return (checkpoints(output_dir) or [None])[0]


def sync_to_disk(path: str, recursive: bool = True):
    """fsync the files under path and the folders themselves. A rename is atomic, but a power cut after it can still
    leave the renamed folder's files empty or cut unless they were flushed to disk before."""
    for root, _, files in os.walk(path) if recursive else [(path, (), [])]:
        for p in [os.path.join(root, f) for f in files] + [root]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def checkpoint_damage(path: str):
    """'file: what is wrong' for a checkpoint folder, or None if it is whole: its files are there, the JSON files
    parse, and every *.safetensors file is as long as its header says (a cut write is shorter)."""
    for name in ("trainer_state.pt", "sgpo_config.json", "config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name}: missing"
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not weights:
        return "model.safetensors: missing"
    for w in weights:
        with open(w, "rb") as f:
            size, n = os.path.getsize(w), int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n)) if 8 + n <= size else {}
            except ValueError:  # UnicodeDecodeError included
                header = {}
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if header else [size]
        if not header or 8 + n + max(ends, default=0) != size:
            return f"{os.path.basename(w)}: damaged or cut short ({size} bytes)"
    for name in ("sgpo_config.json", "config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                json.load(f)
        except ValueError:
            return f"{name}: not valid JSON"
    optimizer = os.path.join(path, "optimizer")  # FSDP's shards (torch.distributed.checkpoint)
    if os.path.isdir(optimizer) and not os.path.isfile(os.path.join(optimizer, ".metadata")):
        return "optimizer/.metadata: missing"
    return None


def resolve_resume(resume: str, output_dir: str, fsdp: bool):
    """--resume (a folder, or 'latest') -> (checkpoint folder, its trainer_state.pt loaded). 'latest' takes the newest
    intact checkpoint-N of output_dir and warns (rank 0) of the damaged ones it passed over; a folder given by name
    must be intact. Its --fsdp must be this run's (the optimizer state is saved sharded or whole)."""
    import torch
    latest = resume == "latest"
    paths = checkpoints(output_dir) if latest else [resume]
    if not paths or not os.path.isdir(paths[0]):
        raise UsageError(f"--resume: no checkpoint in {output_dir} (to start over there: --overwrite_output_dir)" if latest
                         else f"--resume {resume}: not a folder")
    damaged = []
    for path in paths:
        damage = checkpoint_damage(path)
        if damage is None:
            try:
                saved = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
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
        if json.load(f).get("fsdp", False) != fsdp:
            raise UsageError(f"--resume {path}: written with --fsdp {str(not fsdp).lower()}; resume with it")
    if damaged and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --resume: passed over {'; '.join(damaged)}; resuming from {path}", file=sys.stderr)
    return path, saved
