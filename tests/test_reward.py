"""The shared grader: correct answers in common forms, garbage, and bounded time on pathological input."""
import time

import pytest

import sgpo

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
]


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_math_reward(response, answer, expected):
    assert sgpo.math_reward(response, answer) == expected


def test_power_tower_is_bounded():
    start = time.time()
    assert sgpo.math_reward("\\boxed{9^{9^{9^{9^{9}}}}}", "9^{9^{9^{9}}}", timeout=1) == 0.0
    assert time.time() - start < 5  # parse and verify are each bounded by the timeout
