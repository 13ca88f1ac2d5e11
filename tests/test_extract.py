"""extract_strategies.py against a stub OpenAI-compatible server on 127.0.0.1 and with the tiny
local model."""

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import extract_strategies as ex
import engine
import inputs
from tests.conftest import write_jsonl

GOOD = (
    "Problem type: linear equation\nStrategy: isolate the unknown.\nSteps:\n- move constants\n"
    "- divide"
)
BETTER = (
    "Problem type: linear equation\nStrategy: balance both sides.\nSteps:\n- subtract\n"
    "- divide by the coefficient"
)
LEAKY = "Problem type: linear equation\nStrategy: solve it.\nSteps:\n- get $x = \\frac{85}{2}$"
LITERAL = "Problem type: linear equation\nStrategy: note the answer 42.5 early.\nSteps:\n- check"


class ChatServer(BaseHTTPRequestHandler):
    """A stub chat-completions endpoint: subclasses answer(body, prompt) with (status, reply dict or
    None, headers)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, reply, headers = self.answer(body, body["messages"][0]["content"])
        data = json.dumps(reply).encode() if reply is not None else b""
        self.send_response(status)
        for key, value in {
            **headers, **({"Content-Type": "application/json"} if reply is not None else {})
        }.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def choices(texts):
    return {"choices": [{"message": {"role": "assistant", "content": t}} for t in texts]}


@contextmanager
def serving(handler):
    """handler on 127.0.0.1 (a free port) for the block; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Stub(ChatServer):
    """Canned chat completions: candidates by problem, a ranking, and one 500 before answering
    problem p2."""

    requests, failed_once = [], set()

    def answer(self, body, prompt):
        Stub.requests.append((self.headers.get("Authorization"), prompt))
        if "p2:" in prompt and "p2" not in Stub.failed_once:
            Stub.failed_once.add("p2")
            return 500, None, {}
        if prompt.startswith("Below are"):
            texts = ["I pick BEST: 2"] if "p3:" not in prompt else ["no idea"]
        elif "p4:" in prompt:
            texts = [LEAKY, LITERAL] * 3
        else:
            texts = [GOOD, LEAKY, BETTER, "garbage", LITERAL][: body["n"]]
        return 200, choices(texts), {}


@pytest.fixture
def server():
    Stub.requests, Stub.failed_once = [], set()
    with serving(Stub) as url:
        yield url


def _input(tmp_path):
    rows = [
        {
            "id": f"p{i}", "problem": f"p{i}: solve 2x = 85", "answer": "42.5",
            "solution": "x = 85/2 = \\boxed{42.5}"
        }
        for i in range(1, 5)
    ]
    path = tmp_path / "in.jsonl"
    write_jsonl(path, rows)
    return path


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_leak_guard():
    assert ex.leak_form(LEAKY, "42.5")  # math span x = 85/2, an equal expression in another form
    assert ex.leak_form("take $\\frac{85}{2}$", "42.5")  # equal expression, other form
    assert ex.leak_form(LITERAL, "42.5")  # literal
    assert not ex.leak_form(GOOD, "42.5")
    assert not ex.leak_form("Step 2: add", "2")  # a lone digit is only checked in math spans
    assert ex.leak_form("so $y=2$", "2")


def test_each_rejection_names_its_reason():
    assert ex.judge(GOOD, "42.5", 5) == (GOOD, "")
    assert ex.judge("Sure! " + GOOD, "42.5", 5) == (GOOD, "")  # the block, from its first field
    assert ex.judge("The answer is \\boxed{42.5}", "42.5", 5) == (None, "off-format")
    assert ex.judge("Problem type: x\nSteps:\n- y", "1", 5) == (None, "malformed: no Strategy:")
    assert ex.judge("Problem type: x", "1", 5) == (None, "malformed: no Strategy: Steps:")
    assert ex.judge("Problem type: x\nStrategy: \nSteps:\n- y", "1", 5) == (
        None, "malformed: empty Strategy:")
    assert ex.judge("Problem type: x\nStrategy: y\nSteps:", "1", 5) == (
        None, "malformed: empty Steps:")
    assert ex.judge(LEAKY, "42.5", 5) == (None, "leaked: math span")
    assert ex.judge(LITERAL, "42.5", 5) == (None, "leaked: literal")
    keys = [ex.reason_key(why) for why in ("off-format", "malformed: no Steps:",
                                           "leaked: literal", "leaked: math span")]
    assert keys == ["candidates_off_format", "candidates_malformed", "candidates_leaked_literal",
                    "candidates_leaked_math_span"]


