"""
Offline strategy extraction for SGPO: for each problem with a strong model's reference solution,
sample --num_candidates structured strategies (problem type / strategy / high-level steps, no
computation, no answer), reject candidates that leak the gold answer, let the model rank the rest on
four criteria, keep the best. The output is the input rows plus `strategy` (and `strategy_status`),
ready for sgpo.py.

    # an OpenAI-compatible server (e.g. `vllm serve Qwen/Qwen2.5-72B-Instruct`), key from
    # $OPENAI_API_KEY if set
    python extract_strategies.py --input train.jsonl --output train_strategies.jsonl \
        --backend openai --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct
    # a local HF model (batched generate)
    python extract_strategies.py --input train.jsonl --output train_strategies.jsonl \
        --backend hf --model Qwen/Qwen2.5-7B-Instruct
Rerunning the same command resumes: ids already in --output are skipped (--retry_failed redoes
failed rows); Ctrl-C stops it with one line. `--limit 5` tries the first 5 rows. Rejected
candidates go to <output>.rejected.jsonl with their reason (off-format, malformed, leaked); the
last line counts each. A run whose every row failed (e.g. no server at --base_url) exits 1.
"""

import datetime
import email.utils
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

import engine
import inputs
import reward
import runtime

STRATEGY_PROMPT = """You are given a math problem and a reference solution written by a strong \
solver. Describe the reusable strategy behind the solution, so that a student could solve this \
problem and similar ones with it.

Write exactly three fields:
Problem type: <the kind of problem, in one line>
Strategy: <the principle, theorem or technique that unlocks it, in one or two sentences>
Steps:
- <high-level step>
- <high-level step>

Rules: no numbers computed from this problem's data, no intermediate results, and never the final \
answer. The steps say what to do, not what comes out.

Problem:
{problem}

Reference solution:
{solution}"""

RANK_PROMPT = """Below are {n} candidate strategy descriptions for the same math problem and \
reference solution. Judge them on four criteria:
1. Faithful: it describes the approach the reference solution actually uses.
2. General: it is reusable on similar problems, not tied to this instance.
3. No leakage: it contains no computed values, intermediate results or final answer.
4. Clear and actionable: its steps can be followed.

Problem:
{problem}

Reference solution:
{solution}

{candidates}

Reply with one line of the form "BEST: <number of the best candidate>"."""


@dataclass
class ExtractConfig:
    input: str = ""
    """JSONL with a problem, its gold answer and a reference solution per line."""
    output: str = ""
    """Output JSONL: input rows + strategy + strategy_status (kept / rejected / failed); appended as
    rows finish."""
    backend: str = "openai"
    """openai (an OpenAI-compatible chat completions endpoint) or hf (a local transformers
    model)."""
    model: str = ""
    """Model name at the endpoint, or HF directory / hub id."""
    base_url: str = "http://localhost:8000/v1"
    """Endpoint base URL (openai backend)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset: no Authorization header)."""
    max_new_tokens: int = 1024
    """Token budget per candidate and per ranking."""
    num_candidates: int = 5
    """Candidates sampled per problem (paper: 5)."""
    temperature: float = 0.7
    """Sampling temperature of the candidates (the ranking is greedy)."""
    problem_field: str = "problem"
    """Input field holding the problem."""
    answer_field: str = "answer"
    """Input field holding the gold final answer (for the leak guard)."""
    solution_field: str = "solution"
    """Input field holding the strong model's reference solution."""
    batch_size: int = 8
    """Problems processed together (one batched generate, or this many requests in flight at
    most)."""
    timeout: float = 120.0
    """Seconds per HTTP request."""
    retries: int = 3
    """Retries of a failed request (5xx, 429, network), with exponential backoff."""
    backoff: float = 1.0
    """First backoff delay in seconds (doubles per retry)."""
    retry_failed: bool = False
    """Drop the failed rows from --output and redo them."""
    reward_timeout: int = 5
    """math-verify timeout (seconds) of the leak check."""
    limit: int = 0
    """Only the first N rows of --input (0 = all): to try a model on a few problems first."""


# ---- back ends: prompts -> for each prompt, n completions (or the exception that stopped it) ----


