"""
What the scripts read from the user, validated before anything runs: the command line (every field of a config
dataclass is a flag, its docstring the help text) and the JSONL data files. Any problem is a UsageError, which the
scripts print as one line and exit with code 2. Shared by sgpo.py, evaluate.py and extract_strategies.py (like
nanoGPT's configurator.py, it keeps the plumbing out of the training file).
"""
import argparse
import ast
import inspect
import json
import os
import shlex
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


def load_problems(path: str, required=("problem", "answer", "strategy"), skip_unkept=True) -> list:
    """Read and validate a JSONL file; raise UsageError('path:line: field: what is wrong') on the first bad line.
    Required fields are non-empty strings, the usual optional ones strings; each row gets a string id (its own,
    unique, or '#index'). Rows that extract_strategies.py marked without a usable strategy are skipped."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: file not found")
    rows, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
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
            if "id" in row:
                if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
                    raise UsageError(f"{path}:{lineno}: id: expected a string or an integer")
                if str(row["id"]) in seen:
                    raise UsageError(f"{path}:{lineno}: id: duplicate of line {seen[str(row['id'])]}")
            key = str(row.get("id", f"#{len(rows)}"))
            seen[key] = lineno
            rows.append({**row, "id": key})
    if not rows:
        raise UsageError(f"{path}: no problems (empty file)")
    return rows
