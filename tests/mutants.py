"""Plausible wiring bugs of rl_step, each applied to a scratch copy of the project, and the tests
that catch it.

    python tests/mutants.py                      # every bug, against tests/test_assembly.py
    python tests/mutants.py tests/test_e2e.py    # ... against other tests

A bug no test catches prints 'SURVIVED' and the script exits 1. When the code the bugs edit
changes, edit MUTANTS with it: test_assembly.py checks that each one still applies."""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, the code as written, the bug)
MUTANTS = {
    "1 alpha(q) dropped from the KD weight": (
        "sgpo.py", "r.weight = r.alpha / (len(r.response) * n_problems)",
        "r.weight = 1.0 / (len(r.response) * n_problems)"),
    "2 p_guided and p_auto swapped in the alpha update": (
        "sgpo.py", "update_alpha(prev, pg, pa,", "update_alpha(prev, pa, pg,"),
    "3 candidates scored under the guided prompt": (
        "sgpo.py", 'pairs = [(batch.auto_prompts[b], batch.rollouts',
        'pairs = [(batch.guided_prompts[b], batch.rollouts'),
    "4 candidates' score summed, not length-normalised": (
        "sgpo.py", '(x.mean() if cfg.target_score == "mean" else x.sum())', "x.sum()"),
    "5a GRPO token count of this rank only": (
        "sgpo.py", "n_tokens = all_reduce(torch.tensor(local, device=device))",
        "n_tokens = torch.tensor(local, device=device)"),
    "5b KD normaliser: this rank's problem count": (
        "sgpo.py", "n_problems = n * world_size() // k", "n_problems = n // k"),
    "6 gold answers tiled, not repeated per problem": (
        "sgpo.py", 'answers = repeat_each([q["answer"] for q in batch.problems], g)',
        'answers = [q["answer"] for q in batch.problems] * g'),
    "7 --target_selection false ignored (the first correct rollout)": (
        "sgpo.py", "select_target(r_guided[b], score[b], cfg.target_selection)",
        "select_target(r_guided[b], score[b], True)"),
    "8 --kd_loss rkl ignored (forward KL)": (
        "sgpo.py", 'kind = cfg.kd_loss if t_hidden is not None and cfg.kd_loss != "sft"',
        'kind = "fkl" if t_hidden is not None and cfg.kd_loss != "sft"'),
    "9 --use_grpo false ignored": (
        "sgpo.py", "if cfg.use_grpo and not (cfg.mask_truncated_completions",
        "if not (cfg.mask_truncated_completions"),
    "10 --use_kd false ignored": ("sgpo.py", "if not (cfg.use_kd and g2):", "if not g2:"),
}


def apply(source: str, code: str, bug: str) -> str:
    """source with its one occurrence of code replaced by bug; ValueError unless exactly one."""
    if source.count(code) != 1:
        raise ValueError(f"{code!r} occurs {source.count(code)} times")
    return source.replace(code, bug)


def failing_tests(tree: Path, tests: list) -> list:
    # (the check that each bug applies fails, by design, on a copy with a bug in it)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                           "-k", "not still_applies", *tests], cwd=tree, capture_output=True,
                          text=True)
    return [name.split("::", 1)[1] for name in re.findall(r"^FAILED (.+?)(?: - .*)?$",
                                                           proc.stdout, re.M)]


def main(tests) -> int:
    tests = tests or ["tests/test_assembly.py"]
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "sgpo"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "out", "__pycache__"))
        if failing_tests(tree, tests):
            print("the tests fail without any bug: fix them first")
            return 1
        for name, (file, code, bug) in MUTANTS.items():
            original = (tree / file).read_text()
            (tree / file).write_text(apply(original, code, bug))
            caught = failing_tests(tree, tests)
            (tree / file).write_text(original)
            survived += not caught
            print(f"{name}: " + (", ".join(caught) if caught else "SURVIVED"), flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