def reply_texts(reply) -> list:
    """The non-empty message texts of a chat-completions reply; anything malformed counts as no
    choice."""
    texts, choices = [], reply.get("choices") if isinstance(reply, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return texts


def retry_delay(error, backoff: float, cap: float) -> float:
    """Seconds to wait before retrying: the server's Retry-After (seconds or an HTTP date) on a
    429/503, as OpenAI-compatible clients honour it, else the exponential backoff; never more than
    cap (--timeout)."""
    value = (
        error.headers.get("Retry-After")
        if isinstance(error, urllib.error.HTTPError) and error.headers
        else None
    )
    try:
        delay = float(value)
    except (TypeError, ValueError):
        try:
            delay = (
                email.utils.parsedate_to_datetime(value)
                - datetime.datetime.now(datetime.timezone.utc)
            ).total_seconds()
        except (TypeError, ValueError):
            delay = backoff
    return min(max(delay, 0.0), cap)


class OpenAIBackend:
    def __init__(self, cfg: ExtractConfig):
        self.cfg, self.key = cfg, os.environ.get(cfg.api_key_env, "")
        self.counts, self.lock = (
            {"requests": 0, "choices_asked": 0, "choices_received": 0}, threading.Lock()
        )

    def _post(self, payload: dict) -> dict:
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {self.key}"} if self.key else {})
        }
        for attempt in range(self.cfg.retries + 1):
            try:
                req = urllib.request.Request(
                    url, data=json.dumps(payload).encode(), headers=headers, method="POST"
                )
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    return json.loads(resp.read())
            except (
                urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError
            ) as e:
                retryable = (
                    not isinstance(e, urllib.error.HTTPError) or e.code >= 500 or e.code == 429
                )
                if not retryable or attempt == self.cfg.retries:
                    raise RuntimeError(f"{url}: {e}") from None
                time.sleep(retry_delay(e, self.cfg.backoff * 2**attempt, self.cfg.timeout))

    def _one(self, prompt: str, n: int, temperature: float) -> list:
        """n completions of one prompt. Servers that ignore or cap `n` answer with fewer choices:
        ask again for the rest. A reply with no usable choice (choices [], content null or empty) is
        the endpoint's failure: it raises, and the row is recorded as failed (--retry_failed redoes
        it), never as a candidate that leaked."""
        texts = []
        while len(texts) < n:
            out = self._post(
                {
                    "model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                    "n": n - len(texts), "temperature": temperature,
                    "max_tokens": self.cfg.max_new_tokens
                }
            )
            got = reply_texts(out)
            with self.lock:
                self.counts["requests"] += 1
                self.counts["choices_asked"] += n - len(texts)
                self.counts["choices_received"] += len(got)
            if not got:
                raise RuntimeError(
                    f"the endpoint returned no usable choice ({json.dumps(out)[:200]})"
                )
            texts += got[: n - len(texts)]
        return texts

    def chat(self, prompts: list, n: int, temperature: float) -> list:
        # progress inside a batch: a prompt's requests done
        bar = tqdm(total=len(prompts), desc="requests", leave=False)

        def safe(p):
            try:
                return self._one(p, n, temperature)
            except Exception as e:  # recorded on the row as failed, never dropped
                return e
            finally:
                bar.update(1)

        # at most batch_size in flight
        with bar, ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
            return list(pool.map(safe, prompts))


class HFBackend:
    def __init__(self, cfg: ExtractConfig):
        import torch

        self.cfg, self.device = cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok = engine.load_model(
            cfg.model, runtime.compute_dtype("auto"), self.device
        )

    def chat(self, prompts: list, n: int, temperature: float) -> list:
        ids = [
            list(
                self.tok.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                    return_dict=False
                )
            )
            for p in prompts
        ]
        # progress inside the call: a forward is a decode step (the first: the prompts' prefill)
        bar = tqdm(total=self.cfg.max_new_tokens + 1, desc="decode steps", leave=False)

        def step(*_):
            # (a hook's return value other than None would replace the model's output)
            bar.update(1)

        hook = self.model.register_forward_hook(step)
        try:
            outs = engine.generate(
                self.model, [x for x in ids for _ in range(n)], self.tok.pad_token_id,
                self.model.generation_config.eos_token_id, self.device, temperature,
                self.cfg.max_new_tokens
            )
        finally:
            hook.remove()
            bar.close()
        texts = [self.tok.decode(o["ids"], skip_special_tokens=True) for o in outs]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


# ---- candidate handling (main thread: math-verify's timeout needs it) ----


FIELDS = ("Problem type:", "Strategy:", "Steps:")


def parse_candidate(text: str):
    """(the three-field strategy block of a completion, '') or (None, why not): 'off-format'
    (no "Problem type:" at all: the model did not follow the format) or 'malformed: ...' (which
    field is missing or empty)."""
    start = text.find(FIELDS[0])
    if start < 0:
        return None, "off-format"
    block = text[start:].strip()
    missing = [f for f in FIELDS[1:] if f not in block]
    if missing:
        return None, f"malformed: no {' '.join(missing)}"
    # each field's text: from its name to the next field's
    for field, following in zip(FIELDS, FIELDS[1:] + ("",)):
        body = block.split(field, 1)[1]
        if not (body.split(following, 1)[0] if following else body).strip():
            return None, f"malformed: empty {field}"
    return block, ""


