"""extract_strategies.py against a stub OpenAI-compatible server on 127.0.0.1 and with the tiny local model."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import extract_strategies as ex
import sgpo
from tests.conftest import write_jsonl

GOOD = "Problem type: linear equation\nStrategy: isolate the unknown.\nSteps:\n- move constants\n- divide"
BETTER = "Problem type: linear equation\nStrategy: balance both sides.\nSteps:\n- subtract\n- divide by the coefficient"
LEAKY = "Problem type: linear equation\nStrategy: solve it.\nSteps:\n- get $x = \\frac{85}{2}$"
LITERAL = "Problem type: linear equation\nStrategy: note the answer 42.5 early.\nSteps:\n- check"


class Stub(BaseHTTPRequestHandler):
    """Canned chat completions: candidates by problem, a ranking, and one 500 before answering problem p2."""
    requests, failed_once = [], set()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Stub.requests.append((self.headers.get("Authorization"), prompt))
        if "p2:" in prompt and "p2" not in Stub.failed_once:
            Stub.failed_once.add("p2")
            self.send_response(500)
            self.end_headers()
            return
        if prompt.startswith("Below are"):
            texts = ["I pick BEST: 2"] if "p3:" not in prompt else ["no idea"]
        elif "p4:" in prompt:
            texts = [LEAKY, LITERAL] * 3
        else:
            texts = [GOOD, LEAKY, BETTER, "garbage", LITERAL][: body["n"]]
        reply = {"choices": [{"message": {"role": "assistant", "content": t}} for t in texts]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    Stub.requests, Stub.failed_once = [], set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _input(tmp_path):
    rows = [{"id": f"p{i}", "problem": f"p{i}: solve 2x = 85", "answer": "42.5", "solution": "x = 85/2 = \\boxed{42.5}"}
            for i in range(1, 5)]
    path = tmp_path / "in.jsonl"
    write_jsonl(path, rows)
    return path


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_leak_guard():
    assert ex.leaks_answer(LEAKY, "42.5")  # math span x = 85/2, an equal expression in another form
    assert ex.leaks_answer("take $\\frac{85}{2}$", "42.5")  # equal expression, other form
    assert ex.leaks_answer(LITERAL, "42.5")  # literal
    assert not ex.leaks_answer(GOOD, "42.5")
    assert not ex.leaks_answer("Step 2: add", "2")  # a lone digit is only checked in math spans
    assert ex.leaks_answer("so $y=2$", "2")


def test_openai_backend_end_to_end(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STUB_KEY", "sekret")
    out = tmp_path / "out.jsonl"
    args = ["--input", str(_input(tmp_path)), "--output", str(out), "--backend", "openai", "--base_url", server,
            "--model", "stub", "--api_key_env", "STUB_KEY", "--backoff", "0.01", "--batch_size", "2"]
    assert ex.main(args) == 0
    rows = {r["id"]: r for r in _read(out)}
    assert rows["p1"]["strategy"] == BETTER and rows["p1"]["strategy_status"] == "kept"  # ranked best of 2 clean
    assert rows["p2"]["strategy"] == BETTER  # the 500 was retried
    assert rows["p3"]["strategy_status"] == "failed" and "unparsable ranking" in rows["p3"]["strategy_error"]
    assert rows["p4"]["strategy"] == "" and rows["p4"]["strategy_status"] == "rejected"  # every candidate leaked
    assert all(r["answer"] == "42.5" and r["solution"] for r in rows.values())  # input fields kept
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["kept"], counts["rejected"], counts["failed"]) == (2, 1, 1)
    assert all(auth == "Bearer sekret" for auth, _ in Stub.requests)
    # sgpo.py trains on the kept rows only
    assert [q["id"] for q in sgpo.load_problems(str(out))] == ["p1", "p2"]

    # interrupted run: the last row and a half-written line are missing -> a rerun redoes only that row
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:20])
    Stub.requests = []
    assert ex.main(args) == 0
    ids = [r["id"] for r in _read(out)]
    assert sorted(ids) == ["p1", "p2", "p3", "p4"]  # no duplicates
    assert all(lines[3].split('"')[3] + ":" in p for _, p in Stub.requests)  # requests only for the redone row
    # --retry_failed redoes p3 only
    Stub.requests = []
    assert ex.main(args + ["--retry_failed"]) == 0
    assert sorted(r["id"] for r in _read(out)) == ["p1", "p2", "p3", "p4"]
    assert Stub.requests and all("p3:" in p for _, p in Stub.requests)


def test_endpoint_down_records_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--input", str(_input(tmp_path)), "--output", str(out), "--base_url", "http://127.0.0.1:9/v1", "--model", "m",
            "--retries", "1", "--backoff", "0.01", "--timeout", "2"]
    assert ex.main(args) == 0
    rows = _read(out)
    assert len(rows) == 4 and all(r["strategy_status"] == "failed" and r["strategy_error"] for r in rows)


def test_hf_backend_plumbing(warm_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--input", str(_input(tmp_path)), "--output", str(out), "--backend", "hf", "--model", str(warm_dir),
            "--max_new_tokens", "8", "--num_candidates", "2"]
    assert ex.main(args) == 0
    rows = _read(out)
    assert [r["id"] for r in rows] == ["p1", "p2", "p3", "p4"]
    assert all(r["strategy_status"] in ("kept", "rejected", "failed") for r in rows)


@pytest.mark.parametrize("content,message", [
    ('{"problem": "p", "answer": "1"}\n', ":1: solution: missing"),
    ('{"problem": "p", "answer": "1", "solution": ""}\n', ":1: solution: empty"),
    ('oops\n', ":1: line: not valid JSON"),
    ('', "no problems (empty file)"),
])
def test_bad_input(content, message, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    out = tmp_path / "out.jsonl"
    assert ex.main(["--input", str(path), "--output", str(out), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_readme_prints_the_prompts():
    from tests.conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    assert ex.STRATEGY_PROMPT in readme and ex.RANK_PROMPT.split("{candidates}")[0] in readme
    assert sgpo.AUTO_TEMPLATE in readme and sgpo.GUIDED_TEMPLATE in readme
