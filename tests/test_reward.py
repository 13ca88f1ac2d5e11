"""The shared grader: correct answers in common forms, garbage, and bounded time on pathological
input."""

import json
import time
from pathlib import Path

import pytest

import reward
from tests.conftest import ROOT

CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{7}", "-7", 0.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{(0, 1)}", "[0,1)", 0.0),
    ("The final answer is 42.", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("no answer here", "42", 0.0),
    ("", "42", 0.0),
    ("\\boxed{", "42", 0.0),
    ("}}}{{{\\frac{\\boxed", "1", 0.0),
    ("\\boxed{3}", "not latex at all \\frac{", 0.0),
    # units and \\text{}
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{5}", "5\\text{ cm}", 1.0),
    ("\\boxed{5 \\mbox{ inches}}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\$18.90}", "18.9", 1.0),
    ("\\boxed{\\text{(A)}}", "\\text{(A)}", 1.0),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    # percentages
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    # intervals, tuples, sets
    ("\\boxed{x \\in [2, 5)}", "[2,5)", 1.0),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0),
    ("\\boxed{(3, -4)}", "(3,-4)", 1.0),
    ("\\boxed{(-4, 3)}", "(3,-4)", 0.0),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", 1.0),
    # fractions, roots, constants
    ("\\boxed{-\\frac{1}{3}}", "-\\frac13", 1.0),
    ("\\boxed{\\tfrac72}", "\\frac{7}{2}", 1.0),
    ("\\boxed{\\dfrac{7}{2}}", "3.5", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{1.414}", "\\sqrt{2}", 0.0),
    ("\\boxed{3.14159}", "\\pi", 0.0),
    ("\\boxed{10^{3}}", "1000", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{x=3}", "3", 1.0),
    # several boxed answers: their set must equal the gold (listing candidates is not rewarded)
    ("\\boxed{2}, \\boxed{3}", "2, 3", 1.0),
    ("\\boxed{2} and \\boxed{3}", "2", 0.0),
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "2", 0.0),
]


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_math_reward(response, answer, expected):
    assert reward.math_reward(response, answer) == expected


def test_power_tower_is_bounded():
    start = time.time()
    assert reward.math_reward("\\boxed{9^{9^{9^{9^{9}}}}}", "9^{9^{9^{9}}}", timeout=1) == 0.0
    assert time.time() - start < 5  # parse and verify are each bounded by the timeout


MATH500 = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "math500.jsonl"
# 20 MATH-500 rows (HuggingFaceH4/MATH-500, the test split of Hendrycks et al.'s MATH, MIT
# license) with answers of many forms: a tuple, an expression, text, degrees, a base subscript, a
# list, a polynomial, a matrix, an interval (tests/data/README.md)
SAMPLE = Path(__file__).with_name("data") / "math500_sample.jsonl"


def test_math500_sample_reference_solutions():
    """The grader accepts each committed reference solution, and none of them paired with another
    row's answer (every answer of the sample differs from the others)."""
    rows = [json.loads(line) for line in open(SAMPLE)]
    assert len(rows) == 20 and len({r["answer"] for r in rows}) == 20
    assert [r["id"] for r in rows if not reward.math_reward(r["solution"], r["answer"])] == []
    for shift in (1, 7):
        wrong = [r["id"] for i, r in enumerate(rows)
                 if reward.math_reward(r["solution"], rows[(i + shift) % 20]["answer"])]
        assert wrong == [], shift


def test_math500_reference_solutions():
    """All 500 where ../shared is there, else the committed sample: the grader accepts the
    reference solutions (the open-r1-style bar is 492/500) and none of them when paired with
    another problem's (different) answer."""
    rows = [json.loads(line) for line in open(MATH500 if MATH500.exists() else SAMPLE)]
    accepted = sum(reward.math_reward(r["solution"], r["answer"]) for r in rows)
    assert accepted >= 492 / 500 * len(rows), accepted
    wrong = []
    for i, r in enumerate(rows):
        other = rows[(i + 7) % len(rows)]["answer"]
        if other != r["answer"] and reward.math_reward(r["solution"], other):
            wrong.append((r["id"], other))
    assert not wrong, wrong[:5]


def test_grader_pool_equals_serial_and_keeps_the_timeout():
    """--reward_workers: the pool returns exactly the serial rewards in order, and its workers'
    SIGALRM timeout bounds a power tower (it would hang a worker without it). The pool starts once a
    call graded inline was slow."""
    responses = [r for r, _, _ in CASES] * 3 + ["\\boxed{9^{9^{9^{9^{9}}}}}"]
    answers = [a for _, a, _ in CASES] * 3 + ["9^{9^{9^{9}}}"]
    serial = [reward.math_reward(r, a, 1) for r, a in zip(responses, answers)]
    assert serial == [e for _, _, e in CASES] * 3 + [0.0]
    grader = reward.Grader(2, timeout=1)
    try:
        # fast: stays inline
        assert grader(responses[:4], answers[:4]) == serial[:4] and grader.pool is None
        # the tower took > 0.5 s: a pool
        assert grader(responses, answers) == serial and grader.pool is not None
        start = time.time()
        assert grader(responses, answers) == serial
        assert grader(responses[::-1], answers[::-1]) == serial[::-1]  # the same pool, reused
        assert time.time() - start < 30
    finally:
        grader.close()
    inline = reward.Grader(1, timeout=1)
    assert inline(responses, answers) == serial and inline.pool is None  # one worker: never a pool


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr(reward.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert reward.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert reward.default_workers() == 4
    monkeypatch.setattr(reward.os, "sched_getaffinity", lambda pid: {0})
    assert reward.default_workers() == 1


def test_grader_workers_end_when_the_trainer_is_killed(tmp_path):
    """A SIGKILLed trainer never closes its pool: the workers notice and exit instead of waiting
    forever."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\nsys.path.insert(0, %r)\nimport reward\nif __name__ == '__main__':\n"
        "    g = reward.Grader(2, 1)\n    g.start_pool()\n    g(['\\\\boxed{1}'] * 8, ['1'] * 8)\n"
        "    print(*[p.pid for p in g.pool._processes.values()], flush=True)\n    time.sleep(600)\n"
        % str(Path(__file__).resolve().parents[1])
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(
        os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]
        for w in workers
    ):
        time.sleep(0.2)
    assert not [
        w
        for w in workers
        if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
    ]


def test_grader_workers_ignore_ctrl_c(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the pool's workers ignore it (no
    KeyboardInterrupt traceback of theirs; the trainer closes the pool) and still grade."""
    import subprocess
    import sys
    script = tmp_path / "pool.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from reward import Grader\n"
        "if __name__ == '__main__':\n"
        "    g = Grader(2)\n"
        "    g.start_pool()\n"
        "    print(g(['\\\\boxed{1}'] * 4, ['1'] * 4), flush=True)\n"
        "    for p in list(g.pool._processes.values()):\n"
        "        os.kill(p.pid, signal.SIGINT)\n"
        "    time.sleep(1)\n"
        "    print(g(['\\\\boxed{2}'] * 4, ['1'] * 4), flush=True)\n"
        "    g.close()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["[1.0, 1.0, 1.0, 1.0]", "[0.0, 0.0, 0.0, 0.0]"]
    assert "KeyboardInterrupt" not in proc.stderr