MATH_SPANS = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def boxed_spans(text: str) -> list:
    """The contents of every \\boxed{...}, nested braces included (\\boxed{\\dfrac{3}{4}}:
    \\dfrac{3}{4})."""
    spans = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                spans.append(text[m.end() : i])
                break
    return spans


# spacing, $, sizing and the display forms of \frac do not change what is stated
def _norm(s: str) -> str:
    return re.sub(
        r"\\[dt]frac", r"\\frac", re.sub(r"\s+|\$|\\left|\\right|\\!|\\,|\\displaystyle", "", s)
    )


def leak_form(text: str, answer: str, timeout: int = 5) -> str:
    """How the text states the gold answer, or '' if it does not: 'literal' (whitespace and $
    ignored; answers of two or more characters, since a lone digit appears in any text) or 'math
    span' (an equal expression in one of its $...$, \\(...\\), \\[...\\] or \\boxed{...} spans,
    checked with math-verify)."""
    gold = _norm(answer)
    if len(gold) >= 2 and gold in _norm(text):
        return "literal"
    for span in [
        next(g for g in m.groups() if g is not None) for m in MATH_SPANS.finditer(text)
    ] + boxed_spans(text):
        if reward.math_reward(f"${span}$", answer, timeout):
            return "math span"
        for side in span.split("=")[1:]:  # "x = 42" states 42
            if reward.math_reward(f"${side}$", answer, timeout):
                return "math span"
    return ""


def judge(text: str, answer: str, timeout: int):
    """(the strategy block, '') if the candidate is usable, else (None, the reason: off-format,
    malformed: ..., leaked: literal / math span)."""
    block, why = parse_candidate(text)
    if block is None:
        return None, why
    form = leak_form(block, answer, timeout)
    return (None, f"leaked: {form}") if form else (block, "")


def parse_best(text: str, n: int):
    m = re.search(r"BEST:\s*\**\s*(?:candidate\s*)?(\d+)", text, re.I)
    return int(m.group(1)) - 1 if m and 1 <= int(m.group(1)) <= n else None


