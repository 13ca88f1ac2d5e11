"""Writes the real-model demo's problems: grade-school arithmetic and one-step equations that
SmolLM2-135M-Instruct solves sometimes, each with a worked solution and the strategy of its kind,
written the way extract_strategies.py asks for one (problem type, technique, steps; no computation,
no answer). Written for this project, no outside source (data/README.md).

    python data/make_arithmetic.py   # rewrites data/arithmetic_{warmup,train,test}.jsonl
"""

import json
import os
import random

# one strategy per kind of problem: reusable, as the paper's are, and free of any number
KINDS = {
    "add": (
        "Problem type: combining two amounts\n"
        "Strategy: when an amount grows by another amount, the total is their sum.\n"
        "Steps:\n- find the starting amount and the amount added\n- add the two amounts\n"
        "- write the sum in \\boxed{}",
        "Tom has {a} apples and buys {b} more apples. How many apples does he have now?",
        "Tom starts with {a} apples and buys {b} more, so he has {a} + {b} = {c} apples. "
        "The answer is \\boxed{{{c}}}.",
        lambda a, b: a + b,
    ),
    "sub": (
        "Problem type: taking part of an amount away\n"
        "Strategy: what is left is the starting amount minus the part taken away.\n"
        "Steps:\n- find the starting amount and the part given away\n"
        "- subtract the part from the starting amount\n- write the difference in \\boxed{}",
        "Sara had {s} stickers and gave {b} of them to a friend. How many stickers does she "
        "have left?",
        "Sara had {s} stickers and gave away {b}, so she has {s} - {b} = {c} left. "
        "The answer is \\boxed{{{c}}}.",
        lambda a, b: a,
    ),
    "mul": (
        "Problem type: equal groups\n"
        "Strategy: the total of equal groups is the number of groups times the size of one "
        "group.\nSteps:\n- find the number of groups and the size of one group\n"
        "- multiply them\n- write the product in \\boxed{}",
        "A box has {a} rows with {b} pencils in each row. How many pencils are in the box?",
        "There are {a} rows of {b} pencils, so {a} \\times {b} = {c} pencils. "
        "The answer is \\boxed{{{c}}}.",
        lambda a, b: a * b,
    ),
    "equation": (
        "Problem type: a one-step linear equation\n"
        "Strategy: undo the addition by subtracting the same number from both sides.\n"
        "Steps:\n- subtract the constant from both sides\n"
        "- the variable is left alone on one side\n- write its value in \\boxed{}",
        "Solve for $x$: $x + {a} = {s}$.",
        "Subtracting {a} from both sides gives $x = {s} - {a} = {c}$. "
        "The answer is \\boxed{{{c}}}.",
        lambda a, b: b,
    ),
    "double": (
        "Problem type: twice an amount\n"
        "Strategy: twice an amount is the amount added to itself.\n"
        "Steps:\n- find the amount\n- add it to itself\n- write the result in \\boxed{}",
        "Ben has {a} marbles. Ann has twice as many marbles as Ben. How many marbles does "
        "Ann have?",
        "Ann has twice Ben's {a} marbles: {a} + {a} = {c}. The answer is \\boxed{{{c}}}.",
        lambda a, b: 2 * a,
    ),
    "sum": (
        "Problem type: adding two whole numbers\n"
        "Strategy: add the ones, then the tens, carrying when a column passes nine.\n"
        "Steps:\n- add the ones digits\n- add the tens digits and any carry\n"
        "- write the sum in \\boxed{}",
        "What is ${a} + {b}$?",
        "Adding, ${a} + {b} = {c}$. The answer is \\boxed{{{c}}}.",
        lambda a, b: a + b,
    ),
}
# problems per kind in each file: about a third of the training problems for the warm-up, as in
# the paper; the test problems for evaluate.py
SPLITS = {"warmup": 4, "train": 8, "test": 5}


# doubling reads one operand: up to 25, so that its 17 problems differ
LARGEST_A = {"double": 25}


def rows(seed: int = 0) -> dict:
    """{split: rows}; every problem at most once over all splits."""
    rng, seen, out = random.Random(seed), set(), {split: [] for split in SPLITS}
    for split, per_kind in SPLITS.items():
        for kind, (strategy, problem, solution, answer) in KINDS.items():
            for _ in range(per_kind):
                text = None
                while text is None or text in seen:
                    a, b = rng.randint(2, LARGEST_A.get(kind, 9)), rng.randint(2, 9)
                    values = dict(a=a, b=b, s=a + b, c=answer(a, b))
                    text = problem.format(**values)
                seen.add(text)
                out[split].append({
                    "id": f"{split}/{kind}/{len(out[split])}",
                    "problem": text,
                    "answer": str(values["c"]),
                    "solution": solution.format(**values),
                    "strategy": strategy,
                })
    return out


if __name__ == "__main__":
    folder = os.path.dirname(os.path.abspath(__file__))
    for split, split_rows in rows().items():
        with open(os.path.join(folder, f"arithmetic_{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in split_rows)