def test_openai_backend_end_to_end(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUB_KEY", "sekret")
    out = tmp_path / "out.jsonl"
    args = [
        "--input", str(_input(tmp_path)), "--output", str(out), "--backend", "openai", "--base_url",
        server, "--model", "stub", "--api_key_env", "STUB_KEY", "--backoff", "0.01", "--batch_size",
        "2"
    ]
    assert ex.main(args) == 0
    rows = {r["id"]: r for r in _read(out)}
    # ranked best of 2 clean
    assert rows["p1"]["strategy"] == BETTER and rows["p1"]["strategy_status"] == "kept"
    assert rows["p2"]["strategy"] == BETTER  # the 500 was retried
    assert (
        rows["p3"]["strategy_status"] == "failed"
        and "unparsable ranking" in rows["p3"]["strategy_error"]
    )
    # every candidate leaked
    assert rows["p4"]["strategy"] == "" and rows["p4"]["strategy_status"] == "rejected"
    assert all(r["answer"] == "42.5" and r["solution"] for r in rows.values())  # input fields kept
    std = capsys.readouterr()
    assert "requests" in std.err  # progress inside a batch
    counts = json.loads(std.out.strip().splitlines()[-1])
    assert (counts["kept"], counts["rejected"], counts["failed"]) == (2, 1, 1)
    # p1-p3: "garbage" off-format, LEAKY a math span, LITERAL literal; p4: 3 LEAKY, 2 LITERAL
    assert (counts["candidates_off_format"], counts["candidates_leaked_math_span"],
            counts["candidates_leaked_literal"]) == (3, 6, 5)
    side = _read(tmp_path / "out.rejected.jsonl")
    assert len(side) == 14 and {r["candidate"] for r in side} == {"garbage", LEAKY, LITERAL}
    assert rows["p4"]["strategy_error"] == "every candidate rejected: " + "; ".join(
        ["leaked: math span", "leaked: literal"] * 2 + ["leaked: math span"])
    assert all(auth == "Bearer sekret" for auth, _ in Stub.requests)
    # sgpo.py trains on the kept rows only
    assert [q["id"] for q in inputs.load_problems(str(out))] == ["p1", "p2"]

    # interrupted run: the last row and a half-written line are missing -> a rerun redoes only that
    # row
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])
    Stub.requests = []
    assert ex.main(args) == 0
    ids = [r["id"] for r in _read(out)]
    assert sorted(ids) == ["p1", "p2", "p3", "p4"]  # no duplicates
    # requests only for the redone row
    assert all(lines[3].split('"')[3] + ":" in p for _, p in Stub.requests)
    # --retry_failed redoes p3 only
    Stub.requests = []
    assert ex.main(args + ["--retry_failed"]) == 0
    assert sorted(r["id"] for r in _read(out)) == ["p1", "p2", "p3", "p4"]
    assert Stub.requests and all("p3:" in p for _, p in Stub.requests)


def test_endpoint_down_exits_1_with_the_first_error_last(tmp_path, capsys):
    """No server at --base_url (the default backend is openai): every row is recorded as failed
    (--retry_failed redoes them), and the run exits 1 with the first error on its last line."""
    out = tmp_path / "out.jsonl"
    args = [
        "--input", str(_input(tmp_path)), "--output", str(out), "--base_url",
        "http://127.0.0.1:9/v1", "--model", "m", "--retries", "1", "--backoff", "0.01", "--timeout",
        "2"
    ]
    assert ex.main(args) == 1
    rows = _read(out)
    assert len(rows) == 4 and all(
        r["strategy_status"] == "failed" and r["strategy_error"] for r in rows
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: every request failed; the first: request failed: "
                           "http://127.0.0.1:9/v1/chat/completions: ") and "refused" in last