def written_rows(path: str) -> list:
    """The whole rows in an output file (none if it does not exist)."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            # the line a killed run was writing: parsed, not guessed; its row is redone
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def done_rows(cfg: ExtractConfig) -> dict:
    """Rows already in --output by id; with --retry_failed the failed ones are removed from the file
    first."""
    if not os.path.exists(cfg.output):
        return {}
    rows = written_rows(cfg.output)
    if cfg.retry_failed:
        rows = [r for r in rows if r.get("strategy_status") != "failed"]
    with open(cfg.output + ".tmp", "w") as f:  # rewrite without cut or dropped lines, atomically
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(cfg.output + ".tmp", cfg.output)
    return {str(r["id"]): r for r in rows}


def reason_key(why: str) -> str:
    """The summary's count of a rejection reason: candidates_off_format, candidates_malformed
    (whatever is missing), candidates_leaked_literal, candidates_leaked_math_span."""
    kind = why if why.startswith("leaked") else why.split(":")[0]
    return "candidates_" + re.sub(r"\W+", "_", kind)


def process(batch: list, backend, cfg: ExtractConfig, counts: dict, rejected: list) -> list:
    """Candidates -> format and leak guard -> ranking -> one output row per input row. Each
    rejected candidate is counted by its reason in counts and appended to rejected."""
    prompts = [
        STRATEGY_PROMPT.format(problem=r[cfg.problem_field], solution=r[cfg.solution_field])
        for r in batch
    ]
    outs = backend.chat(prompts, cfg.num_candidates, cfg.temperature)
    results, to_rank = [None] * len(batch), []
    for i, (row, out) in enumerate(zip(batch, outs)):
        if isinstance(out, Exception):
            results[i] = dict(strategy="", strategy_status="failed",
                              strategy_error=f"request failed: {str(out)[:300]}")
            continue
        ok, reasons = [], []
        for text in out:
            block, why = judge(text, row[cfg.answer_field], cfg.reward_timeout)
            if block is None:
                reasons.append(why)
                key = reason_key(why)
                counts[key] = counts.get(key, 0) + 1
                rejected.append({"id": row["id"], "reason": why, "candidate": text})
            else:
                ok.append(block)
        if not ok:
            results[i] = dict(
                strategy="", strategy_status="rejected",
                strategy_error="every candidate rejected: " + "; ".join(reasons)
            )
        elif len(ok) == 1:
            results[i] = dict(strategy=ok[0], strategy_status="kept")
        else:
            to_rank.append((i, ok))
    if to_rank:
        rank_prompts = [
            RANK_PROMPT.format(
                n=len(ok), problem=batch[i][cfg.problem_field],
                solution=batch[i][cfg.solution_field],
                candidates="\n\n".join(f"Candidate {k + 1}:\n{c}" for k, c in enumerate(ok))
            )
            for i, ok in to_rank
        ]
        for (i, ok), out in zip(to_rank, backend.chat(rank_prompts, 1, 0.0)):
            best = None if isinstance(out, Exception) else parse_best(out[0], len(ok))
            if best is None:
                error = (
                    f"request failed: {str(out)[:300]}"
                    if isinstance(out, Exception)
                    else f"unparsable ranking: {out[0][:200]!r}"
                )
                results[i] = dict(strategy="", strategy_status="failed", strategy_error=error)
            else:
                results[i] = dict(strategy=ok[best], strategy_status="kept")
    return [{**row, **res} for row, res in zip(batch, results)]


def main(argv=None) -> int:
    try:
        cfg = inputs.config_from_args(ExtractConfig, argv, "SGPO strategy extraction")
        for name in ("input", "output", "model"):
            if not getattr(cfg, name):
                raise inputs.UsageError(f"--{name}: required")
        if cfg.backend not in ("openai", "hf"):
            raise inputs.UsageError("--backend: must be openai or hf")
        if cfg.num_candidates < 1 or cfg.batch_size < 1 or cfg.retries < 0:
            raise inputs.UsageError(
                "--num_candidates and --batch_size must be >= 1, --retries >= 0"
            )
        rows = inputs.load_problems(
            cfg.input, (cfg.problem_field, cfg.answer_field, cfg.solution_field), skip_unkept=False
        )
        if os.path.isdir(cfg.output) or (
            os.path.exists(cfg.output) and not os.access(cfg.output, os.W_OK)
        ):
            raise inputs.UsageError(
                f"--output {cfg.output}: "
                f"{'is a directory' if os.path.isdir(cfg.output) else 'not writable'}"
            )
        inputs.check_writable_dir(
            os.path.dirname(cfg.output) or ".", f"--output {cfg.output}: folder"
        )
        done = done_rows(cfg)
        backend = (OpenAIBackend if cfg.backend == "openai" else HFBackend)(cfg)
    except inputs.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rows[:cfg.limit] if cfg.limit else rows
    todo = [r for r in rows if str(r["id"]) not in done]
    counts = {"kept": 0, "rejected": 0, "failed": 0, "skipped": len(rows) - len(todo)}
    request_errors = []
    # rows are written whole, a batch at a time: Ctrl-C loses the batch in flight only
    with open(cfg.output, "a") as out, open(rejected_path(cfg), "a") as side, \
            tqdm(total=len(todo), desc="strategies") as bar:
        for i in range(0, len(todo), cfg.batch_size):
            rejected = []
            for row in process(todo[i : i + cfg.batch_size], backend, cfg, counts, rejected):
                counts[row["strategy_status"]] += 1
                if row.get("strategy_error", "").startswith("request failed"):
                    request_errors.append(row["strategy_error"])
                out.write(json.dumps(row) + "\n")
            side.writelines(json.dumps(r) + "\n" for r in rejected)
            out.flush()
            side.flush()
            bar.update(len(todo[i : i + cfg.batch_size]))
    # choices asked vs received: a server may cap n
    print(json.dumps({**counts, **getattr(backend, "counts", {})}))
    candidates = sum(v for k, v in counts.items() if k.startswith("candidates_"))
    unformatted = counts.get("candidates_off_format", 0) + counts.get("candidates_malformed", 0)
    if cfg.backend == "hf" and candidates and unformatted == candidates:
        print(f"hint: no candidate of {cfg.model} had the three fields (off-format or malformed: "
              f"{rejected_path(cfg)}): a model this small may not follow the prompt; strategies "
              "come from a strong model", file=sys.stderr)
    if todo and len(request_errors) == len(todo):
        print(f"error: every request failed; the first: {request_errors[0]}", file=sys.stderr)
        return 1
    return 0


def rejected_path(cfg: ExtractConfig) -> str:
    """The side file of rejected candidates: a line each, with its row's id and the reason."""
    return re.sub(r"\.jsonl$", "", cfg.output) + ".rejected.jsonl"


def interrupted(cfg) -> str:
    """Ctrl-C's one line: what --output holds, and how to continue."""
    done = len(written_rows(cfg.output)) if cfg else 0
    if not done:
        return "nothing written yet"
    return (f"{done} rows kept in {cfg.output}; the same command continues with the rest "
            "(the batch in flight is redone)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        try:
            cfg = inputs.config_from_args(ExtractConfig, None, "")
        except inputs.UsageError:
            cfg = None
        print(f"\ninterrupted: {interrupted(cfg)}", file=sys.stderr)
        sys.stderr.flush()
        # (the OpenAI back end's threads may be waiting on requests: not joined)
        os._exit(130)