def test_hf_backend_plumbing(warm_dir, tmp_path, capsys):
    """--limit 3 of 4 rows; the warm tiny model answers in \\boxed{} and writes no strategy block:
    every candidate off-format, kept in the side file with its reason, counted, every row
    rejected, and a hint that the model is too small."""
    out = tmp_path / "out.jsonl"
    args = [
        "--input", str(_input(tmp_path)), "--output", str(out), "--backend", "hf", "--model",
        str(warm_dir), "--max_new_tokens", "8", "--num_candidates", "2", "--limit", "3"
    ]
    assert ex.main(args) == 0
    rows = _read(out)
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"]
    assert all(r["strategy_status"] == "rejected" and r["strategy"] == "" for r in rows), rows
    assert rows[0]["strategy_error"] == "every candidate rejected: off-format; off-format"
    side = _read(tmp_path / "out.rejected.jsonl")
    assert [(r["id"], r["reason"]) for r in side] == [
        (f"p{i}", "off-format") for i in (1, 1, 2, 2, 3, 3)]
    assert all("Problem type:" not in r["candidate"] for r in side)
    std = capsys.readouterr()
    assert "decode steps" in std.err  # progress inside each generate call
    counts = json.loads(std.out.strip().splitlines()[-1])
    assert counts == {"kept": 0, "rejected": 3, "failed": 0, "skipped": 0,
                      "candidates_off_format": 6}
    assert std.err.strip().splitlines()[-1] == (
        f"hint: no candidate of {warm_dir} had the three fields (off-format or malformed: "
        f"{tmp_path / 'out.rejected.jsonl'}): a model this small may not follow the prompt; "
        "strategies come from a strong model")


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"problem": "p", "answer": "1"}\n', ":1: solution: missing"),
        ('{"problem": "p", "answer": "1", "solution": ""}\n', ":1: solution: empty"),
        ("oops\n", ":1: line: not valid JSON"), ("", "no problems (empty file)")
    ],
)
def test_bad_input(content, message, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    out = tmp_path / "out.jsonl"
    assert ex.main(["--input", str(path), "--output", str(out), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_reference_prints_the_prompts():
    from tests.conftest import ROOT

    readme = (ROOT / "docs" / "reference.md").read_text()
    assert ex.STRATEGY_PROMPT in readme and ex.RANK_PROMPT.split("{candidates}")[0] in readme
    assert engine.AUTO_TEMPLATE in readme and engine.GUIDED_TEMPLATE in readme


class Faulty(ChatServer):
    """A server that misbehaves as real ones do: it ignores n (one choice per reply), answers 200
    with no choices (problem f1) or a null content (f2), and 429 with Retry-After: 3 before its
    first answer about f3."""

    requests, seen = [], set()

    def answer(self, body, prompt):
        Faulty.requests.append(
            (
                prompt.split(":")[0]
                if prompt.startswith("Below")
                else prompt.split("Problem:\n")[1][:2],
                body["n"],
            )
        )
        if "f3:" in prompt and "f3" not in Faulty.seen:
            Faulty.seen.add("f3")
            return 429, None, {"Retry-After": "3"}
        if "f1:" in prompt:
            return 200, {"choices": []}, {}
        return (
            200,
            choices(
                [
                    None
                    if "f2:" in prompt
                    else "I pick BEST: 1"
                    if prompt.startswith("Below are")
                    else GOOD
                ]
            ),
            {},
        )


def test_misbehaving_server_tops_up_n_retries_after_and_records_faults_as_failed(
    tmp_path, monkeypatch, capsys
):
    Faulty.requests, Faulty.seen = [], set()
    slept = []
    monkeypatch.setattr(ex.time, "sleep", slept.append)
    rows = [
        {"id": f"f{i}", "problem": f"f{i}: solve 2x = 85", "answer": "42.5", "solution": "x = 42.5"}
        for i in range(4)
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = [
        "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", "m",
        "--num_candidates", "3", "--batch_size", "1", "--timeout", "10"
    ]
    with serving(Faulty) as url:
        args += ["--base_url", url]
        assert ex.main(args) == 0
        got = {r["id"]: r for r in _read(out)}
        # 3 candidates, then a ranking
        assert got["f0"]["strategy"] == GOOD and got["f3"]["strategy"] == GOOD
        # asked again for what the server left out
        assert [n for p, n in Faulty.requests if p == "f0"] == [3, 2, 1]
        # an empty reply is the endpoint's fault: failed (redone later), not rejected
        for fid in ("f1", "f2"):
            assert (
                got[fid]["strategy_status"] == "failed"
                and "no usable choice" in got[fid]["strategy_error"]
            )
        assert slept == [3.0]  # the server's Retry-After, not the 1 s backoff
        counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (counts["kept"], counts["failed"]) == (2, 2)
        assert (
            counts["choices_asked"] == 3 + 2 + 1 + 1 + 3 + 3 + 3 + 2 + 1 + 1
            and counts["choices_received"] == 8
        )
        Faulty.requests = []
        # both redone rows fail again: every request of the run failed
        assert ex.main(args + ["--retry_failed"]) == 1
        assert {p for p, _ in Faulty.requests} == {"f1", "f2"}
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: every request failed; the first: request failed: the endpoint returned no "
            'usable choice ({"choices": []})')


def test_retry_delay_honours_retry_after_bounded_by_timeout():
    import email.message
    import email.utils
    import urllib.error

    def error(code, value):
        headers = email.message.Message()
        if value is not None:
            headers["Retry-After"] = value
        return urllib.error.HTTPError("http://x", code, "busy", headers, None)

    assert ex.retry_delay(error(429, "7"), 1.0, 120.0) == 7.0
    assert ex.retry_delay(error(503, "7"), 1.0, 5.0) == 5.0  # never past --timeout
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < ex.retry_delay(error(503, later), 1.0, 120.0) <= 30
    assert ex.retry_delay(error(500, None), 2.0, 120.0) == 2.0  # no header: the backoff
    assert ex.retry_delay(ConnectionError(), 4.0, 120.0) == 4.0


def test_resume_after_a_line_cut_inside_a_string(tmp_path):
    """A killed run's last line may end in '}' inside a string (a strategy with LaTeX): parsed, not
    guessed."""
    out = tmp_path / "out.jsonl"
    whole = json.dumps({"id": "p1", "problem": "q", "strategy": "s", "strategy_status": "kept"})
    out.write_text(whole + "\n" + '{"id": "p2", "problem": "q", "strategy": "use \\\\frac{1}')
    done = ex.done_rows(ex.ExtractConfig(output=str(out)))
    assert list(done) == ["p1"] and out.read_text() == whole + "\n"


def test_leak_guard_sees_nested_braces_and_display_fractions():
    gold = "\\frac{3}{4}"
    assert ex.boxed_spans("so \\boxed{\\dfrac{3}{4}} and \\boxed{x}") == ["\\dfrac{3}{4}", "x"]
    assert ex.leak_form("Steps:\n- it is \\boxed{\\dfrac{3}{4}}", gold)  # boxed, nested braces
    assert ex.leak_form("Steps:\n- the ratio is \\tfrac{3}{4}", gold)  # literal, display form
    # an equal value in a nested-free box
    assert ex.leak_form("Steps:\n- answer \\boxed{0.75}", gold)
    assert not ex.leak_form("Steps:\n- write the ratio as \\boxed{\\frac{a}{b}}", gold)


def test_against_transformers_serve_which_ignores_n(tmp_path, capsys):
    """A real OpenAI-compatible server, `transformers serve` on the cups model (skipped without
    transformers' serving extras): it ignores `n` (one choice per request), so each problem's
    --num_candidates 2 take 2 requests."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import shutil
    import socket
    import subprocess
    import urllib.request
    from tests.conftest import ROOT

    if not shutil.which("transformers"):
        pytest.skip("no transformers CLI")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = str(ROOT / "toy" / "cups_data" / "model")
    server = subprocess.Popen(
        [
            "transformers", "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device",
            "cpu", "--default-seed", "0"
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, (
                    "transformers serve did not start"
                )
                time.sleep(1)
        rows = [
            {
                "id": f"c{i}", "problem": f"Ball under cup {i}. Swaps: 12 23. Which cup?",
                "answer": "3", "solution": "12:1 23:1 \\boxed{1}"
            }
            for i in (1, 2)
        ]
        write_jsonl(tmp_path / "in.jsonl", rows)
        out = tmp_path / "out.jsonl"
        assert (
            ex.main(
                [
                    "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base_url",
                    f"http://127.0.0.1:{port}/v1", "--model", model, "--num_candidates", "2",
                    "--max_new_tokens", "24", "--batch_size", "2", "--timeout", "60"
                ]
            )
            == 0
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # per problem: a request for 2 that brings 1 choice, then one for the missing 1 (the cups model
    # writes no strategy block, so the candidates are malformed and no ranking request follows)
    assert (counts["requests"], counts["choices_asked"], counts["choices_received"]) == (4, 6, 4), (
        counts
    )
    assert [r["strategy_status"] for r in _read(out)] == ["rejected", "rejected"]


def test_shipped_problems_are_the_generators_and_pass_the_extraction_checks():
    """data/: the files are what data/make_arithmetic.py writes; every strategy is one the
    extraction would keep (three fields, no leaked answer), every solution earns the reward, no
    problem is in two files, and sgpo.py's loader takes every row."""
    from data.make_arithmetic import rows
    from reward import math_reward
    from tests.conftest import ROOT

    seen = set()
    for split, expected in rows().items():
        path = ROOT / "data" / f"arithmetic_{split}.jsonl"
        assert _read(path) == expected, split
        assert len(inputs.load_problems(str(path))) == len(expected)
        for row in expected:
            assert ex.judge(row["strategy"], row["answer"], 5) == (row["strategy"], ""), row
            assert math_reward(row["solution"], row["answer"]) == 1.0, row
            assert row["problem"] not in seen
            seen.add(row["problem"])
    assert len(seen) == 102
